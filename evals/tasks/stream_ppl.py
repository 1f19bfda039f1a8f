"""The stream-perplexity task: consecutive tokens of a long natural-English text.

StreamingLLM (Xiao et al., 2024, https://arxiv.org/abs/2309.17453, Fig. 3 and §4.1) streams
PG-19 books token by token and reports perplexity along the stream. We stream the shipped
public-domain novel (see `corpus.py`); the measurement itself is `kvmux.evals.quality.stream`.
Sample i starts at a seeded random paragraph (sample 0 too), and a stream longer than the
book wraps around to its beginning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmux.evals.tasks.common import sample_rng
from kvmux.evals.tasks.corpus import corpus_text


@dataclass(frozen=True)
class StreamPPLTask:
    name: str = "stream_ppl"
    metric: str = "perplexity"
    max_new_tokens: int = 0
    uses_depth: bool = False

    def tokens(self, tokenizer, length: int, index: int, seed: int) -> list[int]:
        """`length` consecutive token ids of the corpus for sample `index`, from a paragraph start."""
        text = corpus_text()
        starts = [0] + [m.end() for m in re.finditer("\n\n", text)]
        start = starts[sample_rng(seed, self.name, index).randrange(len(starts))]
        chars = 6 * length + 512  # English prose runs ~4.3 characters per token
        while True:
            piece = text[start : start + chars]
            while len(piece) < chars:  # wrap around to the beginning of the book
                piece += "\n\n" + text[: chars - len(piece)]
            ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if len(ids) > length:  # the last token may be cut by the slice; drop it
                return ids[:length]
            chars *= 2
