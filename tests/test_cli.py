"""The `kvmux` command line: subcommands exist and `policies` lists every registered policy."""

from __future__ import annotations

import json

import pytest

from kvmux.cli import build_parser, main
from kvmux.policies.registry import policy_names


def test_subcommands():
    parser = build_parser()
    for command in (["serve"], ["generate", "hi"], ["policies"], ["eval"], ["bench"]):
        assert callable(parser.parse_args(command).func)


def test_policies_json_lists_every_policy(capsys):
    assert main(["policies", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)
    assert {p["policy"] for p in presets if "composed" not in p} == set(policy_names())
    assert all("schema" in p and "params" in p for p in presets)


def test_unknown_subcommand_exits_with_usage():
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2
