"""The embedded default corpus: seeded generators of verifiable reasoning tasks.

Small-scale R1 reproductions train on tasks whose answers a program can check
(REFERENCES.md): multi-digit arithmetic and Countdown (reach a target with the given
numbers, each used exactly once, with + - * /). Every problem is a dict

    {"task": "arithmetic" | "countdown",
     "prompt": "Compute 347*29." | "Use 3 5 2 to make 16.",
     "answer": "10063" | "(3+5)*2",
     "numbers": [] | [3, 5, 2],
     "target": 10063 | 16,
     "reasoning": "347*9=3123, 347*20=6940, 3123+6940=10063"}

`reasoning` is the short worked solution used by both renderings:
`render_text` (pretraining: prompt, a space, the worked solution) and `render_sft`
(prompt/response with the response `<think>reasoning</think><answer>ANSWER</answer>`).
Either can leave the reasoning out (`shows_reasoning` picks which records do).

Held-out split. Membership is a property of the problem, not of the generator: a
stable hash of the canonical problem (operands sorted for the commutative + and *,
the sorted numbers and target for Countdown) puts about `HELDOUT_PERCENT` percent of
all problems in "heldout" and the rest in "train". Generation samples and rejects
until the problem falls in the requested split, so train and held-out problems can
never coincide, whatever seeds, sizes or task options either side used.

Problem i of (split, seed, task) depends only on those four values (its own
`random.Random` stream), so a data source can produce any element by index.
"""
from __future__ import annotations

import hashlib
import operator
import random
import re
from fractions import Fraction
from typing import Optional, Union

TASKS = ("arithmetic", "countdown")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10
_MAX_ATTEMPTS = 10_000  # rejection-sampling budget before the options are called too narrow

_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": Fraction}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

DigitRange = Union[int, tuple[int, int]]
_ARITHMETIC_PROMPT = re.compile(r"Compute (\d+(?:[+\-*]\d+)+)\.")


def _as_range(value: DigitRange) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def canonical_key(problem: dict) -> str:
    """The identity of a problem for split membership; order-free where the task is."""
    if problem["task"] == "countdown":
        numbers = ",".join(map(str, sorted(problem["numbers"])))
        return f"countdown:{numbers}->{problem['target']}"
    terms = problem["operands"] if "operands" in problem else _parse_operands(problem["prompt"])
    if len(terms) > 3:
        # A chain of + and -: the multiset of signed terms (47+38-25 is 38+47-25).
        signed = sorted([terms[0]] + [b if op == "+" else -b for op, b in zip(terms[1::2], terms[2::2])])
        return "arithmetic:" + ",".join(map(str, signed))
    a, op, b = terms
    if op in "+*":
        a, b = sorted((a, b))
    return f"arithmetic:{a}{op}{b}"


def _parse_operands(prompt: str) -> tuple:
    """"Compute 47+38-25." -> (47, "+", 38, "-", 25)."""
    match = _ARITHMETIC_PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    parts = re.split(r"([+\-*])", match[1])
    return tuple(part if i % 2 else int(part) for i, part in enumerate(parts))


