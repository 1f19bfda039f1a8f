"""Synthetic document QA: RULER's `qa` format over generated fictional-fact documents.

RULER (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654, `scripts/data/synthetic/qa.py`)
hides the gold SQuAD/HotpotQA paragraph among distractor paragraphs, rendered as
"Document i:\\n..." and joined by blank lines, and scores with `string_match_part`. Those data
sets are downloads, so our documents are generated: each describes an invented person (names
built from syllables, so no model knows them beforehand) with six facts. The question asks one
fact of the gold person; distractor documents describe other invented people with the same
kinds of facts, so the answer cannot be guessed from the question's form.

The template and answer prefix are RULER's. The gold document sits at the grid depth (by
tokens); distractors are filled one sentence at a time, so the last one may be cut short.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvmux.evals.tasks.common import Renderer, Sample, depth_index, fit_units, sample_rng
from kvmux.evals.tasks.haystack import Haystack

INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
TEMPLATE_BEFORE = INSTRUCTION + "\n\nThe following are given documents.\n\n"
TEMPLATE_AFTER = "\n\n" + INSTRUCTION + "\n\nQuestion: {query}"
ANSWER_PREFIX = " Answer:"

SYLLABLES = (
    "ka vel mor tin dra lo sen bri ost ari qua fen dol mira tash ul gre von pel iss cor bas "
    "nim rud sol vek har jun eth zor lin"
).split()
ANIMALS = ("parrot", "tortoise", "greyhound", "ferret", "goat", "cat", "pony", "raven")
HOBBIES = ("chess", "rowing", "beekeeping", "pottery", "astronomy", "fencing", "gardening", "sailing")
TRAITS = ("patient", "stubborn", "generous", "curious", "quiet", "cheerful", "careful", "restless")
WORDS_A = ("Silver", "Hidden", "Northern", "Quiet", "Broken", "Seventh", "Crimson", "Endless", "Painted", "Distant")
WORDS_B = ("Harbour", "Lantern", "Orchard", "Compass", "Meadow", "Staircase", "Chronicle", "Garden", "Tide", "Letter")

FACTS_PER_DOC = 6


def invented_name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    animal: str
    pet: str
    book: str
    company: str
    hobby: str
    traits: tuple[str, str]

    @classmethod
    def invent(cls, rng: random.Random) -> Person:
        return cls(
            name=f"{invented_name(rng, 2)} {invented_name(rng, 3)}",
            town=invented_name(rng, 3),
            animal=rng.choice(ANIMALS),
            pet=invented_name(rng, 2),
            book=f"The {rng.choice(WORDS_A)} {rng.choice(WORDS_B)} of {invented_name(rng, 2)}",
            company=f"{invented_name(rng, 2)} Works",
            hobby=rng.choice(HOBBIES),
            traits=tuple(rng.sample(TRAITS, 2)),  # type: ignore[arg-type]
        )

    def sentences(self) -> list[str]:
        return [
            f"{self.name} was born in the town of {self.town}.",
            f"{self.name} kept a {self.animal} named {self.pet}.",
            f'{self.name} wrote a book titled "{self.book}".',
            f"{self.name} founded a company called {self.company}.",
            f"{self.name} spent quiet afternoons on {self.hobby}.",
            f"Friends described {self.name} as {self.traits[0]} and {self.traits[1]}.",
        ]

    def questions(self) -> list[tuple[str, str]]:
        return [
            (f"In which town was {self.name} born?", self.town),
            (f"What was the name of the {self.animal} that {self.name} kept?", self.pet),
            (f"What is the title of the book that {self.name} wrote?", self.book),
            (f"What company did {self.name} found?", self.company),
        ]


def render_docs(docs: list[str], gold_at: int, gold: str) -> tuple[str, tuple[int, int]]:
    """'Document i:' blocks joined by blank lines, gold inserted at `gold_at`; returns the gold span."""
    ordered = docs[:gold_at] + [gold] + docs[gold_at:]
    parts, span, pos = [], (0, 0), 0
    for i, body in enumerate(ordered):
        block = f"Document {i + 1}:\n{body}"
        if i == gold_at:
            span = (pos, pos + len(block))
        parts.append(block)
        pos += len(block) + 2
    return "\n\n".join(parts), span


@dataclass(frozen=True)
class DocumentQATask:
    name: str = "qa"
    metric: str = "string_match_part"
    max_new_tokens: int = 32
    uses_depth: bool = True

    def make(
        self, renderer: Renderer, length: int, depth: float | None, index: int, seed: int, max_new_tokens: int = 0
    ) -> Sample:
        rng = sample_rng(seed, self.name, index)
        gold = Person.invent(rng)
        question, answer = rng.choice(gold.questions())
        gold_doc = " ".join(gold.sentences())
        people_seed, depth_seed = rng.getrandbits(64), rng.getrandbits(64)
        people: dict[int, Person] = {}

        def sentence(i: int) -> str:
            doc = i // FACTS_PER_DOC
            if doc not in people:
                person = Person.invent(random.Random(people_seed + doc))
                while person.name == gold.name or answer in " ".join(person.sentences()):
                    person = Person.invent(random.Random(person.name))
                people[doc] = person
            return people[doc].sentences()[i % FACTS_PER_DOC]

        stream = Haystack(sentence, renderer)
        before, after = TEMPLATE_BEFORE, TEMPLATE_AFTER.format(query=question)
        doc_depth = depth if depth is not None else random.Random(depth_seed).uniform(0, 100)

        def build(n: int, words: int = 0) -> tuple[str, str, list[int], tuple[int, int]]:
            units, cumulative = stream.units(n), stream.cumulative(n)
            if words:  # the first words of the next sentence top the documents up to the budget
                units, cumulative = stream.with_partial(n, words)
            total = len(units)
            docs = [" ".join(units[i : i + FACTS_PER_DOC]) for i in range(0, total, FACTS_PER_DOC)]
            doc_cumulative = [cumulative[i] for i in range(0, total, FACTS_PER_DOC)] + [cumulative[total]]
            gold_at = depth_index(doc_cumulative, doc_depth)
            body, span = render_docs(docs, gold_at, gold_doc)
            prompt = renderer.render(before + body + after, ANSWER_PREFIX)
            return body, prompt, renderer.encode(prompt), span

        max_new = max_new_tokens or self.max_new_tokens
        budget = length - max_new
        size = lambda item: len(item[2])  # noqa: E731
        n, _ = fit_units(build, size, budget, guess=max(1, budget // 16))
        next_words = len(stream.units(n + 1)[n].split())
        _, (body, prompt, ids, span) = fit_units(lambda k: build(n, k), size, budget, 4, upper=next_words - 1)
        hay_start = renderer.context_offset() + len(before)
        return Sample(
            task=self.name,
            index=index,
            length=length,
            depth=depth,
            prompt=prompt,
            prompt_ids=ids,
            context=before + body + after,
            answer_prefix=ANSWER_PREFIX,
            answers=[answer],
            metric=self.metric,
            max_new_tokens=max_new,
            query=question,
            haystack_span=(hay_start, hay_start + len(body)),
            needle_spans=[(hay_start + span[0], hay_start + span[1])],
        )
