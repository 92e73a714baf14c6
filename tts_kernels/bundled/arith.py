"""The bundled task: multi-step arithmetic word problems with step-by-step solutions.

A problem is a start value and a chain of additions and subtractions told as a short
story; its solution writes one equation per operation, steps separated by a blank
line, and ends with ``The answer is N``::

    Ava has 12 pens. Ava buys 7 more. Ava gives 5 away. How many pens does Ava have now?

    12 + 7 = 19

    19 - 5 = 14

    The answer is 14

Difficulty is the number of operations (``num_ops``) and the largest operand
(``max_operand``); :data:`LEVELS` names five settings from easy to hard.

Splits are disjoint by construction: a problem belongs to ``"test"`` when a hash of
its question text falls in a fixed fifth of the hash space, else to ``"train"``, and
each split's generator only yields its own problems. The same seed gives the same
problems on every machine (``random.Random``, no global state).

:func:`check_steps` labels every step of any solution text automatically: a step is
good when it and every step before it are right (the equation's left operand is the
running value, its operator and right operand are the problem's next operation, its
result is the true result; the final step states the true answer). That is the
Math-Shepherd hard label under a perfect completer: a prefix is good iff a correct
continuation of it reaches the right answer.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

STEP_DELIMITER = "\n\n"

NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ian", "Jo", "Kai", "Lea", "Max", "Nia",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = ("apples", "pens", "coins", "stamps", "marbles", "books", "shells", "cards", "beads", "cookies")
ADD = ("{name} buys {n} more.", "{name} finds {n} more.", "{name} gets {n} more.", "{name} wins {n} more.")
SUB = ("{name} gives {n} away.", "{name} loses {n}.", "{name} sells {n}.", "{name} eats {n}.")

# level -> (num_ops, max_operand)
LEVELS = {1: (2, 9), 2: (3, 20), 3: (3, 50), 4: (4, 50), 5: (5, 99)}

_TEST_FRACTION = 5  # one problem in five (by hash of its question) is a test problem
_EQ = re.compile(r"^\s*(\d+) ([+-]) (\d+) = (\d+)\s*$")
_ANS = re.compile(r"^\s*The answer is (\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    """One problem: ``question`` (the prompt text), ``start`` value, ``ops`` as ``(sign, operand)``."""

    question: str
    start: int
    ops: tuple[tuple[str, int], ...]
    level: int = 0

    @property
    def values(self) -> list[int]:
        """Running values: the start, then after each operation."""
        out = [self.start]
        for sign, n in self.ops:
            out.append(out[-1] + n if sign == "+" else out[-1] - n)
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def prompt(self) -> str:
        """What the policy and the PRM see before the solution."""
        return self.question + STEP_DELIMITER

    @property
    def steps(self) -> list[str]:
        """The reference solution's steps (without separators)."""
        v = self.values
        eqs = [f"{v[i]} {s} {n} = {v[i + 1]}" for i, (s, n) in enumerate(self.ops)]
        return eqs + [f"The answer is {self.answer}"]

    @property
    def solution(self) -> str:
        return STEP_DELIMITER.join(self.steps)

    @property
    def split(self) -> str:
        return split_of(self.question)

    @property
    def id(self) -> str:
        return hashlib.sha1(self.question.encode()).hexdigest()[:12]


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``: fixed by a hash of the question text, so the splits never share a problem."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "little")
    return "test" if h % _TEST_FRACTION == 0 else "train"


def make_problem(rng: random.Random, num_ops: int, max_operand: int, level: int = 0) -> Problem:
    """One random problem with ``num_ops`` operations and operands in ``1..max_operand``
    (running values never go below zero)."""
    if not isinstance(num_ops, int) or num_ops < 1:
        raise ValueError(f"num_ops must be an int >= 1, got {num_ops!r}")
    if not isinstance(max_operand, int) or max_operand < 1:
        raise ValueError(f"max_operand must be an int >= 1, got {max_operand!r}")
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(1, max_operand)
    value, ops, text = start, [], [f"{name} has {start} {item}."]
    for _ in range(num_ops):
        sign = "+" if value == 0 or rng.random() < 0.5 else "-"
        n = rng.randint(1, max_operand if sign == "+" else min(max_operand, value))
        value = value + n if sign == "+" else value - n
        ops.append((sign, n))
        text.append(rng.choice(ADD if sign == "+" else SUB).format(name=name, n=n))
    text.append(f"How many {item} does {name} have now?")
    return Problem(question=" ".join(text), start=start, ops=tuple(ops), level=level)