def split_of(problem: dict) -> str:
    """"heldout" for about HELDOUT_PERCENT% of canonical problems, else "train".

    blake2b rather than hash(): Python's str hash is salted per process, and the
    split must agree across processes, hosts and runs.
    """
    digest = hashlib.blake2b(canonical_key(problem).encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % 100 < HELDOUT_PERCENT else "train"


# ---------------------------------------------------------------- arithmetic


def _random_operand(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _place_parts(n: int) -> list[int]:
    """347 -> [300, 40, 7] (zero digits left out; [0] for 0)."""
    parts = [int(ch) * 10**k for k, ch in enumerate(reversed(str(n))) if ch != "0"]
    return list(reversed(parts)) or [0]


def _arithmetic_reasoning(terms: tuple) -> str:
    """Place-value steps, left to right: add/subtract each operand's parts one at a time;
    multiply by each digit of b and sum the partial products (schoolbook long
    multiplication; two operands only)."""
    if terms[1] == "*":
        a, _, b = terms
        parts = list(reversed(_place_parts(b)))  # lowest place first, as on paper
        partials = [a * p for p in parts]
        steps = [f"{a}*{p}={q}" for p, q in zip(parts, partials)]
        if len(partials) > 1:
            steps.append("+".join(map(str, partials)) + f"={sum(partials)}")
        return ", ".join(steps)
    steps, value = [], terms[0]
    for op, b in zip(terms[1::2], terms[2::2]):
        for part in _place_parts(b):
            new_value = _APPLY[op](value, part)
            steps.append(f"{value}{op}{part}={new_value}")
            value = new_value
    return ", ".join(steps)


def _running_values(chain: tuple) -> list[int]:
    """(47, "+", 38, "-", 25) -> [85, 60]: the value after each operation, left to right."""
    values, value = [], chain[0]
    for op, b in zip(chain[1::2], chain[2::2]):
        value = _APPLY[op](value, b)
        values.append(value)
    return values


def _make_arithmetic(rng: random.Random, digits: tuple[int, int], ops: str, terms: tuple[int, int]) -> dict:
    n = terms[0] if terms[0] == terms[1] else rng.randint(*terms)  # fixed: no draw, as before
    a, b = _random_operand(rng, digits), _random_operand(rng, digits)
    op = rng.choice(ops)
    chain = (a, op, b)
    for _ in range(n - 2):  # more operands: +/- only (checked in make_problem), left to right
        chain += (rng.choice(ops), _random_operand(rng, digits))
    result = _running_values(chain)[-1]
    return {
        "task": "arithmetic",
        "prompt": "Compute " + "".join(map(str, chain)) + ".",
        "answer": str(result),
        "numbers": [],
        "target": result,
        "reasoning": _arithmetic_reasoning(chain),
        "operands": chain,
    }


# ---------------------------------------------------------------- countdown


class _Expr:
    """A node of a Countdown solution tree: a number (op None) or `left op right`."""

    __slots__ = ("value", "op", "left", "right")

    def __init__(self, value: int, op: Optional[str] = None, left=None, right=None):
        self.value, self.op, self.left, self.right = value, op, left, right

    def render(self) -> str:
        if self.op is None:
            return str(self.value)
        prec = _PRECEDENCE[self.op]
        left = self.left.render()
        if self.left.op is not None and _PRECEDENCE[self.left.op] < prec:
            left = f"({left})"
        right = self.right.render()
        # A right operand of equal precedence keeps its parentheses unless the operator
        # is associative and the same: a-(b-c), a/(b*c) and a+(b-c) stay explicit.
        right_prec = None if self.right.op is None else _PRECEDENCE[self.right.op]
        if right_prec is not None and (
            right_prec < prec
            or (right_prec == prec and (self.op in "-/" or self.right.op != self.op))
        ):
            right = f"({right})"
        return f"{left}{self.op}{right}"

    def steps(self) -> list[str]:
        """One `a op b=c` line per operation, in evaluation order."""
        if self.op is None:
            return []
        step = f"{self.left.value}{self.op}{self.right.value}={self.value}"
        return self.left.steps() + self.right.steps() + [step]


def _combine(rng: random.Random, a: _Expr, b: _Expr) -> _Expr:
    """A random operation on a and b whose result is a positive integer ("+" always
    qualifies, so there is one).

    Positive integer intermediates keep the worked steps readable and make the task
    the classic one: exact integer arithmetic, division only when it divides evenly.
    """
    for op in rng.sample("+-*/", 4):
        x, y = (a, b) if op in "+*" or a.value >= b.value else (b, a)
        if op == "-" and x.value == y.value:
            continue
        if op == "/" and x.value % y.value:
            continue
        return _Expr(int(_APPLY[op](x.value, y.value)), op, x, y)
    raise AssertionError("unreachable: a + b of positive integers is always allowed")


def _make_countdown(
    rng: random.Random, count: tuple[int, int], max_number: int, max_target: int
) -> dict:
    for _ in range(_MAX_ATTEMPTS):
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(*count))]
        pool = [_Expr(n) for n in numbers]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            combined = _combine(rng, pool[i], pool[j])
            pool = [e for k, e in enumerate(pool) if k not in (i, j)] + [combined]
        if pool[0].value > max_target:
            continue
        tree = pool[0]
        rng.shuffle(numbers)  # the prompt order must not give away the solution order
        return {
            "task": "countdown",
            "prompt": f"Use {' '.join(map(str, numbers))} to make {tree.value}.",
            "answer": tree.render(),
            "numbers": numbers,
            "target": tree.value,
            "reasoning": ", ".join(tree.steps()),
        }
    raise ValueError(
        f"no Countdown problem with {count} numbers in 1..{max_number} reaches a target "
        f"<= {max_target} often enough; raise max_target"
    )


# ---------------------------------------------------------------- public API


