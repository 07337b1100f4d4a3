"""The study task: two-number word problems with several valid ways to write a solution.

A problem is a short story (``"Mia has 23 red apples at the market. She buys 58 more. How many
apples does Mia have now?"``) whose gold answer is an integer (``"81"``). The word lists make the
text varied enough for a BPE vocabulary of thousands of tokens. A demonstration is one of several
valid solution paths, each ending in ``\\boxed{answer}`` (scored by math-verify, ``"math"``):

    direct        \\boxed{81}
    equation      23 + 58 = 81. The answer is \\boxed{81}.
    swapped       58 + 23 = 81, so \\boxed{81}            (subtraction: a check by addition)
    decomposed    20 + 50 = 70, 3 + 8 = 11, 70 + 11 = 81. \\boxed{81}
    restated      Mia has 23 apples and 58 more: 23 + 58 = 81. So \\boxed{81}.

Train and eval problems never share the arithmetic (a, op, b): the split is a hash of it.
Everything here is a pure function of its arguments (seeded ``random.Random``).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

NAMES = [
    "Mia",
    "Liam",
    "Emma",
    "Noah",
    "Olivia",
    "Ava",
    "Lucas",
    "Sophia",
    "Ethan",
    "Isabella",
    "Mason",
    "Amelia",
    "Logan",
    "Harper",
    "Elijah",
    "Evelyn",
    "Oliver",
    "Abigail",
    "Jacob",
    "Emily",
    "Aiden",
    "Ella",
    "James",
    "Chloe",
    "Benjamin",
    "Grace",
    "Henry",
    "Lily",
    "Samuel",
    "Zoe",
    "Daniel",
    "Nora",
    "Leo",
    "Hannah",
    "Jack",
    "Aria",
    "Owen",
    "Layla",
    "Ryan",
    "Ruby",
    "Adam",
    "Alice",
    "Omar",
    "Fatima",
    "Yusuf",
    "Leila",
    "Hiro",
    "Yuki",
    "Kenji",
    "Mei",
    "Chen",
    "Wei",
    "Arjun",
    "Priya",
    "Ravi",
    "Ananya",
    "Diego",
    "Lucia",
    "Mateo",
    "Sofia",
    "Pablo",
    "Elena",
    "Ivan",
    "Olga",
    "Dmitri",
    "Anya",
    "Kofi",
    "Amara",
    "Kwame",
    "Zara",
    "Tariq",
    "Nadia",
    "Felix",
    "Clara",
    "Hugo",
    "Ines",
    "Max",
    "Greta",
    "Oscar",
    "Freya",
    "Theo",
    "Iris",
    "Rosa",
    "Marco",
    "Paula",
    "Jonas",
    "Lena",
    "Victor",
    "Maya",
    "Sam",
    "Tess",
    "Ben",
    "Kate",
    "Tom",
    "Anna",
]
PRONOUNS = {name: ("She" if i % 2 else "He") for i, name in enumerate(NAMES)}
OBJECTS = [
    "apples",
    "oranges",
    "pears",
    "plums",
    "cherries",
    "lemons",
    "peaches",
    "mangoes",
    "grapes",
    "berries",
    "melons",
    "carrots",
    "potatoes",
    "onions",
    "tomatoes",
    "cookies",
    "cupcakes",
    "muffins",
    "pancakes",
    "biscuits",
    "candies",
    "lollipops",
    "marbles",
    "buttons",
    "beads",
    "stickers",
    "stamps",
    "coins",
    "shells",
    "pebbles",
    "feathers",
    "crayons",
    "pencils",
    "markers",
    "erasers",
    "notebooks",
    "folders",
    "envelopes",
    "postcards",
    "letters",
    "books",
    "comics",
    "magazines",
    "puzzles",
    "blocks",
    "bricks",
    "dolls",
    "robots",
    "kites",
    "balloons",
    "ribbons",
    "flowers",
    "roses",
    "tulips",
    "daisies",
    "seeds",
    "acorns",
    "leaves",
    "sticks",
    "candles",
    "lamps",
    "cups",
    "plates",
    "bowls",
    "spoons",
    "forks",
    "napkins",
    "towels",
    "socks",
    "shirts",
    "hats",
    "scarves",
    "gloves",
    "boots",
    "rings",
    "bracelets",
    "necklaces",
    "badges",
    "tickets",
    "cards",
    "bottles",
    "jars",
    "boxes",
    "baskets",
    "buckets",
    "bags",
    "tokens",
    "batteries",
    "bolts",
    "screws",
    "nails",
    "hammers",
    "brushes",
    "paints",
    "ladders",
    "tents",
    "rafts",
    "boats",
    "trucks",
    "bikes",
    "wagons",
    "tires",
    "chairs",
    "tables",
    "shelves",
    "pillows",
    "blankets",
    "quilts",
    "rugs",
    "sandwiches",
    "pies",
    "cakes",
    "tarts",
    "bagels",
    "pretzels",
    "waffles",
    "donuts",
]
ADJECTIVES = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "small",
    "large",
    "shiny",
    "old",
    "new",
    "tiny",
    "heavy",
    "soft",
    "striped",
    "wooden",
    "golden",
    "silver",
    "spotted",
    "bright",
]
PLACES = [
    "at the market",
    "at school",
    "in the garden",
    "at the park",
    "in the kitchen",
    "at the library",
    "at the fair",
    "in the attic",
    "at the beach",
    "at the bakery",
    "in the shop",
    "at the farm",
    "in the yard",
    "at the museum",
    "at the station",
    "at the harbor",
    "in the forest",
    "at the zoo",
    "in the village",
    "at the camp",
]
TIMES = [
    "On Monday",
    "On Tuesday",
    "On Wednesday",
    "On Thursday",
    "On Friday",
    "On Saturday",
    "On Sunday",
    "In the morning",
    "In the evening",
    "At noon",
    "Last week",
    "Yesterday",
    "Today",
    "After lunch",
    "Before dinner",
]
# Town names are drawn from syllables: thousands of distinct proper nouns, so the BPE vocabulary
# grows into the thousands the way a real tokenizer's long tail of names does.
SYLLABLES = [
    "ka",
    "ri",
    "mon",
    "bel",
    "ora",
    "sta",
    "vin",
    "del",
    "tor",
    "an",
    "lis",
    "ber",
    "gen",
    "wood",
    "ham",
    "ford",
    "mar",
    "quin",
    "zel",
    "dor",
    "ath",
    "el",
    "fi",
    "gar",
    "hol",
    "ith",
    "jas",
    "ken",
    "lu",
    "mir",
    "nor",
    "ol",
    "pen",
    "qua",
    "ros",
    "sil",
    "tam",
    "ul",
    "ver",
    "wes",
    "xan",
    "yor",
    "zan",
    "bra",
    "cle",
    "dra",
    "fen",
    "gro",
    "hil",
    "ivo",
    "jun",
    "kal",
    "lem",
    "mo",
    "nes",
    "osk",
    "pra",
    "rim",
    "sel",
    "tul",
    "una",
    "vor",
    "wil",
    "ex",
    "ya",
    "zo",
]
ADD_VERBS = ["buys", "finds", "gets", "collects", "receives", "picks", "makes", "wins"]
SUB_VERBS = ["gives away", "sells", "loses", "eats", "uses", "donates", "trades", "breaks"]

STYLES = ("direct", "equation", "swapped", "decomposed", "restated")
# The warm start's mix of solution paths: the short ones dominate, so the longer paths (the
# decomposed one is the easiest to get right) start as low-probability continuations.
STYLE_WEIGHTS = (0.35, 0.25, 0.1, 0.15, 0.15)
CLOSINGS = ("\\boxed{{{c}}}", "The answer is \\boxed{{{c}}}.", "So \\boxed{{{c}}}.")

MIN_OPERAND = 10
MAX_OPERAND = 99
# One bucket in EVAL_BUCKETS of the arithmetic (a, op, b) is held out for evaluation.
EVAL_BUCKETS = 8


@dataclass(frozen=True)
class WordProblem:
    prompt: str
    answer: str
    a: int
    op: str
    b: int
    name: str
    obj: str


def split_of(a: int, op: str, b: int) -> str:
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0 else "train"


def draw_problem(rng: random.Random) -> WordProblem:
    op = rng.choice("+-")
    a = rng.randint(MIN_OPERAND, MAX_OPERAND)
    b = rng.randint(MIN_OPERAND, MAX_OPERAND)
    if op == "-" and b > a:
        a, b = b, a
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    adjective = rng.choice(ADJECTIVES)
    town = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    place = f"{rng.choice(PLACES)} in {town}"
    time = rng.choice(TIMES)
    pronoun = PRONOUNS[name]
    if op == "+":
        verb = rng.choice(ADD_VERBS)
        story = rng.choice(
            (
                f"{name} has {a} {adjective} {obj} {place}. {time}, {pronoun.lower()} {verb} "
                f"{b} more. How many {obj} does {name} have now?",
                f"{time}, {name} {verb} {a} {obj} {place} and {other} {verb} {b} {obj}. How "
                f"many {obj} do they have together?",
                f"There are {a} {adjective} {obj} {place}. {other} brings {b} more. How many "
                f"{obj} are there now?",
            )
        )
        answer = a + b
    else:
        verb = rng.choice(SUB_VERBS)
        story = rng.choice(
            (
                f"{name} has {a} {adjective} {obj} {place}. {time}, {pronoun.lower()} {verb} "
                f"{b} of them. How many {obj} does {name} have left?",
                f"There are {a} {obj} {place}. {other} takes {b} {obj}. How many {obj} are left?",
                f"{time}, {name} had {a} {obj} and {verb} {b}. How many {obj} are left?",
            )
        )
        answer = a - b
    return WordProblem(story + "\n", str(answer), a, op, b, name, obj)


def problems(split: str, num: int, seed: int) -> list[WordProblem]:
    """``num`` problems of ``split`` with distinct arithmetic (a, op, b) within the list."""
    rng = random.Random(f"study/{split}/{seed}")
    out: list[WordProblem] = []
    seen: set[tuple[int, str, int]] = set()
    while len(out) < num:
        p = draw_problem(rng)
        key = (p.a, p.op, p.b)
        if split_of(*key) != split or (split == "eval" and key in seen):
            continue
        seen.add(key)
        out.append(p)
    return out


def demonstration(problem: WordProblem, style: str, rng: random.Random) -> str:
    """One valid solution of ``problem`` written in ``style`` (see the module docstring)."""
    a, b, c = problem.a, problem.b, int(problem.answer)
    closing = rng.choice(CLOSINGS).format(c=c)
    sign = problem.op
    if style == "direct":
        return f"\\boxed{{{c}}}"
    if style == "equation":
        return f"{a} {sign} {b} = {c}. {closing}"
    if style == "swapped":
        if sign == "+":
            return f"{b} + {a} = {c}, so {closing}"
        return f"{c} + {b} = {a}, so {a} - {b} = {c}. {closing}"
    if style == "decomposed":
        if sign == "+":
            tens, units = (a // 10 + b // 10) * 10, a % 10 + b % 10
            return (
                f"{a // 10 * 10} + {b // 10 * 10} = {tens}, {a % 10} + {b % 10} = {units}, "
                f"{tens} + {units} = {c}. {closing}"
            )
        middle = a - b // 10 * 10
        return f"{a} - {b // 10 * 10} = {middle}, {middle} - {b % 10} = {c}. {closing}"
    if style == "restated":
        more = "more" if sign == "+" else "fewer"
        return (
            f"{problem.name} has {a} {problem.obj} and {b} {more}: {a} {sign} {b} = {c}. {closing}"
        )
    raise ValueError(f"unknown style {style!r}")


def draw_style(rng: random.Random) -> str:
    return rng.choices(STYLES, weights=STYLE_WEIGHTS)[0]


_FIRST_EQUATION = re.compile(r"\d+ [+-] \d+ = \d+(, so|\.|,)")


def style_of(text: str) -> str:
    """Which solution path a completion took, by its shape ("other" if none fits)."""
    text = text.strip()
    if text.startswith("\\boxed"):
        return "direct"
    if text[:1].isalpha() and not text.startswith(("The answer", "So ")):
        return "restated"
    first = _FIRST_EQUATION.match(text)
    if first is None:
        return "other"
    separator, equations = first.group(1), text.count("=")
    if separator == ", so":
        return "swapped"
    if separator == "," and equations >= 2:
        return "decomposed"
    if separator == "." and equations == 1:
        return "equation"
    return "other"
