"""A search agent over a generated corpus: multi-hop questions about made-up entities.

The hidden world has people, organisations, cities and lands with made-up names; the corpus has
one short fact per document ("zorb was founded by kelm.", "kelm was born in 1923.", "kelm was born
in the city of vask.", "vask lies in the land of tor.", "zorb is based in vask."). The question
chains `difficulty` facts (1 to 3: "in which city is zorb based?", "in which land is zorb
based?", "in which land was the founder of zorb born?"), so from difficulty 2 no single search
answers it. The one tool, `search`, returns the documents sharing the most words with the query.
The answer is a name; verify compares it exactly after normalisation.

Difficulties 1 and 2 are sized for a tiny CPU model: a small world of 4-letter names and only the
single best document per search, so every fact sits at the same offset in a result. Difficulty 3 has
the full world, names of any length and three documents per search.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from rollout.agent.environments.base import (
    Environment,
    check_difficulty,
    final_answer_text,
    make_names,
    plain,
    tool_schema,
)

RESULTS_PER_SEARCH = 3
FIRST_DOC = 10  # documents are numbered from 10: two digits for every corpus size here
NAME_LENGTH_EASY = 4
# Words that appear in many documents carry no signal for ranking.
STOP_WORDS = frozenset("a an and by for in is of on the to was what which who where when".split())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - STOP_WORDS


def normalize_answer(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", plain(text)))


class SearchEnv(Environment):
    """See the module docstring. Hidden state: the world dicts and `answer`."""

    kind = "search"

    def __init__(self, seed: int, difficulty: int = 2):
        check_difficulty("search", difficulty)
        rng = random.Random(seed)
        taken = set(STOP_WORDS)  # a name the search tool ignores could never be found
        small = difficulty <= 2
        # What the tiny CPU model can learn to read in minutes: a small world of 4-letter names, one result per
        # search, so every fact sits at the same offset in a search result (with two-digit doc numbers).
        length = NAME_LENGTH_EASY if small else None
        people = make_names(rng, rng.randint(4, 6) if small else rng.randint(8, 12), taken, length)
        orgs = make_names(rng, rng.randint(3, 5) if small else rng.randint(6, 9), taken, length)
        cities = make_names(rng, rng.randint(3, 4) if small else rng.randint(5, 7), taken, length)
        lands = make_names(rng, rng.randint(2, 3) if small else rng.randint(3, 4), taken, length)
        self.born_year = {p: rng.randint(1800, 1999) for p in people}
        self.born_city = {p: rng.choice(cities) for p in people}
        self.land_of = {c: rng.choice(lands) for c in cities}
        self.founder = {o: rng.choice(people) for o in orgs}
        self.based_in = {o: rng.choice(cities) for o in orgs}
        facts = ([f"{o} was founded by {p}." for o, p in self.founder.items()]
                 + [f"{o} is based in {c}." for o, c in self.based_in.items()]
                 + [f"{p} was born in {y}." for p, y in self.born_year.items()]
                 + [f"{p} was born in the city of {c}." for p, c in self.born_city.items()]
                 + [f"{c} lies in the land of {land}." for c, land in self.land_of.items()])
        rng.shuffle(facts)
        self.documents = facts  # document FIRST_DOC + i is facts[i]

        org = rng.choice(orgs)
        person = self.founder[org]
        questions = {  # by the number of facts they chain
            1: [(f"in which city is {org} based?", self.based_in[org]),
                (f"who founded {org}?", person)],
            # No "in what year was the founder born?": with one result its query ties with the birthplace fact.
            # The founder's birthplace is asked only when it is not also where the organisation is based (then
            # "zorb is based in vask." would answer it in one hop).
            2: [*([] if self.born_city[person] == self.based_in[org] else
                  [(f"in which city was the founder of {org} born?", self.born_city[person])]),
                (f"in which land is {org} based?", self.land_of[self.based_in[org]])],
            3: [(f"in which land was the founder of {org} born?", self.land_of[self.born_city[person]])],
        }
        question, self.answer = rng.choice(questions[difficulty])
        self.question = question
        # The question comes last, right before the model's turn: the tiny model copies names from close by.
        task = f"use the search tool, then reply with answer: and the answer. {question}"
        tools = [tool_schema("search", "find the documents that share the most words with the query",
                             query=("string", "words to look for"))]
        super().__init__(seed, task, tools, difficulty)

    def handlers(self) -> dict[str, Callable[..., str]]:
        return {"search": self.search}

    def search(self, query: str) -> str:
        wanted = _words(query)
        scored = [(len(wanted & _words(doc)), FIRST_DOC + i, doc) for i, doc in enumerate(self.documents)]
        ranked = sorted((-score, number, doc) for score, number, doc in scored if score > 0)
        hits = ranked[:1 if self.difficulty <= 2 else RESULTS_PER_SEARCH]
        if not hits:
            return "no documents match that query."
        return " ".join(f"doc {number}: {doc}" for _, number, doc in hits)

    def verify(self, final_answer: str) -> float:
        return float(normalize_answer(final_answer_text(final_answer)) == self.answer)


def make_search_env(seed: int, difficulty: int = 2) -> SearchEnv:
    return SearchEnv(seed, difficulty)