def make_problem(
    index: int,
    *,
    split: str = "train",
    seed: int = 0,
    task: str = "mixed",
    digits: DigitRange = (1, 3),
    ops: str = "+-*",
    terms: DigitRange = 2,
    value_range: Optional[tuple[int, int]] = None,
    countdown_count: DigitRange = (3, 4),
    max_number: int = 20,
    max_target: int = 200,
) -> dict:
    """Problem number `index` of the stream (split, seed, task, options).

    Args:
      split: "train" or "heldout" (see the module docstring).
      task: "arithmetic", "countdown" or "mixed" (each problem picks one, evenly).
      digits: digits per arithmetic operand, an int or an inclusive (min, max) range.
      ops: arithmetic operators to draw from, a subset of "+-*".
      terms: operands per arithmetic problem, an int or (min, max) range; more than two
        ("Compute 47+38-25.", evaluated left to right) only with ops from "+-".
      value_range: (lo, hi), inclusive: arithmetic problems whose running values (after each
        operation, the answer included) leave it are redrawn. None: no constraint.
      countdown_count: how many numbers a Countdown problem gives, int or (min, max).
      max_number: Countdown numbers are drawn from 1..max_number.
      max_target: Countdown targets are in 1..max_target.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if task not in TASKS + ("mixed",):
        raise ValueError(f"task must be one of {TASKS + ('mixed',)}, got {task!r}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
    n_terms = _as_range(terms)
    if n_terms[0] < 2 or n_terms[0] > n_terms[1]:
        raise ValueError(f"terms must be >= 2 operands (an int or a (min, max) range), got {terms!r}")
    if n_terms[1] > 2 and "*" in ops:
        raise ValueError(f"terms={terms!r} chains more than two operands, which needs ops from '+-' "
                         f"(no precedence rules); got ops={ops!r}")
    # A string seed is hashed deterministically by random.Random (version 2).
    count = _as_range(countdown_count)
    if count[0] < 2 or max_number < 1 or max_target < 1:
        raise ValueError(
            f"Countdown needs >= 2 numbers, max_number >= 1 and max_target >= 1; got "
            f"countdown_count={countdown_count}, max_number={max_number}, max_target={max_target}"
        )
    rng = random.Random(f"{seed}/{split}/{task}/{index}")
    for _ in range(_MAX_ATTEMPTS):
        kind = rng.choice(TASKS) if task == "mixed" else task
        if kind == "arithmetic":
            problem = _make_arithmetic(rng, _as_range(digits), ops, n_terms)
        else:
            problem = _make_countdown(rng, count, max_number, max_target)
        if value_range is not None and kind == "arithmetic" and not all(
                value_range[0] <= v <= value_range[1] for v in _running_values(problem["operands"])):
            continue
        if split_of(problem) == split:
            problem.pop("operands", None)
            return problem
    raise ValueError(
        f"found no {split!r} problem in {_MAX_ATTEMPTS} draws: the options allow too few "
        "distinct problems for this split; widen digits or the Countdown ranges"
    )


def make_problems(
    split: str = "train", n: int = 1000, seed: int = 0, task: str = "mixed", **options
) -> list[dict]:
    """The first n problems of `make_problem`'s stream; options as there."""
    return [make_problem(i, split=split, seed=seed, task=task, **options) for i in range(n)]


def render_text(problem: dict, reasoning: bool = True) -> str:
    """Pretraining text: prompt, a space, the worked solution ending in the answer.

    reasoning=False renders the answer alone ("Compute 47+38. Answer: 85").
    """
    worked = f"{problem['reasoning']}. " if reasoning else ""
    return f"{problem['prompt']} {worked}Answer: {problem['answer']}"


def render_sft(problem: dict, reasoning: bool = True) -> dict:
    """R1-format SFT pair; the loss covers only the response.

    reasoning=False leaves the think block empty: `<think></think><answer>85</answer>`.
    """
    think = problem["reasoning"] if reasoning else ""
    return {
        "prompt": problem["prompt"],
        "response": f"<think>{think}</think><answer>{problem['answer']}</answer>",
    }


def render(problem: dict, style: str, reasoning: bool = True) -> dict:
    """A source record: {"text": ...} for style "text", {"prompt", "response"} for "sft"."""
    if style == "text":
        return {"text": render_text(problem, reasoning)}
    if style == "sft":
        return render_sft(problem, reasoning)
    raise ValueError(f"style must be 'text' or 'sft', got {style!r}")


def shows_reasoning(index: int, *, split: str, seed, answer_only_fraction: float) -> bool:
    """Whether record `index` of a corpus is rendered with its worked solution.

    About `answer_only_fraction` of the records show the answer alone: a corpus of mixed
    answer-only and worked solutions, like real SFT data, from which RL can learn that
    thinking pays (R1-Zero's growing responses; configs/r1_tiny.py). Its own stream, so
    the problems themselves do not depend on the fraction.
    """
    if not 0.0 <= answer_only_fraction <= 1.0:
        raise ValueError(f"answer_only_fraction must be in [0, 1], got {answer_only_fraction!r}")
    return random.Random(f"{seed}/{split}/answer_only/{index}").random() >= answer_only_fraction
