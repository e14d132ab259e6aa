"""A grammar of spoken commands for the transcribed demo corpus: numbers, times, dates, names, places.

Every sentence is written the way it is spoken and the way a transcript is normalised (lower case,
letters, apostrophes and single spaces; numbers as words), so the text given to the synthesiser
is also the reference transcript. ``sentences(n, seed)`` returns n distinct sentences, a pure
function of (n, seed).
"""

from __future__ import annotations

import re

import numpy as np

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL_ONES = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                 "nine": "ninth", "twelve": "twelfth"}

_FIRST = ("anna maria james david sarah michael laura peter emma daniel olivia thomas sofia robert grace "
          "william lucy henry chloe samuel julia oscar nina victor helen martin alice george irene felix").split()
_LAST = ("smith garcia miller brown lopez wilson taylor anderson thomas moore martin jackson white harris "
         "clark lewis walker young king wright scott green baker adams nelson hill carter mitchell").split()
_CITIES = ("london paris boston denver chicago seattle madrid berlin dublin oslo vienna lisbon tokyo sydney "
           "toronto austin phoenix miami atlanta portland").split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_MONTHS = "january february march april may june july august september october november december".split()
_ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "office", "garage", "hallway", "dining room"]
_DEVICES = ["lights", "lamp", "fan", "heater", "radio", "television", "speaker", "air conditioner"]
_ITEMS = ["apples", "eggs", "onions", "tomatoes", "bananas", "carrots", "potatoes", "lemons",
          "bottles of water", "loaves of bread", "cans of beans", "bags of rice", "boxes of tea"]
_GENRES = ["jazz", "classical", "rock", "country", "blues", "folk", "reggae", "piano", "relaxing", "dance"]
_STREETS = ["oak", "maple", "river", "park", "hill", "lake", "church", "market", "station", "mill", "king", "high"]
_TASKS = ["call the doctor", "pay the rent", "water the plants", "buy a present", "book the tickets",
          "pick up the kids", "feed the cat", "send the report", "renew my passport", "clean the car",
          "return the books", "check the oven"]
_STATUS = ["running late", "on my way", "stuck in traffic", "almost home", "at the station",
           "in a meeting", "leaving now", "at the airport"]
