"""The bench's seeded prompts: sentences of common words, so content-, sentence- and query-aware
policies see text, and (in-process) a question on the last line, as a long-context request ends.
Random-weight shapes without a tokenizer get random token ids. The serving load sends the text alone
(the server tokenizes it) and calibrates its word count against the server's token counts.
"""

from __future__ import annotations

import random

import torch

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split()


def make_prompt(num_words: int, seed: int, sentence_words: int = 12) -> str:
    """A deterministic prompt of `num_words` common words, in sentences of `sentence_words` words."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(num_words)]
    for start in range(0, num_words, sentence_words):
        words[start] = words[start].capitalize()
        end = min(start + sentence_words, num_words) - 1
        words[end] += "."
    return " ".join(words)


QUESTION = "Question: which word appears most often in the text above?"


def prompt_ids(length: int, vocab_size: int, seed: int, tokenizer=None) -> torch.Tensor:
    """A seeded prompt [1, length].

    With a tokenizer: sentences of common words, then the question on its own last line (as a
    long-context request ends), so content-, sentence- and query-aware policies see text. Without
    one (random-weight shapes): random token ids.
    """
    if tokenizer is not None:
        tail = tokenizer("\n" + QUESTION, add_special_tokens=False)["input_ids"]
        body_length = max(0, length - len(tail))
        words, body = body_length, []
        while len(body) < body_length:
            body = tokenizer(make_prompt(words, seed), add_special_tokens=False)["input_ids"]
            words = 2 * words + 1
        ids = torch.tensor([(body[:body_length] + tail)[-length:]])
        if int(ids.max()) >= vocab_size:
            raise ValueError(f"the tokenizer's ids exceed the model's vocabulary ({vocab_size})")
        return ids
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, vocab_size, (1, length), generator=generator)
