"""Rule-based rewards for R1-style RL (DeepSeek-R1 2501.12948, DAPO 2503.14476).

Every reward has the signature `reward(prompt, completion, **fields) -> float`, where
`fields` is the problem dict of the synthetic generator
(`{"task", "prompt", "answer", "numbers", "target"}`) plus anything the caller adds
(`tests` for code, `length`/`max_len`/`cache_len` for the overlong penalty). Configs
name rewards by string, so they live in the `REWARDS` registry; `score` applies a
weighted set of them to one completion.
`prompt` and `completion` are positional-only, so `reward(p["prompt"], c, **p)` works
with the generator's dict, which has a "prompt" key itself.

Expected completion format: `<think>reasoning</think><answer>ANSWER</answer>`.
Model output is never evaluated with `eval`: countdown equations are parsed with `ast`
against a whitelist, and code runs only in `sandbox.run_sandboxed`, another process.
"""
import ast
import fractions
import importlib
import importlib.util
import logging
import math
import operator
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from deepseek_jax.rl import sandbox

log = logging.getLogger(__name__)

Reward = Callable[..., float]

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BLOCK_RE = re.compile(r"<(think|answer)>(.*?)</\1>", re.DOTALL)
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_INTEGER_RE = re.compile(r"[+-]?[0-9]{1,1000}")  # ASCII only; below int()'s 4300-digit cap
_CODE_RE = re.compile(r"```(?:python|py)[^\n]*\n(.*?)```", re.DOTALL)
# Checked before parsing: no names, attributes, calls, strings or floats can get through.
_EQUATION_CHARS_RE = re.compile(r"[0-9+\-*/()\s]+")
_MAX_EQUATION_CHARS = 256
_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub,
               ast.Mult: operator.mul, ast.Div: operator.truediv}
# Scripts without spaces between words: every character counts as one word.
_UNSPACED_SCRIPTS = frozenset({"CJK", "HIRAGANA", "KATAKANA"})


def extract_answer(completion: str) -> str | None:
    """Text of the LAST `<answer>...</answer>` block, stripped; None if there is none."""
    answers = _ANSWER_RE.findall(completion)
    return answers[-1].strip() if answers else None


def accuracy(prompt: str, completion: str, /, **fields) -> float:
    """1.0 if the last answer solves the problem, else 0.0 (R1's accuracy reward).

    arithmetic: the answer is one integer equal to `answer` (or `target`).
    countdown: a +-*/ equation over integer literals using each of `numbers` exactly
    once whose exact value equals `target`; an optional `= N` must state the target.
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    task = _task(fields)
    if task == "arithmetic":
        expected = fields["answer"] if "answer" in fields else fields["target"]
        return float(_INTEGER_RE.fullmatch(answer) is not None
                     and int(answer) == int(str(expected).strip()))
    return float(countdown_value(answer, fields["numbers"]) == int(fields["target"]))


def countdown_value(equation: str, numbers: Iterable[int]) -> fractions.Fraction | None:
    """Exact value of a countdown equation, or None if it is not a valid one.

    Valid: only integer literals, + - * / and parentheses; every element of `numbers`
    used exactly once (as a multiset); no division by zero; at most one `=`, whose
    right-hand side (if any) is an integer equal to the left-hand value.
    """
    if len(equation) > _MAX_EQUATION_CHARS:
        return None
    lhs, *rhs = equation.split("=")
    if len(rhs) > 1 or (rhs and _INTEGER_RE.fullmatch(rhs[0].strip()) is None):
        return None
    if _EQUATION_CHARS_RE.fullmatch(lhs) is None:
        return None
    try:
        tree = ast.parse(lhs.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    literals = []
    try:
        value = _evaluate(tree.body, literals)
    except (ValueError, ZeroDivisionError):
        return None
    if sorted(literals) != sorted(numbers):
        return None
    if rhs and int(rhs[0]) != value:
        return None
    return value


def _evaluate(node: ast.AST, literals: list[int]) -> fractions.Fraction:
    """Exact value of a whitelisted expression tree; collects its integer literals."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return fractions.Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _evaluate(node.left, literals)
        right = _evaluate(node.right, literals)
        return _BINARY_OPS[type(node.op)](left, right)  # Fraction: exact, x/0 raises
    raise ValueError(f"not allowed in a countdown equation: {ast.dump(node)}")


def format_reward(prompt: str, completion: str, /, **fields) -> float:
    """1.0 for exactly `<think>...</think><answer>...</answer>`, else 0.0 (R1 format).

    Only whitespace may surround or separate the two blocks; each tag appears once; the
    answer is non-empty (the reasoning may be empty).
    """
    # Counting tags first also keeps the regex below from backtracking over repeats.
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(completion.count(tag) != 1 for tag in tags):
        return 0.0
    match = _FORMAT_RE.fullmatch(completion)
    return float(match is not None and bool(match.group(2).strip()))


