"""A constraint-satisfaction planner in the style of trip planning.

The task: fly from home to a first city on a given day, stay some nights, fly on to the next city,
..., fly home, with `difficulty` stays (1 to 3); every hotel must have at least some number of
stars and the whole trip (flights plus nights) must fit a budget. The tools list the flights on a
route and day, and the hotels of a city. The budget sits just above the cheapest valid plan and
every city has a cheaper hotel below the star limit, so guessing fails; checking a plan is easy.
The answer is the ids in order, flight hotel ... flight; verify checks every constraint
(`violations`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from rollout.agent.environments.base import (
    Environment,
    ToolError,
    check_difficulty,
    final_answer_text,
    make_names,
    tool_schema,
)


@dataclass(frozen=True)
class Flight:
    origin: str
    dest: str
    day: int
    price: int


@dataclass(frozen=True)
class Hotel:
    city: str
    stars: int
    price: int  # per night


class PlannerEnv(Environment):
    """See the module docstring. Hidden state: `flights`, `hotels` (by id), `legs`, `nights`."""

    kind = "planner"

    def __init__(self, seed: int, difficulty: int = 2):
        check_difficulty("planner", difficulty)
        rng = random.Random(seed)
        self.cities = make_names(rng, rng.randint(difficulty + 2, difficulty + 4))
        home, stays = self.cities[0], self.cities[1:difficulty + 1]
        day = rng.randint(1, 5)
        self.nights = tuple(rng.randint(1, 3) for _ in stays)
        route = [home, *stays, home]
        days = [day + sum(self.nights[:i]) for i in range(len(stays) + 1)]
        self.legs = [(route[i], route[i + 1], days[i]) for i in range(len(stays) + 1)]
        self.min_stars = rng.choice([3, 4])

        flights = [Flight(o, d, t, rng.randrange(60, 400, 10)) for o, d, t in self.legs
                   for _ in range(rng.randint(2, 4))]
        # Distractors: the same routes on other days and other routes.
        for _ in range(rng.randint(8, 14)):
            origin, dest = rng.sample(self.cities, 2)
            flights.append(Flight(origin, dest, rng.randint(1, 12), rng.randrange(60, 400, 10)))
        hotels = [Hotel(c, rng.randint(1, 5), rng.randrange(40, 250, 5)) for c in self.cities
                  for _ in range(rng.randint(2, 4))]
        for city in stays:
            good = [h.price for h in hotels if h.city == city and h.stars >= self.min_stars]
            if not good:
                good = [rng.randrange(60, 250, 5)]
                hotels.append(Hotel(city, rng.randint(self.min_stars, 5), good[0]))
            # A trap: cheaper than any hotel that qualifies, but below the star limit.
            trap_price = max(20, min(good) - rng.randrange(5, 40, 5))
            hotels.append(Hotel(city, rng.randint(1, self.min_stars - 1), trap_price))
        rng.shuffle(flights)
        rng.shuffle(hotels)
        self.flights = {f"f{i + 1}": f for i, f in enumerate(flights)}
        self.hotels = {f"h{i + 1}": h for i, h in enumerate(hotels)}

        cheapest = sum(min(f.price for f in flights if (f.origin, f.dest, f.day) == leg) for leg in self.legs)
        for city, nights in zip(stays, self.nights, strict=True):
            cheapest += nights * min(h.price for h in hotels if h.city == city and h.stars >= self.min_stars)
        self.budget = cheapest + rng.randrange(0, 40, 5)

        nights = [f"{n} night" + ("s" if n > 1 else "") for n in self.nights]
        onward = "".join(f"then fly to {city} and stay {n}, " for city, n in zip(stays[1:], nights[1:], strict=True))
        task = (f"plan a trip from {home}. fly to {stays[0]} on day {day} and stay {nights[0]} there, "
                f"{onward}then fly back to {home}. "
                f"every hotel needs at least {self.min_stars} stars. the whole trip, flights plus hotel "
                f"nights, may cost at most {self.budget}. answer with the ids in order: "
                f"{'flight, hotel, ' * len(stays)}flight.")
        tools = [
            tool_schema("flights", "list the flights from one city to another on one day",
                        origin=("string", "city to leave from"), dest=("string", "city to fly to"),
                        day=("integer", "day of the flight")),
            tool_schema("hotels", "list the hotels of a city with stars and price per night",
                        city=("string", "the city")),
        ]
        super().__init__(seed, task, tools, difficulty)

    def handlers(self) -> dict[str, Callable[..., str]]:
        return {"flights": self.list_flights, "hotels": self.list_hotels}

    def _known_city(self, city: str) -> None:
        if city not in self.cities:
            raise ToolError(f"there is no city {city}. cities: {', '.join(sorted(self.cities))}")

    def list_flights(self, origin: str, dest: str, day: int) -> str:
        self._known_city(origin)
        self._known_city(dest)
        found = [f"flight {i}: {f.origin} to {f.dest} on day {f.day} costs {f.price}."
                 for i, f in self.flights.items() if (f.origin, f.dest, f.day) == (origin, dest, day)]
        return " ".join(found) or f"no flights from {origin} to {dest} on day {day}."

    def list_hotels(self, city: str) -> str:
        self._known_city(city)
        return " ".join(f"hotel {i}: {h.stars} stars, {h.price} per night."
                        for i, h in self.hotels.items() if h.city == city)

    def violations(self, final_answer: str) -> list[str]:
        """Every constraint the answer breaks; empty when the plan is valid."""
        ids = re.findall(r"\b[fh]\d+\b", final_answer_text(final_answer).lower())
        expected = "fh" * len(self.nights) + "f"
        if "".join(i[0] for i in ids) != expected:
            order = " ".join("flight" if c == "f" else "hotel" for c in expected)
            return [f"expected {len(expected)} ids {order}, got {ids}"]
        if any(i not in self.flights and i not in self.hotels for i in ids):
            return ["unknown id"]
        flights = [self.flights[i] for i in ids[0::2]]
        hotels = [self.hotels[i] for i in ids[1::2]]
        broken = [f"flight {i} is not {leg}" for i, f, leg in zip(ids[0::2], flights, self.legs, strict=True)
                  if (f.origin, f.dest, f.day) != leg]
        for i, hotel, (_, city, _) in zip(ids[1::2], hotels, self.legs[:-1], strict=True):
            if hotel.city != city:
                broken.append(f"hotel {i} is not in {city}")
            if hotel.stars < self.min_stars:
                broken.append(f"hotel {i} has fewer than {self.min_stars} stars")
        nights = sum(n * h.price for n, h in zip(self.nights, hotels, strict=True))
        cost = sum(f.price for f in flights) + nights
        if cost > self.budget:
            broken.append(f"cost {cost} is over the budget {self.budget}")
        return broken

    def verify(self, final_answer: str) -> float:
        return float(not self.violations(final_answer))


def make_planner_env(seed: int, difficulty: int = 2) -> PlannerEnv:
    return PlannerEnv(seed, difficulty)
