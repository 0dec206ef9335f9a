"""A search agent over a generated corpus: multi-hop questions about made-up entities.

The hidden world has people, organisations, cities and lands with made-up names; the corpus has
one short fact per document ("zorb was founded by kelm.", "kelm was born in 1923.", "kelm was born
in the city of vask.", "vask lies in the land of tor.", "zorb is based in vask."). The question
chains two or three facts ("in which land was the founder of zorb born?"), so no single search
answers it; the one tool, `search`, returns the three documents sharing the most words with the
query. The answer is a name or a year; verify compares it exactly after normalisation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from rollout.agent.environments.base import Environment, final_answer_text, make_names, plain, tool_schema

RESULTS_PER_SEARCH = 3
# Words that appear in many documents carry no signal for ranking.
STOP_WORDS = frozenset("a an and by for in is of on the to was what which who where when".split())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - STOP_WORDS


def normalize_answer(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", plain(text)))


class SearchEnv(Environment):
    """See the module docstring. Hidden state: the world dicts and `answer`."""

    kind = "search"

    def __init__(self, seed: int):
        rng = random.Random(seed)
        taken: set[str] = set()
        people = make_names(rng, rng.randint(8, 12), taken)
        orgs = make_names(rng, rng.randint(6, 9), taken)
        cities = make_names(rng, rng.randint(5, 7), taken)
        lands = make_names(rng, rng.randint(3, 4), taken)
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
        self.documents = facts  # document i + 1 is facts[i]

        org = rng.choice(orgs)
        person = self.founder[org]
        question, self.answer = rng.choice([
            (f"in what year was the founder of {org} born?", str(self.born_year[person])),
            (f"in which city was the founder of {org} born?", self.born_city[person]),
            (f"in which land was the founder of {org} born?", self.land_of[self.born_city[person]]),
            (f"in which land is {org} based?", self.land_of[self.based_in[org]]),
        ])
        self.question = question
        task = (f"answer the question with the help of the search tool. {question} "
                "end your reply with answer: and the answer.")
        tools = [tool_schema("search", "find the documents that share the most words with the query",
                             query=("string", "words to look for"))]
        super().__init__(seed, task, tools)

    def handlers(self) -> dict[str, Callable[..., str]]:
        return {"search": self.search}

    def search(self, query: str) -> str:
        wanted = _words(query)
        scored = [(len(wanted & _words(doc)), i + 1, doc) for i, doc in enumerate(self.documents)]
        ranked = sorted((-score, number, doc) for score, number, doc in scored if score > 0)
        hits = ranked[:RESULTS_PER_SEARCH]
        if not hits:
            return "no documents match that query."
        return " ".join(f"doc {number}: {doc}" for _, number, doc in hits)

    def verify(self, final_answer: str) -> float:
        return float(normalize_answer(final_answer_text(final_answer)) == self.answer)


def make_search_env(seed: int) -> SearchEnv:
    return SearchEnv(seed)
