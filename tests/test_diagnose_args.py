"""The diagnosis scripts' per-layer options: layer ranges parse, and only the named layers run with the override."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from passkey_case import layer_values, override_per_layer  # noqa: E402


def test_layer_values_single_layers_and_ranges():
    assert layer_values(["18=2048"], int) == {18: 2048}
    assert layer_values(["3-5=exact", "9=hierarchical"], str) == {3: "exact", 4: "exact", 5: "exact", 9: "hierarchical"}
    assert layer_values(["2-3=1", "3=7"], int) == {2: 1, 3: 7}  # a later item wins
    assert layer_values([], int) == {}


def test_layer_values_rejects_a_missing_value():
    with pytest.raises(ValueError):
        layer_values(["18"], int)


class Params(BaseModel):
    search: str = "hierarchical"


def test_override_per_layer_swaps_the_field_for_the_named_layers_only():
    class Session:
        def __init__(self):
            self.params = Params()

        def attention(self, call):
            return self.params.search

    override_per_layer(Session, "search", layer_values(["1-2=exact"], str))
    session = Session()
    seen = [session.attention(SimpleNamespace(layer_idx=layer)) for layer in range(4)]
    assert seen == ["hierarchical", "exact", "exact", "hierarchical"]
    assert session.params.search == "hierarchical"  # restored after each call


def test_layer_search_names_are_the_policys_searches():
    from diagnose_hip import search_name

    assert layer_values(["0-1=exact", "2=hierarchical"], search_name) == {0: "exact", 1: "exact", 2: "hierarchical"}
    with pytest.raises(SystemExit, match="unknown search 'exct'"):
        layer_values(["0-9=exct"], search_name)
