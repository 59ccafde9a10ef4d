"""Synthetic tasks, checked by an independent oracle: prompts are parsed here and the
answers recomputed with Python's own integer arithmetic and an `ast` evaluator."""
import ast
import collections
import operator
import re
from fractions import Fraction

import pytest

from deepseek_jax.data.synthetic import make_problem, make_problems, render_sft, render_text, shows_reasoning
from deepseek_jax.data.tokenizer import ByteTokenizer

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
            ast.Div: operator.truediv}
_ARITH_PROMPT = re.compile(r"Compute (\d+)([+\-*])(\d+)\.")
_CHAIN_PROMPT = re.compile(r"Compute (\d+(?:[+\-]\d+){2,})\.")
_COUNTDOWN_PROMPT = re.compile(r"Use ((?:\d+ )+)to make (\d+)\.")
_STEP = re.compile(r"(-?\d+)((?:[+\-*]\d+)+)=(-?\d+)")


def _eval_countdown(expr):
    """(value, literals) of an expression of + - * / and integers; every intermediate
    result must be an integer (exact integer arithmetic)."""
    literals = []

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            value = _AST_OPS[type(node.op)](walk(node.left), walk(node.right))
            assert value.denominator == 1, f"non-integer intermediate in {expr}"
            return value
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise AssertionError(f"unexpected syntax {ast.dump(node)} in {expr}")

    return walk(ast.parse(expr, mode="eval").body), literals


def _independent_key(problem):
    """Canonical identity recomputed from the prompt alone."""
    m = _ARITH_PROMPT.fullmatch(problem["prompt"])
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        if op in "+*":
            a, b = min(a, b), max(a, b)
        return ("arithmetic", a, op, b)
    m = _CHAIN_PROMPT.fullmatch(problem["prompt"])
    if m:  # a +/- chain is the same problem in any order of its signed terms
        return ("chain", tuple(sorted(int(t) for t in re.findall(r"[+\-]?\d+", m[1]))))
    m = _COUNTDOWN_PROMPT.fullmatch(problem["prompt"])
    return ("countdown", tuple(sorted(map(int, m[1].split()))), int(m[2]))


@pytest.mark.parametrize("digits", [1, (2, 4), 5])
def test_arithmetic_answers_and_steps(digits):
    for p in make_problems("train", 400, seed=11, task="arithmetic", digits=digits):
        a, op, b = _ARITH_PROMPT.fullmatch(p["prompt"]).groups()
        lo, hi = (digits, digits) if isinstance(digits, int) else digits
        assert lo <= len(a) <= hi and lo <= len(b) <= hi
        expected = _OPS[op](int(a), int(b))
        assert p["answer"] == str(expected) and p["target"] == expected
        assert p["numbers"] == [] and p["task"] == "arithmetic"
        # Every worked step is true arithmetic, and the last one reaches the answer.
        steps = [s.strip() for s in p["reasoning"].split(",")]
        for step in steps:
            first, rest, rhs = _STEP.fullmatch(step).groups()
            value = int(first)
            for sym, num in re.findall(r"([+\-*])(\d+)", rest):
                value = _OPS[sym](value, int(num))
            assert value == int(rhs), step
        assert int(steps[-1].split("=")[-1]) == expected


def test_chains_evaluate_left_to_right_with_true_place_value_steps():
    problems = make_problems("train", 600, seed=4, task="arithmetic", digits=(1, 2), ops="+-", terms=(3, 4))
    assert collections.Counter(len(re.findall(r"\d+", p["prompt"])) for p in problems).keys() == {3, 4}
    for p in problems:
        expression = _CHAIN_PROMPT.fullmatch(p["prompt"])[1]
        expected = eval(expression)  # the prompt's own text, + and - of integer literals
        assert p["answer"] == str(expected) and p["target"] == expected
        steps = [s.strip() for s in p["reasoning"].split(",")]
        value = int(re.match(r"\d+", expression)[0])
        for step in steps:  # each step adds one place of the next operand to the running value
            first, rest, rhs = _STEP.fullmatch(step).groups()
            assert int(first) == value and len(re.sub(r"0+$", "", rest[1:])) <= 1, step
            value = _OPS[rest[0]](value, int(rest[1:]))
            assert value == int(rhs), step
        assert value == expected
    # Chains have their own held-out split, closed under reordering the signed terms.
    heldout = {_independent_key(p) for p in make_problems(
        "heldout", 300, seed=1, task="arithmetic", digits=1, ops="+-", terms=3)}
    train = {_independent_key(p) for p in make_problems(
        "train", 3000, seed=2, task="arithmetic", digits=1, ops="+-", terms=3)}
    assert heldout and train.isdisjoint(heldout)


