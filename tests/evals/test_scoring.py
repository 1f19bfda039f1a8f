"""RULER's string_match_all / string_match_part, passkey's first-integer match, perplexity."""

from __future__ import annotations

import math

import pytest

from kvmux.evals.quality.scoring import (
    passkey_match,
    perplexity,
    postprocess,
    score,
    string_match_all,
    string_match_part,
)


def test_string_match_all_is_the_share_of_references_found_case_insensitively():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert string_match_all("only 123 here", ["123", "456", "789", "000"]) == 25.0
    assert string_match_all("Apple-Tree", ["apple-tree"]) == 100.0
    assert string_match_all("", ["x"]) == 0.0


def test_string_match_part_needs_any_one_reference():
    assert string_match_part("answer: Paris", ["London", "Paris"]) == 100.0
    assert string_match_part("answer: Rome", ["London", "Paris"]) == 0.0


def test_passkey_takes_the_first_integer_only():
    assert passkey_match(" 2483.\nThe grass", ["2483"]) == 100.0
    assert passkey_match("is 12 and then 2483", ["2483"]) == 0.0
    assert passkey_match("no digits", ["2483"]) == 0.0
    assert passkey_match("024830", ["2483"]) == 0.0


def test_postprocess_turns_control_characters_into_newlines():
    assert postprocess("  a\tb\x00c \n") == "a\nb\nc"


def test_score_dispatches_by_metric_and_refuses_unknown_ones():
    assert score("passkey", "7", ["7"]) == 100.0
    assert score("string_match_part", "x", ["y"]) == 0.0
    with pytest.raises(KeyError):
        score("rouge", "x", ["x"])
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity([math.log(4.0)] * 3) == pytest.approx(4.0)
    assert perplexity([0.0, math.log(9.0)]) == pytest.approx(3.0)
