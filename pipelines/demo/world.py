"""The small, regular language of the built-in demo corpus, and its generators.

Every generator draws from a seeded ``random.Random`` and returns ``(key, text)``; the key names
the underlying fact (an arithmetic triple, a story's parameters), so the corpus can hold out a
fixed set of keys for evaluation and keep every other key for training (see ``is_heldout``).
The language is small on purpose: ~100 words, two-digit numbers with one digit per token
(the demo tokenizer splits digits), a few sentence and code templates. A model of a few million
parameters picks up its grammar within minutes and then its arithmetic and counting, which is
what the eval sets measure.
"""

from __future__ import annotations

import hashlib
import random

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
         "mia", "nina", "oscar", "peggy", "rupert", "sybil", "trent", "uma", "victor", "wendy")
OBJECTS = ("apple", "pear", "plum", "egg", "cup", "book", "pen", "ball", "hat", "key", "coin", "shell")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
ANIMALS = ("cat", "dog", "fox", "owl", "hen", "cow", "pig", "duck")
PLACES = ("park", "barn", "lake", "market", "garden", "school", "kitchen", "forest")
ACTIONS = ("sleeps", "runs", "sings", "eats", "jumps", "hides")

# Arithmetic ranges: + and - on 0..99 (- never goes below 0), * on 0..12.
ADD_MAX, MUL_MAX = 99, 12
HELDOUT_PERCENT = 10


def stable_hash(*parts: object) -> int:
    """A hash that is the same in every process (Python's ``hash`` of str is salted)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def is_heldout(key: tuple) -> bool:
    """About 10% of all keys belong to evaluation only; the rest may appear in training."""
    return stable_hash("heldout", *key) % 100 < HELDOUT_PERCENT


def arithmetic_key(op: str, a: int, b: int) -> tuple:
    # + and * are commutative: 3+4 and 4+3 are one fact, held out (or not) together.
    if op in "+*":
        a, b = min(a, b), max(a, b)
    return ("arith", op, a, b)


def evaluate(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def draw_arithmetic(rng: random.Random) -> tuple[str, int, int]:
    op = rng.choice("++--*")
    if op == "*":
        return op, rng.randint(0, MUL_MAX), rng.randint(0, MUL_MAX)
    a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
    return (op, max(a, b), min(a, b)) if op == "-" else (op, a, b)


def plural(word: str, count: int) -> str:
    return word if count == 1 else word + "s"


# ---------------------------------------------------------------- text


def counting_story(rng: random.Random) -> tuple[tuple, str, dict]:
    """``alice has 3 pens. alice gets 2 more pens. now alice has 5 pens.`` (or gives some away).
    Returns (key, text, parts) where parts splits the text before the final count."""
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(OBJECTS)
    start = rng.randint(1, 15)
    gives = rng.random() < 0.5 and start > 1
    change = rng.randint(1, start - 1) if gives else rng.randint(1, 9)
    final = start - change if gives else start + change
    middle = (f"{name} gives {change} {plural(thing, change)} to {other}." if gives
              else f"{name} gets {change} more {plural(thing, change)}.")
    prefix = f"{name} has {start} {plural(thing, start)}. {middle} now {name} has "
    # ``other`` appears in the text only when something is given away; the key holds what the text holds.
    key = ("count", name, other if gives else None, thing, start, change, gives)
    parts = {"prompt": prefix, "answer": str(final), "arith": arithmetic_key("-" if gives else "+", start, change)}
    return key, f"{prefix}{final} {plural(thing, final)}.", parts


def scene_sentence(rng: random.Random) -> tuple[tuple, str]:
    """``the red fox sleeps in the barn.`` / ``carol sees the red fox in the barn.``

    The key is the scene's fact (who does what where), not the onlooker's name: a held-out fact
    never occurs in training text, so a reading question about it (``reading_question``) can
    only be answered from its passage."""
    color, animal, action, place, name = (rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(ACTIONS),
                                          rng.choice(PLACES), rng.choice(NAMES))
    first = f"the {color} {animal} {action} in the {place}."
    second = f"{name} sees the {color} {animal} in the {place}."
    return scene_key(color, animal, action, place), f"{first} {second}"


def scene_key(color: str, animal: str, action: str, place: str) -> tuple:
    return ("scene", color, animal, action, place)


def reading_question(rng: random.Random) -> tuple[tuple, str, dict]:
    """Reading comprehension, as (key, worked example, parts): ``the red fox sleeps in the barn.
    where does the red fox sleep? in the barn.`` with parts ``passage``, ``question`` and
    ``answer``. The answer is copied out of the passage (one of 8 places, so guessing scores
    1/8); the key is the passage's scene fact."""
    color, animal, action, place = rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(ACTIONS), rng.choice(PLACES)
    verb = action[:-1]  # sleeps -> sleep
    parts = {"passage": f"the {color} {animal} {action} in the {place}.",
             "question": f"where does the {color} {animal} {verb}?", "answer": f"in the {place}."}
    return scene_key(color, animal, action, place), " ".join(parts.values()), parts