_UNITS = ["minutes", "hours", "seconds"]
_LETTERS = "a b c d e f g h j k l m n p r s t u v w x y z".split()
_NATO = {"a": "alpha", "b": "bravo", "c": "charlie", "d": "delta", "e": "echo", "f": "foxtrot", "g": "golf",
         "h": "hotel", "j": "juliet", "k": "kilo", "l": "lima", "m": "mike", "n": "november", "p": "papa",
         "r": "romeo", "s": "sierra", "t": "tango", "u": "uniform", "v": "victor", "w": "whiskey",
         "x": "x ray", "y": "yankee", "z": "zulu"}


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in words: 342 -> "three hundred and forty two"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"n must be in [0, 1000000), got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        head = _ONES[n // 100] + " hundred"
        return head if n % 100 == 0 else f"{head} and {number_words(n % 100)}"
    head = number_words(n // 1000) + " thousand"
    rest = n % 1000
    if rest == 0:
        return head
    return f"{head} and {number_words(rest)}" if rest < 100 else f"{head} {number_words(rest)}"


def ordinal_words(n: int) -> str:
    """1 <= n < 100 as an ordinal: 21 -> "twenty first", 30 -> "thirtieth"."""
    words = number_words(n).split()
    last = words[-1]
    if last in _ORDINAL_ONES:
        words[-1] = _ORDINAL_ONES[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


class _Grammar:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def name(self) -> str:
        return self.pick(_FIRST) if self.rng.random() < 0.5 else f"{self.pick(_FIRST)} {self.pick(_LAST)}"

    def time(self) -> str:
        h = int(self.rng.integers(1, 13))
        style = int(self.rng.integers(6))
        if style == 0:
            return f"{number_words(h)} o'clock"
        if style == 1:
            return f"half past {number_words(h)}"
        if style == 2:
            return f"a quarter {self.pick(['past', 'to'])} {number_words(h)}"
        m = int(self.rng.integers(1, 60))
        minutes = f"oh {number_words(m)}" if m < 10 else number_words(m)
        suffix = self.pick(["", " in the morning", " in the evening", " at night", " p m", " a m"])
        return f"{number_words(h)} {minutes}{suffix}"

    def date(self) -> str:
        day, month = int(self.rng.integers(1, 29)), self.pick(_MONTHS)
        return f"the {ordinal_words(day)} of {month}" if self.rng.random() < 0.5 else f"{month} {ordinal_words(day)}"

    def when(self) -> str:
        return self.pick([f"on {self.pick(_DAYS)}", f"next {self.pick(_DAYS)}", f"on {self.date()}", "tomorrow",
                          "today", f"this {self.pick(['morning', 'afternoon', 'evening'])}"])

    def number(self) -> str:
        scale = self.pick([10, 100, 1000, 100000])
        return number_words(int(self.rng.integers(0, scale)))

    def digits(self, k: int) -> str:
        return " ".join(_ONES[int(d)] for d in self.rng.integers(0, 10, k))

    def code(self) -> str:
        letters = [_NATO[self.pick(_LETTERS)] for _ in range(int(self.rng.integers(1, 3)))]
        return " ".join(letters) + " " + number_words(int(self.rng.integers(1, 1000)))

    def sentence(self) -> str:
        g = self
        forms = [
            lambda: f"set an alarm for {g.time()}",
            lambda: f"wake me up at {g.time()} on {g.pick(_DAYS)}",
            lambda: f"set a timer for {number_words(int(g.rng.integers(1, 60)))} {g.pick(_UNITS)}",
            lambda: f"cancel my alarm for {g.time()}",
            lambda: f"call {g.name()}",
            lambda: f"call {g.name()} on {g.pick(['her', 'his', 'the'])} {g.pick(['mobile', 'work', 'home'])} phone",
            lambda: f"send a message to {g.name()} saying i am {g.pick(_STATUS)}",
            lambda: f"tell {g.name()} that i will be there at {g.time()}",
            lambda: f"turn {g.pick(['on', 'off'])} the {g.pick(_ROOMS)} {g.pick(_DEVICES)}",
            lambda: f"set the {g.pick(_ROOMS)} temperature to {number_words(int(g.rng.integers(12, 31)))} degrees",
            lambda: f"dim the {g.pick(_ROOMS)} lights to {number_words(int(g.rng.integers(1, 100)))} percent",
            lambda: f"schedule a meeting with {g.name()} {g.when()} at {g.time()}",
            lambda: f"what is on my calendar {g.when()}",
            lambda: f"remind me to {g.pick(_TASKS)} {g.when()}",
            lambda: f"remind me to {g.pick(_TASKS)} at {g.time()}",
            lambda: f"my phone number is {g.digits(int(g.rng.integers(6, 11)))}",
            lambda: f"the total comes to {g.number()} {g.pick(['dollars', 'euros', 'pounds'])}",
            lambda: f"add {number_words(int(g.rng.integers(1, 13)))} {g.pick(_ITEMS)} to my shopping list",
            lambda: f"flight {g.code()} leaves from gate {number_words(int(g.rng.integers(1, 80)))}",
            lambda: f"play some {g.pick(_GENRES)} music in the {g.pick(_ROOMS)}",
            lambda: f"navigate to {number_words(int(g.rng.integers(1, 2000)))} {g.pick(_STREETS)} street",
            lambda: f"how long does it take to drive to {g.pick(_CITIES)}",
            lambda: f"what is the weather in {g.pick(_CITIES)} on {g.pick(_DAYS)}",
            lambda: f"book a table for {number_words(int(g.rng.integers(2, 13)))} at {g.time()}",
            lambda: f"my order number is {g.code()}",
            lambda: f"the meeting is {g.when()} in room {number_words(int(g.rng.integers(1, 500)))}",
            lambda: f"how many days until {g.date()}",
            lambda: f"what time is it in {g.pick(_CITIES)}",
            lambda: f"transfer {g.number()} dollars to {g.name()}",
            lambda: f"{g.name()} was born on {g.date()}",
        ]
        return self.pick(forms)()


_NORMAL = re.compile(r"^[a-z']+( [a-z']+)*$")


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct normalised sentences (a pure function of n and seed)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = _Grammar(np.random.default_rng([seed, 0x5E17]))
    out, seen = [], set()
    for _ in range(n * 50):
        s = " ".join(g.sentence().split())
        if s not in seen:
            if not _NORMAL.match(s):  # the grammar must write normalised text only
                raise RuntimeError(f"grammar produced an unnormalised sentence: {s!r}")
            seen.add(s)
            out.append(s)
            if len(out) == n:
                return out
    raise ValueError(f"the grammar gave only {len(out)} distinct sentences for n={n}")