def generate(n: int, *, seed: int, split: str = "train", levels=tuple(LEVELS)) -> list[Problem]:
    """``n`` distinct problems of ``split`` (``"train"``/``"test"``), levels drawn uniformly from ``levels``.

    Deterministic in ``seed``; the two splits never share a question."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of {sorted(LEVELS)}, got {levels!r}")
    rng = random.Random(f"tts-arith/{split}/{seed}")
    out, seen = [], set()
    while len(out) < n:
        lv = rng.choice(tuple(levels))
        p = make_problem(rng, *LEVELS[lv], level=lv)
        if p.split == split and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def check_steps(problem: Problem, solution: str) -> list[bool]:
    """Automatic per-step labels of ``solution`` (any text, e.g. a sampled one): step ``k`` is good
    iff steps ``1..k`` are all right (see the module docstring). Steps are split on blank lines;
    a step after the final answer, or a missing or extra equation, is bad."""
    steps = [s for s in solution.split(STEP_DELIMITER) if s.strip()]
    values = problem.values
    labels, ok = [], True
    for k, step in enumerate(steps):
        if ok:
            if k < len(problem.ops):
                m = _EQ.match(step)
                sign, n = problem.ops[k]
                ok = bool(m) and (int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))) == (
                    values[k], sign, n, values[k + 1])
            else:
                m = _ANS.match(step)
                ok = k == len(problem.ops) and bool(m) and int(m.group(1)) == problem.answer
        labels.append(ok)
    return labels


def grade(prediction: str | None, problem: Problem) -> bool:
    """Exact integer compare of an extracted answer with the problem's answer."""
    if prediction is None:
        return False
    try:
        return int(str(prediction).strip()) == problem.answer
    except ValueError:
        return False


# ---------------------------------------------------------------- thinking solutions (the thinking policy)

THINK_OPEN = "<think>\n"  # the thinking policy's prompt ends with it: generation starts inside the thinking span
THINK_END = "</think>"
WAIT = "Wait"


def thinking_prompt(problem: Problem) -> str:
    """What the thinking policy reads: the question, a blank line, and the opened thinking span."""
    return problem.prompt + THINK_OPEN


def _apply(a: int, sign: str, n: int) -> int:
    return a + n if sign == "+" else a - n


def thinking_solution(problem: Problem, rng: random.Random, *, slip: float = 0.15, check: float = 0.4,
                      again: float = 0.3) -> tuple[str, list[tuple[int, int]]]:
    """A solution with a thinking span, and the character spans of the slips in it (to be left out of a
    training loss: the model should see slips, not learn to make them).

    Thinking: one equation per line, each result off by 1-3 with probability ``slip`` (later lines
    carry on from what was written). Then, with probability ``check`` (whatever the slips), ``Wait`` and a
    check pass: each equation checked by its inverse (``check 12 + 7 = 19: 19 - 7 = 12 ok``) until the
    first one that fails (``... = 13 no, 12 + 7 = 19``), after which the rest is recomputed; with
    probability ``again`` one more ``Wait`` and check pass (all ok by then). ``</think>``, a blank line,
    and the answer: the last value the thinking holds (wrong when a slip went unchecked)::

        Ava has 12 pens. Ava buys 7 more. How many pens does Ava have now?

        <think>
        12 + 7 = 20
        Wait
        check 12 + 7 = 20: 20 - 7 = 13 no, 12 + 7 = 19
        </think>

        The answer is 19
    """
    text, spans = [], []
    n_chars = 0

    def put(s: str) -> None:
        nonlocal n_chars
        text.append(s)
        n_chars += len(s)

    chain, v = [], problem.start
    for sign, n in problem.ops:
        a, true = v, _apply(v, sign, n)
        w = true
        offs = [d for d in (-3, -2, -1, 1, 2, 3) if true + d >= 0]
        if rng.random() < slip and offs:
            w = true + rng.choice(offs)
        head = f"{a} {sign} {n} = "
        put(head)
        if w != true:
            spans.append((n_chars, n_chars + len(str(w))))
        put(f"{w}\n")
        chain.append((a, sign, n, w))
        v = w
    passes = 0
    while rng.random() < (check if passes == 0 else again) and passes < 2:
        passes += 1
        put(f"{WAIT}\n")
        fixed, out, v = False, [], problem.start if chain else 0
        for a, sign, n, w in chain:
            if fixed:
                w2 = _apply(v, sign, n)
                put(f"{v} {sign} {n} = {w2}\n")
                out.append((v, sign, n, w2))
                v = w2
                continue
            inv = "-" if sign == "+" else "+"
            back = _apply(w, inv, n)
            if back == a:
                put(f"check {a} {sign} {n} = {w}: {w} {inv} {n} = {a} ok\n")
                out.append((a, sign, n, w))
                v = w
            else:
                true = _apply(a, sign, n)
                put(f"check {a} {sign} {n} = {w}: {w} {inv} {n} = {back} no, {a} {sign} {n} = {true}\n")
                out.append((a, sign, n, true))
                v, fixed = true, True
        chain = out
    put(f"{THINK_END}{STEP_DELIMITER}The answer is {chain[-1][3]}")
    return "".join(text), spans