def walk_sentence(rng: random.Random) -> tuple[tuple, str]:
    name, other = rng.sample(NAMES, 2)
    place, thing = rng.choice(PLACES), rng.choice(OBJECTS)
    return (("walk", name, other, place, thing),
            f"{name} goes to the {place} with {other}. they find a {thing} in the {place}.")


def noisy_text(rng: random.Random) -> tuple[tuple, str]:
    """Low-quality pretraining text (word lists, shouting): present in pretraining, absent
    from the annealing subset, like web text versus curated text."""
    words = rng.choices(NAMES + OBJECTS + COLORS + ANIMALS + PLACES, k=rng.randint(4, 12))
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.upper()
    return ("noise", stable_hash(text)), text


TEXT_GENERATORS = (scene_sentence, walk_sentence)


# ---------------------------------------------------------------- math and code


def equation(op: str, a: int, b: int) -> str:
    return f"{a}{op}{b}={evaluate(op, a, b)}"


def sequence_line(start: int, step: int, length: int) -> str:
    return " ".join(str(start + step * index) for index in range(length))


def draw_sequence(rng: random.Random) -> tuple[tuple, int, int]:
    step = rng.choice((1, 2, 3, 5, 10, -1, -2))
    start = rng.randint(12 if step < 0 else 0, 40)
    return ("seq", start, step), start, step


def code_snippet(rng: random.Random) -> tuple[tuple, str, dict]:
    """A tiny Python program and its printed output, as a comment the model learns to fill."""
    kind = rng.choice(("assign", "function", "loop"))
    if kind == "loop":
        count = rng.randint(1, 7)
        prefix = f"for i in range({count}):\n    print(i)\n# output: "
        answer = " ".join(str(i) for i in range(count))
        return ("code", "loop", count), prefix + answer + "\n", {"prompt": prefix, "answer": answer}
    op, a, b = draw_arithmetic(rng)
    if kind == "assign":
        variable = rng.choice("xyzabn")
        prefix = f"{variable} = {a}\nresult = {variable} {op} {b}\nprint(result)\n# output: "
    else:
        word = {"+": "add", "-": "sub", "*": "mul"}[op]
        prefix = f"def {word}_{b}(x):\n    return x {op} {b}\n\nprint({word}_{b}({a}))\n# output: "
    answer = str(evaluate(op, a, b))
    key = ("code", kind, op, a, b)
    return key, prefix + answer + "\n", {"prompt": prefix, "answer": answer, "arith": arithmetic_key(op, a, b)}


def scramble(text: str, rng: random.Random) -> str:
    """The same words in another order: a distractor a model that knows the grammar rejects."""
    words = text.split(" ")
    for _ in range(10):
        shuffled = rng.sample(words, len(words))
        if shuffled != words:
            return " ".join(shuffled)
    return " ".join(reversed(words))


def count_question(key: tuple, story_prefix: str) -> str:
    """``alice has 3 pens. alice gets 2 more pens. how many pens does alice have now?``"""
    name, thing = key[1], key[3]
    story = story_prefix[: story_prefix.rindex(" now ")]
    return f"{story} how many {plural(thing, 2)} does {name} have now?"
