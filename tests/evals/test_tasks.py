"""Task generators: seeded determinism, exact token budgets, needle depth, recoverable answers."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvmux.evals.tasks import TASKS, get_task
from kvmux.evals.tasks.common import Renderer, TaskLengthError, fit_units, join_list
from kvmux.evals.tasks.corpus import CORPUS_FILE, corpus_sentences, corpus_text

# single-prompt tasks (the shared-context tasks, several turns per sample, are in test_shared_context.py)
GENERATION_TASKS = [
    name for name, task in TASKS.items() if task.metric != "perplexity" and not getattr(task, "shared_context", False)
]
DEPTH_TASKS = [name for name in GENERATION_TASKS if TASKS[name].uses_depth]
# decode_recall's depth is how far into the fed prose the fact is restated (its own test below)
NEEDLE_DEPTH_TASKS = [name for name in DEPTH_TASKS if name != "decode_recall"]


@pytest.fixture(scope="module", params=["raw", "chat"])
def renderer(request, smol_tokenizer):
    return Renderer(smol_tokenizer, chat=request.param == "chat")


@pytest.mark.parametrize("name", GENERATION_TASKS)
def test_same_seed_same_sample_other_seed_other_sample(name, renderer):
    task = get_task(name)
    a = task.make(renderer, 1024, 50.0, 0, seed=7)
    b = task.make(renderer, 1024, 50.0, 0, seed=7)
    c = task.make(renderer, 1024, 50.0, 0, seed=8)
    d = task.make(renderer, 1024, 50.0, 1, seed=7)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert c.prompt != a.prompt and d.prompt != a.prompt
    assert c.answers != a.answers


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("name", GENERATION_TASKS)
def test_prompt_fills_its_token_budget_within_one_percent(name, length, renderer):
    sample = get_task(name).make(renderer, length, 25.0, 0, seed=1)
    budget = length - sample.max_new_tokens
    assert sample.prompt_ids == renderer.encode(sample.prompt)
    assert sample.prompt_tokens <= budget
    assert sample.prompt_tokens >= 0.99 * budget, (sample.prompt_tokens, budget)
    assert sample.prompt.endswith(sample.answer_prefix.lstrip())
    if renderer.chat:
        assert sample.prompt.startswith("<|im_start|>")


def test_max_new_tokens_override_shrinks_the_prompt(renderer):
    task = get_task("passkey")
    default = task.make(renderer, 2048, 50.0, 0, seed=1)
    longer = task.make(renderer, 2048, 50.0, 0, seed=1, max_new_tokens=200)
    assert longer.max_new_tokens == 200
    assert longer.prompt_tokens <= 2048 - 200 < default.prompt_tokens


def _depth_percent(renderer, sample) -> float:
    """Share of the haystack's tokens (needles excluded) that come before the answer needles."""
    start, end = sample.haystack_span
    first, last = sample.needle_spans[0][0], sample.needle_spans[-1][1]
    before = renderer.count(sample.prompt[start:first])
    after = renderer.count(sample.prompt[last:end])
    return 100.0 * before / (before + after)


@pytest.mark.parametrize("depth", [0.0, 30.0, 50.0, 100.0])
@pytest.mark.parametrize("name", NEEDLE_DEPTH_TASKS)
def test_needle_sits_at_the_requested_depth(name, depth, renderer):
    sample = get_task(name).make(renderer, 2048, depth, 3, seed=5)
    tolerance = 6.0 if name == "qa" else 2.5  # qa moves whole documents (~90 tokens each)
    assert abs(_depth_percent(renderer, sample) - depth) <= tolerance
    # the answer-bearing needles are adjacent to each other
    for (_, end), (start, _) in zip(sample.needle_spans, sample.needle_spans[1:], strict=False):
        assert sample.prompt[end:start] == "\n"