def countdown(prompt: str, completion: str, /, **fields) -> float:
    """TinyZero-style R1-Zero reward: 1.0 correct, 0.1 well-formatted but wrong, else 0."""
    if accuracy(prompt, completion, **fields) == 1.0:
        return 1.0
    return 0.1 if format_reward(prompt, completion) == 1.0 else 0.0


def language_consistency(prompt: str, completion: str, /, **fields) -> float:
    """Fraction of words in the target script (R1's language-consistency reward).

    The text is the content of the <think>/<answer> blocks (the whole completion if
    there are none), so the ASCII tags themselves do not count. A word is a maximal run
    of letters of one Unicode script; in CJK, Hiragana and Katakana each character is a
    word. Digits, symbols and punctuation are no words. `fields["script"]` names the
    target script(s) by the first word of the Unicode character names ("LATIN"
    (default), "CYRILLIC", "GREEK", "CJK", "HANGUL", ...), as a str or a tuple.
    Text without any word scores 1.0: nothing in it is in another language.
    """
    target = fields.get("script", "LATIN")
    targets = {target.upper()} if isinstance(target, str) else {t.upper() for t in target}
    blocks = _BLOCK_RE.findall(completion)
    text = " ".join(body for _, body in blocks) if blocks else completion
    scripts = _word_scripts(text)
    if not scripts:
        return 1.0
    return sum(s in targets for s in scripts) / len(scripts)


def _word_scripts(text: str) -> list[str]:
    """The script of every word in `text` (see language_consistency)."""
    scripts, previous = [], None
    for ch in text:
        if unicodedata.category(ch).startswith("M"):
            continue  # a combining mark (e.g. a decomposed accent) stays in its word
        if not ch.isalpha():
            previous = None
            continue
        script = unicodedata.name(ch, "UNKNOWN").split()[0]
        if script != previous or script in _UNSPACED_SCRIPTS:
            scripts.append(script)
        previous = script
    return scripts


def code_execution(prompt: str, completion: str, /, **fields) -> float:
    """1.0 if the last ```python block plus `fields["tests"]` exits 0 in the sandbox.

    The code never runs in this process (see sandbox.py). `fields["timeout_s"]`
    (default 5) bounds the wall time. No code block: 0.0.
    """
    if "tests" not in fields:
        raise KeyError("code_execution needs fields['tests'] (test code appended to the "
                       "program, e.g. asserts); pass tests='' to only check that it runs.")
    blocks = _CODE_RE.findall(completion)
    if not blocks:
        return 0.0
    program = f"{blocks[-1]}\n\n{fields['tests']}\n"
    result = sandbox.run_sandboxed(program, timeout_s=fields.get("timeout_s", 5))
    return float(result.ok)


