"""The shipped long natural-English text: Jane Austen, *Pride and Prejudice* (1813, public domain).

Used as the stream-perplexity corpus (StreamingLLM, Xiao et al., 2024,
https://arxiv.org/abs/2309.17453, streams PG-19 books, which are Project Gutenberg texts too)
and as the natural-prose haystack that stands in for RULER's Paul Graham essays
(https://arxiv.org/abs/2404.06654), which would need a download. See `evals/corpus/README.md`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

CORPUS_FILE = Path(__file__).resolve().parents[1] / "corpus" / "pride_and_prejudice.txt"

_SENTENCE_END = re.compile(r"(?<=[.!?])[”’]?\s+(?=[“‘A-Z])")
_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Messrs.", "Col.", "Capt.")


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """The whole book: paragraphs separated by blank lines, one paragraph per line."""
    if not CORPUS_FILE.is_file():
        raise FileNotFoundError(f"the evaluation corpus {CORPUS_FILE} is missing; reinstall kvmux")
    return CORPUS_FILE.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def corpus_sentences() -> tuple[str, ...]:
    """The book split into sentences (a plain rule: end mark, optional closing quote, capital)."""
    sentences: list[str] = []
    for paragraph in corpus_text().split("\n\n"):
        paragraph = paragraph.strip()
        if not paragraph or paragraph.startswith("Chapter "):
            continue
        start = 0
        for match in _SENTENCE_END.finditer(paragraph):
            end = match.start() + len(match.group(0).rstrip())
            if paragraph[start:end].endswith(_ABBREVIATIONS):
                continue  # "Mr. Bennet": not a sentence end
            sentences.append(paragraph[start:end].strip())
            start = match.end()
        sentences.append(paragraph[start:].strip())
    return tuple(s for s in sentences if s)