@pytest.mark.parametrize("name", ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_needles_carry_every_answer_for_the_queried_keys(name, renderer):
    sample = get_task(name).make(renderer, 2048, 40.0, 2, seed=3)
    needles = [sample.prompt[a:b] for a, b in sample.needle_spans]
    found = {answer for answer in sample.answers for needle in needles if answer in needle}
    assert found == set(sample.answers)
    if name == "passkey":
        assert needles == [f"The pass key is {sample.answers[0]}. Remember it. {sample.answers[0]} is the pass key."]
        return
    keys = re.findall(r"for (.+?) is: ", "\n".join(needles))
    assert sample.query.count(keys[0]) == 1 and all(key in sample.query for key in keys)
    assert len(sample.needle_spans) == TASKS[name].num_queries * TASKS[name].num_values
    # every needle of a queried key is in the answer set: nothing with the same key hides elsewhere
    hay = sample.prompt[slice(*sample.haystack_span)]
    for key in set(keys):
        values = re.findall(rf"for {re.escape(key)} is: (\S+)\.", hay)
        assert sorted(values) == sorted(v for v in sample.answers if f"{key} is: {v}" in "\n".join(needles))


@pytest.mark.parametrize("depth", [0.0, 50.0, 100.0])
def test_decode_recall_states_the_fact_in_the_prompt_and_restates_it_up_to_the_depth(depth, renderer):
    task = get_task("decode_recall")
    sample = task.make(renderer, 2048, depth, 1, seed=4)
    value = sample.answers[0]
    prefilled = renderer.tokenizer.decode(sample.prompt_ids[: sample.decode_from])
    assert f"is {value}." in prefilled and "Remember" not in prefilled
    assert sample.prompt[slice(*sample.needle_spans[0])].endswith(f"is {value}.")
    fed = sample.prompt[slice(*sample.haystack_span)]
    prose = renderer.count(re.sub(r" \(Remember: [^)]*\)", "", fed))
    reminders = [m.start() for m in re.finditer(r"\(Remember: the secret number of \w+ is (\d+)\.\)", fed)]
    assert len(reminders) == int(depth / 100 * prose // task.restate_every)
    assert all(f"is {value}.)" in fed[at : at + 80] for at in reminders)
    if reminders:  # nothing restates it past the depth; the last one is at most one interval before it
        before = renderer.count(re.sub(r" \(Remember: [^)]*\)", "", fed[: reminders[-1]]))
        assert depth / 100 * prose - task.restate_every - 60 <= before <= depth / 100 * prose + 5  # recounted
    assert sample.prompt.endswith(f"Question: {sample.query}\n{sample.answer_prefix}")


def test_single_answer_wording_is_singular(renderer):
    single = get_task("niah_single").make(renderer, 1024, 50.0, 0, seed=1)
    multi = get_task("niah_multivalue").make(renderer, 1024, 50.0, 0, seed=1)
    assert "A special magic number is hidden" in single.prompt
    assert "What is the special magic number for" in single.prompt
    assert "Some special magic numbers are hidden" in multi.prompt
    assert "What are all the special magic numbers for" in multi.prompt


def test_multikey_haystack_is_made_of_distractor_needles(renderer):
    sample = get_task("niah_multikey").make(renderer, 2048, 50.0, 0, seed=1)
    hay = sample.prompt[slice(*sample.haystack_span)].split("\n")
    assert len(hay) > 40
    assert sum(line.startswith("One of the special magic number for ") for line in hay) >= len(hay) - 1


def test_book_haystack_is_natural_prose_from_the_corpus(renderer):
    sample = get_task("niah_single_book").make(renderer, 2048, 50.0, 0, seed=1)
    hay = sample.prompt[slice(*sample.haystack_span)]
    sentences = set(corpus_sentences())
    lines = [line for line in hay.split("\n") if not line.startswith("One of the special magic")]
    assert sum(s in sentences for s in re.split(r"(?<=[.!?”])\s+", lines[0])[1:-1]) >= 3


def test_variable_chain_resolves_to_the_answer(renderer):
    sample = get_task("vt").make(renderer, 2048, None, 0, seed=4)
    hay = sample.prompt[slice(*sample.haystack_span)]
    value = re.search(r"assigned the value (\d+) in the text above", sample.query).group(1)
    assigned: dict[str, str] = {}
    for target, source in re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", hay):
        assigned[target] = assigned.get(source[4:], "") if source.startswith("VAR ") else source
    holders = sorted(name for name, v in assigned.items() if v == value)
    assert holders == sorted(sample.answers) and len(holders) == 5
    # five assignment lines of the worked example, five of the task
    assert len(re.findall(r"^VAR [A-Z]+ = ", sample.prompt, flags=re.M)) == 10


def test_common_words_are_the_ten_most_frequent(renderer):
    for length in (1024, 4096):  # below 4K RULER repeats 6/1 times, from 4K 30/3
        sample = get_task("cwe").make(renderer, length, None, 0, seed=2)
        words = re.findall(r"\d+\. (\S+)", sample.prompt[slice(*sample.haystack_span)])
        counts = Counter(words)
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(sample.answers)
        assert max(c for w, c in counts.items() if w not in top) < min(counts[w] for w in top)


def test_qa_gold_document_answers_the_question_and_distractors_do_not(renderer):
    sample = get_task("qa").make(renderer, 2048, 50.0, 1, seed=9)
    gold = sample.prompt[slice(*sample.needle_spans[0])]
    assert sample.answers[0] in gold
    person = re.search(r"Document \d+:\n(.+?) was born", gold).group(1)
    assert person in sample.query
    rest = sample.prompt.replace(gold, "")
    assert sample.answers[0] not in rest and person not in rest.replace(sample.query, "")
    assert sample.metric == "string_match_part"


def test_too_short_a_length_is_refused(renderer):
    with pytest.raises(TaskLengthError):
        get_task("vt").make(renderer, 128, None, 0, seed=1)


def test_fit_units_finds_the_largest_fitting_count():
    n, item = fit_units(lambda n: "x" * (3 * n + 5), len, budget=100, guess=2)
    assert n == 31 and len(item) == 98
    assert fit_units(lambda n: n, lambda n: n, budget=10, guess=4, upper=6)[0] == 6


def test_join_list_reads_like_ruler():
    assert join_list(["a"]) == "a"
    assert join_list(["a", "b"]) == "a and b"
    assert join_list(["a", "b", "c"]) == "a, b, and c"


def test_stream_tokens_are_consecutive_corpus_tokens(smol_tokenizer):
    task = get_task("stream_ppl")
    a = task.tokens(smol_tokenizer, 3000, 0, seed=1)
    assert a == task.tokens(smol_tokenizer, 3000, 0, seed=1)
    assert len(a) == 3000 and a != task.tokens(smol_tokenizer, 3000, 1, seed=1)
    text = smol_tokenizer.decode(a[10:200])
    assert text.strip()[:40] in corpus_text()


def test_corpus_is_long_enough_and_documented(smol_tokenizer):
    assert len(smol_tokenizer(corpus_text())["input_ids"]) >= 16_384
    readme = (CORPUS_FILE.parent / "README.md").read_text()
    assert "public domain" in readme.lower() and CORPUS_FILE.name in readme


def test_needle_token_indices_cover_the_needle_text(renderer, smol_tokenizer):
    sample = get_task("passkey").make(renderer, 1024, 50.0, 0, seed=3)
    indices = sample.needle_token_indices(smol_tokenizer)
    assert indices == list(range(indices[0], indices[-1] + 1))  # one contiguous run
    text = smol_tokenizer.decode([sample.prompt_ids[i] for i in indices])
    needle = sample.prompt[slice(*sample.needle_spans[0])]
    assert needle.strip() in text and sample.answers[0] in text
    assert len(text) < len(needle) + 20  # only the tokens that overlap the needle


def test_prose_variants_hide_their_needles_in_the_novel(renderer):
    sentences = set(corpus_sentences())
    passkey = get_task("passkey_book").make(renderer, 2048, 50.0, 0, seed=1)
    hay = passkey.prompt[slice(*passkey.haystack_span)]
    assert f"The pass key is {passkey.answers[0]}. Remember it." in hay
    assert sum(s in sentences for s in re.split(r"(?<=[.!?”])\s+", hay)) >= 10
    assert (
        passkey.prompt_tokens <= 2048 and passkey.prompt != get_task("passkey").make(renderer, 2048, 50.0, 0, 1).prompt
    )
    multikey = get_task("niah_multikey_book").make(renderer, 2048, 50.0, 0, seed=1)
    hay = multikey.prompt[slice(*multikey.haystack_span)]
    assert len(re.findall(r"One of the special magic numbers? for \S+ is: \d+", hay)) == 4  # 1 asked + 3 distractors
    assert multikey.answers[0] in hay and sum(s in sentences for s in re.split(r"(?<=[.!?”])\s+", hay)) >= 10