def soft_overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO eq. (13): 0 up to max_len - cache_len, linear down to -1 at max_len, then -1."""
    if cache_len < 0 or cache_len > max_len:
        raise ValueError(f"soft_overlong_penalty needs 0 <= cache_len <= max_len, got "
                         f"cache_len={cache_len}, max_len={max_len}.")
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return ((max_len - cache_len) - length) / cache_len
    return -1.0


def overlong(prompt: str, completion: str, /, **fields) -> float:
    """`soft_overlong_penalty` with `length` (tokens), `max_len`, `cache_len` from fields."""
    missing = [k for k in ("length", "max_len", "cache_len") if k not in fields]
    if missing:
        raise KeyError(f"overlong reward needs fields {missing}: the completion's token "
                       "count and DAPO's L_max and L_cache.")
    return soft_overlong_penalty(fields["length"], fields["max_len"], fields["cache_len"])


REWARDS: dict[str, Reward] = {
    "accuracy": accuracy,
    "format": format_reward,
    "countdown": countdown,
    "language_consistency": language_consistency,
    "code_execution": code_execution,
    "overlong": overlong,
}


def get_reward(name: str) -> Reward:
    """The reward function registered as `name`."""
    if name not in REWARDS:
        raise KeyError(f"Unknown reward {name!r}; known rewards: {sorted(REWARDS)}.")
    return REWARDS[name]


def score(names_with_weights: Mapping[str, float] | Iterable[tuple[str, float]],
          prompt: str, completion: str, /, **fields) -> dict[str, float]:
    """Weighted value of each named reward; their sum is the total reward.

    `names_with_weights`: {"accuracy": 1.0, "format": 0.5} or [("accuracy", 1.0), ...].
    """
    pairs = (names_with_weights.items() if isinstance(names_with_weights, Mapping)
             else names_with_weights)
    return {name: weight * get_reward(name)(prompt, completion, **fields)
            for name, weight in pairs}


def _task(fields: Mapping) -> str:
    task = fields.get("task") or ("countdown" if "numbers" in fields else "arithmetic")
    if task not in ("arithmetic", "countdown"):
        raise ValueError(f"Unknown task {task!r}; accuracy supports 'arithmetic' and "
                         "'countdown'.")
    return task


# ----- user rewards: "NAME=WEIGHT,..." with registry names or import paths ---------------------

class RewardError(RuntimeError):
    """A reward spec that cannot be loaded, or a step where too many reward calls failed."""


def load_reward(name: str) -> Reward:
    """A registry name, `pkg.module:function`, or `path/to/file.py:function`."""
    if name in REWARDS:
        return REWARDS[name]
    target, sep, attr = name.rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(f"reward {name!r} is neither a registry reward {sorted(REWARDS)} nor an import path "
                          "'pkg.module:function' / 'path/to/file.py:function'")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise FileNotFoundError(f"no file {target!r} (relative paths start at {os.getcwd()})")
            spec = importlib.util.spec_from_file_location(
                "_user_reward_" + os.path.basename(target).removesuffix(".py"), target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        fn = getattr(module, attr)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises, name the spec
        raise RewardError(f"reward {name!r}: could not import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise RewardError(f"reward {name!r}: {attr} is a {type(fn).__name__}, not a function "
                          "reward(prompt, completion, **columns) -> float")
    return fn


def parse_reward_spec(spec: str) -> list[tuple[str, float, Reward]]:
    """'accuracy=1.0,my_rewards.py:exact=0.5' -> [(name, weight, function), ...]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, weight = item.rpartition("=")
        if not sep or not name:
            raise RewardError(f"grpo.reward_spec item {item!r}: expected NAME=WEIGHT, e.g. 'accuracy=1.0'")
        try:
            w = float(weight)
        except ValueError:
            raise RewardError(f"grpo.reward_spec item {item!r}: weight {weight!r} is not a number") from None
        out.append((name.strip(), w, load_reward(name.strip())))
    if not out:
        raise RewardError(f"grpo.reward_spec={spec!r} names no reward; e.g. 'accuracy=1.0,format=0.1'")
    return out


class Scorer:
    """Weighted rewards over completions, robust to rewards that fail.

    A call that raises or returns something that is not a finite number scores 0 and is
    counted (`failures`) and logged with its row and completion; a step where more than
    `max_failure_fraction` of the calls fail stops the run (RewardError), since its
    advantages would mostly measure the failures. Rows' keys starting with "_" are ours
    (e.g. "_where", the file:line) and are not passed to rewards.
    """

    def __init__(self, rewards: list[tuple[str, float, Reward]], max_failure_fraction: float = 0.1):
        if not 0.0 <= max_failure_fraction <= 1.0:
            raise ValueError(f"grpo.max_reward_failure_fraction={max_failure_fraction}: use a fraction in [0, 1]")
        self.rewards, self.max_failure_fraction = rewards, max_failure_fraction
        self.failures = 0  # over the run

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.rewards]

    def __call__(self, rows: list, completions: list[str]):
        """({name: [B] weighted scores}, [failure descriptions])."""
        per = {name: [] for name in self.names}
        failed = []
        for row, completion in zip(rows, completions):
            columns = {k: v for k, v in row.items() if not k.startswith("_") and k != "prompt"}
            for name, weight, fn in self.rewards:
                try:
                    value = fn(row["prompt"], completion, **columns)
                    value = float(value)
                    if not math.isfinite(value):
                        raise ValueError(f"returned {value}")
                except Exception as e:  # noqa: BLE001 - a user's reward may raise anything
                    value = 0.0
                    failed.append(f"reward {name!r} on {row.get('_where', 'prompt ' + repr(row['prompt'][:60]))}, "
                                  f"completion {completion[:200]!r}: {type(e).__name__}: {e}")
                per[name].append(weight * value)
        calls = max(len(rows) * len(self.rewards), 1)
        self.failures += len(failed)
        for message in failed[:3]:
            log.warning("%s (scored 0)", message)
        if len(failed) > 3:
            log.warning("... %d more reward failures this step", len(failed) - 3)
        if len(failed) / calls > self.max_failure_fraction:
            raise RewardError(f"{len(failed)} of {calls} reward calls failed in one step (more than "
                              f"grpo.max_reward_failure_fraction={self.max_failure_fraction}); first: {failed[0]}")
        return {n: np.asarray(v, np.float32) for n, v in per.items()}, failed
