"""InfiniRetri: sentences and chunks, prompt layout, attention scoring, selection, equivalence to full."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from kvmux.policies.base import PolicyInputError, SessionRequest
from kvmux.policies.infiniretri.prompt_layout import split_prompt
from kvmux.policies.infiniretri.scoring import cap_sentences, score_candidates, select_sentences, window_sum
from kvmux.policies.infiniretri.sentences import (
    ends_sentence,
    pack_chunks,
    sentence_spans,
    token_pieces,
)
from kvmux.policies.question_text import token_boundary
from tests.policies.helpers import ByteTokenizer, new_session, run_prefill
from tests.tiny_models import make_tiny

TOK = ByteTokenizer()
HEAD, TAIL = "<sys>be brief</sys>\n<user>\n", "</user>\n<assistant>\n"


def with_tokenizer(tiny):
    model, info, runner = tiny
    return model, dataclasses.replace(info, tokenizer=TOK), runner


def chat(content: str) -> tuple[torch.Tensor, SessionRequest]:
    prompt = HEAD + content + TAIL
    return torch.tensor([TOK.encode(prompt)]), SessionRequest(
        prompt_text=prompt, messages=[{"role": "user", "content": content}]
    )


def facts_document(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(f"Item {i} weighs {rng.randint(10, 99)} grams." for i in range(n))


def generate(session, runner, ids, steps: int = 4) -> torch.Tensor:
    logits = [run_prefill(session, runner, ids)]
    for _ in range(steps):
        logits.append(session.decode(runner, int(logits[-1].argmax())))
    return torch.stack(logits)


# -- sentences and chunks --------------------------------------------------------------------


def test_sentence_rules():
    assert ends_sentence(".", " The") and ends_sentence("?", None) and ends_sentence('."', " He")
    assert not ends_sentence(".", "14")  # 3.14
    assert ends_sentence("。", "次") and ends_sentence("\n", "x") and ends_sentence(". ", "x")
    assert not ends_sentence(" sky", " is")


def test_sentence_spans_keep_whitespace_and_cut_long_sentences():
    pieces = ["The", " sky", ".", " Pi", " is", " 3", ".", "14", ".", "\n", "\n", "Next", " line", "\n", "x"]
    assert sentence_spans(pieces, 0, len(pieces), 100) == [(0, 3), (3, 11), (11, 14), (14, 15)]
    # a sentence longer than the limit is cut into pieces of at most that many tokens
    assert sentence_spans(pieces, 3, 11, 3) == [(3, 6), (6, 9), (9, 11)]


def test_pack_chunks_whole_sentences_without_overlap():
    spans = [(0, 4), (4, 9), (9, 10), (10, 16), (16, 30), (30, 31)]
    chunks = pack_chunks(spans, 10)
    assert chunks == [[(0, 4), (4, 9), (9, 10)], [(10, 16)], [(16, 30)], [(30, 31)]]
    assert [s for c in chunks for s in c] == spans


def test_token_pieces_and_boundaries():
    text = "ab. cd\nef"
    ids = TOK.encode(text)
    assert "".join(token_pieces(TOK, ids)) == text
    assert token_boundary(TOK, ids, 4, after=True) == 4 and token_boundary(TOK, ids, 4, after=False) == 4
    accented = TOK.encode("é|x")  # 'é' is two tokens: a character boundary inside it rounds outwards
    assert token_boundary(TOK, accented, 1, after=False) == 2


# -- prompt layout ---------------------------------------------------------------------------


def test_chat_layout_keeps_template_and_splits_last_line():
    content = "Intro.\nFact one. Fact two.\nWhat is fact two?"
    ids, request = chat(content)
    layout = split_prompt(TOK, ids[0].tolist(), request, 512)
    assert TOK.decode(layout.prefix) == HEAD
    c0, c1 = layout.context
    assert TOK.decode(ids[0, c0:c1].tolist()) == "Intro.\nFact one. Fact two.\n"
    assert TOK.decode(layout.question) == "What is fact two?" + TAIL
    assert layout.source == "last_line"


def test_layout_question_sources():
    text = "Doc line one.\nDoc line two.\n\nQuestion: which line?\nAnswer briefly."
    ids = TOK.encode(text)
    layout = split_prompt(TOK, ids, SessionRequest(prompt_text=text), 512)
    assert TOK.decode(layout.question) == "Question: which line?\nAnswer briefly."
    assert layout.source == "after_last_blank_line" and layout.prefix == []
    # the paragraph after the blank line is too long: the last line is used
    layout = split_prompt(TOK, ids, SessionRequest(prompt_text=text), 20)
    assert TOK.decode(layout.question) == "Answer briefly." and layout.source == "last_line"
    # an explicit query found in the prompt starts the question at its last occurrence
    layout = split_prompt(TOK, ids, SessionRequest(query_text="which line?", prompt_text=text), 512)
    assert TOK.decode(layout.question) == "which line?\nAnswer briefly." and layout.source == "query"
    # a query that is not in the prompt is asked after the whole text
    layout = split_prompt(TOK, ids, SessionRequest(query_text="Which one?", prompt_text=text), 512)
    assert layout.context == (0, len(ids)) and TOK.decode(layout.question) == "\n\nWhich one?"
    # one line: all question, nothing to read
    layout = split_prompt(TOK, TOK.encode("Hello there."), SessionRequest(), 512)
    assert layout.context == (0, 0) and layout.source == "whole_prompt"


def test_missing_question_is_a_clear_input_error(tiny_llama):
    _, info, runner = with_tokenizer(tiny_llama)
    cases = [
        (TOK.encode("Some text.\nQuestion?"), SessionRequest(query_text="   ")),
        (TOK.encode(" \n \n"), SessionRequest()),
        (*chat("   ")[:1], SessionRequest(messages=[{"role": "user", "content": "   "}])),
        (TOK.encode("Doc.\n" + "word " * 60), SessionRequest()),  # last line over max_question_tokens
        (TOK.encode("word " * 900), SessionRequest()),  # one line (all question) longer than the context
    ]
    for ids, request in cases:
        ids = ids if torch.is_tensor(ids) else torch.tensor([ids])
        session = new_session("infiniretri", info, request, max_question_tokens=32)
        with pytest.raises(PolicyInputError):
            run_prefill(session, runner, ids)


# -- scoring and selection -------------------------------------------------------------------


def test_window_sum_is_a_centred_phrase_sum():
    x = torch.zeros(1, 10)
    x[0, 5] = 1.0
    assert window_sum(x, 4)[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]  # columns 5-2 .. 5+1
    assert window_sum(x, 1)[0].tolist() == x[0].tolist()


def test_scoring_a_constructed_attention_pattern_selects_the_attended_sentences():
    # 6 prefix tokens, then 5 sentences of 10 tokens (positions 6..55), then a 4-token question
    rows = torch.full((4, 60), 0.001)
    rows[:, 0] = 5.0  # attention sink: must not be selected nor spill into its neighbours
    rows[:, 23] = 0.9  # sentence 1 (positions 16..25)
    rows[:, 47] = 0.6  # sentence 4 (positions 46..55)
    lengths = [10, 10, 10, 10, 10]
    scores = score_candidates(rows, 6, 56, window=4, sink_tokens=4, row_weights=None)
    chosen, best = select_sentences(scores, lengths, top_k=4)
    assert chosen == [1]  # the 4 best tokens all lie in the window around position 23
    chosen, best = select_sentences(scores, lengths, top_k=8)
    assert chosen == [1, 4]
    assert best[1] > best[4] > best[0]
    # the first candidates are the sequence's first tokens (no prefix): the sink is left out
    rows2 = torch.cat([torch.full((4, 2), 9.0), rows[:, 6:]], dim=1)
    scores2 = score_candidates(rows2, 0, 52, window=4, sink_tokens=2, row_weights=None)
    assert select_sentences(scores2, [2] + lengths, top_k=4)[0] == [2]
    # question weights change which rows count: a row that attends elsewhere can be muted
    rows3 = rows.clone()
    rows3[3, 33] = 50.0  # only the last row looks at sentence 2
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert select_sentences(score_candidates(rows3, 6, 56, 4, 4, weights), lengths, 4)[0] == [1]
    assert select_sentences(score_candidates(rows3, 6, 56, 4, 4, None), lengths, 4)[0] == [2]


def test_cap_keeps_best_sentences_in_document_order():
    best = torch.tensor([0.1, 0.9, 0.5, 0.8])
    assert cap_sentences([0, 1, 2, 3], best, [5, 5, 5, 5], limit=10) == [1, 3]
    assert cap_sentences([0, 2], best, [5, 5, 5, 5], limit=10) == [0, 2]


def test_the_paper_named_preset_scores_in_the_last_layer(tiny_llama):
    """`infiniretri` runs the paper's choice (last layer, no sink positions left out); the 62%-depth
    constant tuned on the embedded model is the named preset `infiniretri_62`."""
    from pathlib import Path

    from kvmux.policies.presets import load_presets

    presets = load_presets(Path(__file__).resolve().parents[2] / "configs" / "policies")
    _, info, _ = tiny_llama
    deep = dataclasses.replace(info, num_layers=30)
    paper, tuned = presets["infiniretri"], presets["infiniretri_62"]
    assert paper.policy.new_session(paper.params, deep, SessionRequest()).scoring_layer == 29
    assert paper.params.sink_tokens == 0
    assert tuned.policy.new_session(tuned.params, deep, SessionRequest()).scoring_layer == 18  # round(0.62 * 29)
    assert "infiniretri_last_layer" not in presets  # the paper's layer is the paper's name now


def test_probe_returns_exact_question_rows_and_stops_after_the_layer():
    model, info, runner = with_tokenizer(make_tiny("llama", num_hidden_layers=3))
    eager, _, _ = make_tiny("llama", num_hidden_layers=3)
    eager.set_attn_implementation("eager")
    ids = torch.randint(0, 256, (1, 50))
    session = new_session("infiniretri", info, layer=1)
    seen = []
    original = session.attention

    def spy(call):
        seen.append(call.layer_idx)
        return original(call)

    session.attention = spy
    rows = session._question_rows(runner, ids[0].tolist(), 42)
    assert seen == [0, 1]  # layer 2 never ran
    with torch.inference_mode():
        attn = eager(ids, output_attentions=True).attentions[1][0]  # [H, N, N]
    torch.testing.assert_close(rows, attn[:, 42:].sum(0), atol=1e-5, rtol=1e-5)


# -- the policy end to end on tiny models ----------------------------------------------------


@pytest.mark.parametrize("style", ["chat", "completion"])
def test_budget_covering_everything_reproduces_full(tiny, style):
    """top_k covering the whole context keeps every sentence of every chunk, so the rebuilt prompt is
    the original one token for token, and prefill + decode equal full attention exactly."""
    model, info, runner = with_tokenizer(tiny)
    content = "Read this.\n" + facts_document(12) + "\nWhich item weighs most?"
    if style == "chat":
        ids, request = chat(content)
    else:
        ids, request = torch.tensor([TOK.encode(content)]), SessionRequest(prompt_text=content)
    session = new_session("infiniretri", info, request, chunk_tokens=64, top_k=ids.shape[1])
    got = generate(session, runner, ids)
    want = generate(new_session("full", info), runner, ids)
    assert torch.equal(got, want)
    stats = session.stats().as_dict()
    assert stats["chunks_read"] > 3 and stats["retention_ratio"] == 1.0
    assert stats["tokens_seen"] == ids.shape[1] + 4


def test_selection_keeps_whole_sentences_and_rebuilds_the_prompt(tiny_llama):
    model, info, runner = with_tokenizer(tiny_llama)
    ids, request = chat("Read this.\n" + facts_document(30) + "\nWhich item weighs most?")
    session = new_session("infiniretri", info, request, chunk_tokens=128, top_k=10, window=4)
    run_prefill(session, runner, ids)
    stats = session.stats().as_dict()
    layout = split_prompt(TOK, ids[0].tolist(), request, 512)
    c0, c1 = layout.context
    sentences = {
        (s + c0, e + c0) for s, e in sentence_spans(token_pieces(TOK, ids[0, c0:c1].tolist()), 0, c1 - c0, 128)
    }
    assert stats["chunks_read"] == 7 and stats["scoring_forwards"] >= 6
    # whole sentences of the prompt, in document order, holding at least the top_k tokens
    assert set(session.retained) <= sentences and session.retained == sorted(session.retained)
    assert 10 <= stats["tokens_retained"] == sum(e - s for s, e in session.retained) < stats["context_tokens"] // 2
    # the cache holds instruction + retained sentences + question; positions continue from it
    final = len(layout.prefix) + stats["tokens_retained"] + len(layout.question)
    assert session.cache.get_seq_length() == stats["final_prompt_tokens"] == final
    assert session.next_position_ids(1).item() == final
    assert stats["tokens_seen"] == ids.shape[1] and stats["kv_bytes_kept"] < stats["kv_bytes_full"]


# -- the embedded model ----------------------------------------------------------------------


@pytest.mark.model
def test_passkey_at_4k_is_retrieved(smollm):
    tokenizer = smollm.tokenizer
    garbage = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    task = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them."
    content = "\n".join(
        [
            task,
            " ".join([garbage] * 85),
            "The pass key is 71432. Remember it. 71432 is the pass key.",
            " ".join([garbage] * 85),
            "What is the pass key?",
        ]
    )
    messages = [{"role": "user", "content": content}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "The pass key is"
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    assert 3700 < ids.shape[1] < 4300
    runner = smollm.runner(2048)
    session = new_session("infiniretri", smollm.info, SessionRequest(prompt_text=prompt, messages=messages))
    logits = run_prefill(session, runner, ids)
    out = []
    for _ in range(6):
        out.append(int(logits.argmax()))
        logits = session.decode(runner, out[-1])
    assert "71432" in tokenizer.decode(out)
    stats = session.stats().as_dict()
    assert stats["chunks_read"] >= 4 and stats["retention_ratio"] < 0.25
