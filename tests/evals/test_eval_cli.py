"""`kvmux eval` flags: lengths with K suffixes, lists, overrides, and the report-only path."""

from __future__ import annotations

import argparse
import json

import pytest

from kvmux.cli_args import parse_tokens
from kvmux.evals.helpers import sweep_overrides
from kvmux.evals.quality.cli import add_eval_parser


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="kvmux")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_defaults_and_lists():
    args = _parse("--presets", "full,streaming_llm", "--lengths", "2K,4k,3000", "--depths", "0,50")
    assert args.presets == ["full", "streaming_llm"] and args.lengths == [2048, 4096, 3000]
    assert args.depths == [0.0, 50.0] and args.chat is False and args.send_query is True
    assert "passkey" in args.tasks and args.func.__name__ == "eval_command"
    assert _parse("--chat").chat is True
    with pytest.raises(SystemExit):
        _parse("--chat", "--raw")
    assert parse_tokens("1.5K") == 1536


def test_overrides_must_be_a_json_object():
    assert sweep_overrides('{"streaming_llm": [{"window": 64}]}') == {"streaming_llm": [{"window": 64}]}
    with pytest.raises(SystemExit):
        sweep_overrides("[1]")
    with pytest.raises(SystemExit):
        sweep_overrides("{oops")


def test_report_only_rewrites_the_report(tmp_path, capsys):
    data = {"version": 1, "meta": {"model": "m"}, "cells": {}}
    (tmp_path / "results.json").write_text(json.dumps(data))
    args = _parse("--out", str(tmp_path), "--report-only")
    assert args.func(args) == 0
    assert (tmp_path / "summary.md").read_text().startswith("# kvmux eval")


def test_report_only_without_results_says_what_is_missing(tmp_path):
    args = _parse("--out", str(tmp_path / "none"), "--report-only")
    with pytest.raises(SystemExit, match="needs .*results.json; run the eval first"):
        args.func(args)
    (tmp_path / "results.json").write_text("{oops")
    args = _parse("--out", str(tmp_path), "--report-only")
    with pytest.raises(SystemExit, match="is not JSON"):
        args.func(args)