def test_countdown_solutions_use_each_number_once_and_hit_target():
    problems = make_problems("train", 1500, seed=5, task="countdown")
    sizes = collections.Counter(len(p["numbers"]) for p in problems)
    assert set(sizes) == {3, 4}
    for p in problems:
        numbers = list(map(int, _COUNTDOWN_PROMPT.fullmatch(p["prompt"])[1].split()))
        assert numbers == p["numbers"]
        assert int(_COUNTDOWN_PROMPT.fullmatch(p["prompt"])[2]) == p["target"]
        value, literals = _eval_countdown(p["answer"])
        assert value == p["target"] and 1 <= p["target"] <= 200
        assert sorted(literals) == sorted(numbers), p
        assert all(1 <= n <= 20 for n in numbers)


def test_heldout_never_overlaps_train_whatever_the_seeds():
    # One-digit arithmetic has only 10*10*3 problems, so thousands of draws cover both
    # splits almost completely: any leak would show.
    small = dict(digits=1, countdown_count=3, max_number=6, max_target=30)
    train = {_independent_key(p)
             for seed in (0, 1) for p in make_problems("train", 2000, seed=seed, **small)}
    heldout = {_independent_key(p)
               for seed in (0, 9) for p in make_problems("heldout", 1000, seed=seed, **small)}
    assert train.isdisjoint(heldout)
    assert len(heldout) > 50  # the held-out split is real, not a handful of problems
    # Commutative operands count as one problem: b+a is held out exactly when a+b is.
    default_heldout = {_independent_key(p) for p in make_problems("heldout", 1000, seed=3)}
    assert default_heldout.isdisjoint(
        {_independent_key(p) for p in make_problems("train", 2000, seed=4)}
    )


def test_split_fraction_is_about_ten_percent():
    # One-digit operands give 210 canonical problems (55 sums, 100 differences,
    # 55 products); these draws enumerate both splits, so their sizes give the fraction.
    one_digit = dict(task="arithmetic", digits=1)
    train_keys = {_independent_key(p) for p in make_problems("train", 3000, **one_digit)}
    heldout_keys = {_independent_key(p) for p in make_problems("heldout", 600, **one_digit)}
    total = len(train_keys) + len(heldout_keys)
    assert 0.03 < len(heldout_keys) / total < 0.2


def test_problems_are_deterministic_by_seed_and_index():
    assert make_problems("train", 50, seed=3) == make_problems("train", 50, seed=3)
    assert make_problems("train", 50, seed=3) != make_problems("train", 50, seed=4)
    assert make_problem(17, seed=3) == make_problems("train", 18, seed=3)[17]


def test_renderings():
    tok = ByteTokenizer()
    for p in make_problems("train", 500, seed=2):
        text = render_text(p)
        assert text.startswith(p["prompt"] + " ") and text.endswith(p["answer"])
        pair = render_sft(p)
        assert pair["prompt"] == p["prompt"]
        m = re.fullmatch(r"<think>([^<>]+)</think><answer>([^<>]+)</answer>", pair["response"])
        assert m and m[2] == p["answer"]
        # Short enough for the tiny models' 128-token context, bos and eos included.
        ids = tok.encode(pair["prompt"] + pair["response"], add_bos=True, add_eos=True)
        assert len(ids) <= 128 and len(tok.encode(text)) <= 128


def test_answer_only_renderings_drop_exactly_the_worked_solution():
    for p in make_problems("train", 50, seed=5, task="mixed"):
        assert render_text(p, reasoning=False) == f"{p['prompt']} Answer: {p['answer']}"
        worked, bare = render_sft(p)["response"], render_sft(p, reasoning=False)["response"]
        assert bare == f"<think></think><answer>{p['answer']}</answer>"
        assert worked.replace(p["reasoning"], "", 1) == bare


def test_shows_reasoning_hits_the_fraction_deterministically():
    n = 4000
    for fraction in (0.0, 0.25, 0.75, 1.0):
        shown = [shows_reasoning(i, split="train", seed=1, answer_only_fraction=fraction) for i in range(n)]
        assert shown == [shows_reasoning(i, split="train", seed=1, answer_only_fraction=fraction)
                         for i in range(n)]
        # Binomial standard deviation at n = 4000 is <= 0.8 points; 3 points is ~4 sigma.
        assert abs((n - sum(shown)) / n - fraction) < 0.03
    with pytest.raises(ValueError, match="answer_only_fraction"):
        shows_reasoning(0, split="train", seed=0, answer_only_fraction=1.5)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="split"):
        make_problem(0, split="test")
    with pytest.raises(ValueError, match="task"):
        make_problem(0, task="sudoku")
    with pytest.raises(ValueError, match="ops"):
        make_problem(0, ops="/")
    with pytest.raises(ValueError, match="terms"):
        make_problem(0, terms=1)
    with pytest.raises(ValueError, match=r"ops from '\+-'"):
        make_problem(0, task="arithmetic", ops="+*", terms=3)
    with pytest.raises(ValueError, match="Countdown needs"):
        make_problem(0, task="countdown", countdown_count=1)
