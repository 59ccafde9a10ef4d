"""Rule-based rewards against hand-computed expected values."""
import builtins
import fractions

import pytest

from deepseek_jax.rl import rewards


def wrap(answer: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


ARITH = {"task": "arithmetic", "prompt": "What is 12*34?", "answer": "408"}
# Countdown: reach 16 with 3, 5, 2. (3+5)*2 = 16; 3*5+2 = 17; (3-5)*2 = -4.
CD = {"task": "countdown", "prompt": "Use 3 5 2 to make 16", "numbers": [3, 5, 2],
      "target": 16}


@pytest.mark.parametrize("answer, expected", [
    ("408", 1.0), (" 408\n", 1.0), ("+408", 1.0), ("409", 0.0), ("408.0", 0.0),
    ("4 08", 0.0), ("", 0.0), ("four hundred and eight", 0.0), ("٤٠٨", 0.0),
])
def test_arithmetic_accuracy(answer, expected):
    assert rewards.accuracy(ARITH["prompt"], wrap(answer), **ARITH) == expected


def test_accuracy_uses_last_answer_and_target_fallback():
    two = "<think>a</think><answer>7</answer> wait <answer>408</answer>"
    assert rewards.accuracy("", two, **ARITH) == 1.0
    reversed_ = "<think>a</think><answer>408</answer> wait <answer>7</answer>"
    assert rewards.accuracy("", reversed_, **ARITH) == 0.0
    assert rewards.accuracy("", "408", **ARITH) == 0.0  # no answer block at all
    assert rewards.accuracy("", wrap("-5"), task="arithmetic", target=-5) == 1.0


@pytest.mark.parametrize("equation, expected", [
    ("(3+5)*2", 1.0),
    ("2*(5+3)", 1.0),
    ("(3+5)*2 = 16", 1.0),
    ("(3+5)*2 = 15", 0.0),          # states a wrong result
    ("(3+5)*2 = 16 = 16", 0.0),
    ("3*5+2", 0.0),                 # 17, not 16
    ("(3+5)*2*2", 0.0),             # 2 used twice (and value 32)
    ("(5+5)+3*2", 0.0),             # 5 used twice, value 16, 2 and 3 once each
    ("(3+5)+8", 0.0),               # 8 not given, 2 missing, value 16
    ("3+5", 0.0),                   # 2 missing
    ("16", 0.0),
    ("(3+5)**2", 0.0),              # power is not allowed
    ("(3+5)//1*2", 0.0),
    ("-3+5*2", 0.0),                # unary minus is not allowed
    ("(3.0+5)*2", 0.0),             # float literal
    ("(3_0+5)*2", 0.0),
    ("", 0.0),
])
def test_countdown_accuracy(equation, expected):
    assert rewards.accuracy(CD["prompt"], wrap(equation), **CD) == expected


def test_countdown_exact_rational_arithmetic():
    # (7/3)*27 = 63 exactly, although in floats it is 63.00000000000001.
    assert (7 / 3) * 27 != 63
    problem = {"task": "countdown", "numbers": [7, 3, 27], "target": 63}
    assert rewards.accuracy("", wrap("(7/3)*27"), **problem) == 1.0
    assert rewards.countdown_value("(7/3)*27", [27, 3, 7]) == 63
    # 6/(4-4)+1: division by zero is invalid, not an exception.
    assert rewards.countdown_value("6/(4-4)+1", [6, 4, 4, 1]) is None
    assert rewards.accuracy("", wrap("6/(4-4)+1"), numbers=[6, 4, 4, 1], target=1) == 0.0
    # Non-integer final value: 1/2 + 1 = 3/2 is not the integer 1 or 2.
    assert rewards.countdown_value("1/2+1", [1, 2, 1]) == fractions.Fraction(3, 2)


def test_injection_in_answer_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    calls = []
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: calls.append(a))
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"(3+5)*2 + 0*__import__('os').system('touch {marker}')",
        f"(3+5)*2 = 16; open('{marker}', 'w')",
        "().__class__.__base__.__subclasses__()",
        "(" * 150 + "3+5" + ")" * 150 + "*2",
    ]
    for payload in payloads:
        completion = wrap(payload)
        assert rewards.accuracy("", completion, **CD) == 0.0
        assert rewards.countdown("", completion, **CD) == 0.1  # well-formatted, wrong
    assert not marker.exists()
    assert calls == []


@pytest.mark.parametrize("completion, expected", [
    ("<think>x</think><answer>4</answer>", 1.0),
    ("  \n<think>x</think>\n<answer>4</answer>\n ", 1.0),
    ("<think></think><answer>4</answer>", 1.0),        # empty reasoning is allowed
    ("<think>x</think><answer> </answer>", 0.0),       # empty answer
    ("<answer>4</answer>", 0.0),
    ("<think>x</think>", 0.0),
    ("<think>x</think>so<answer>4</answer>", 0.0),     # text between the blocks
    ("<think>x</think><answer>4</answer>done", 0.0),   # text after
    ("<answer>4</answer><think>x</think>", 0.0),       # wrong order
    ("<think>x</think><answer>4</answer><answer>5</answer>", 0.0),
    ("<think>a<think>b</think><answer>4</answer>", 0.0),
    ("<think>x</think><answer>4</answer></answer>", 0.0),
])
def test_format(completion, expected):
    assert rewards.format_reward("", completion) == expected


@pytest.mark.parametrize("completion, expected", [
    (wrap("(3+5)*2"), 1.0),
    (wrap("3*5+2"), 0.1),
    ("<answer>(3+5)*2</answer>", 1.0),   # correct answer without <think>: still correct
    ("<answer>3*5+2</answer>", 0.0),     # wrong and badly formatted
    ("(3+5)*2", 0.0),
])
def test_countdown_reward(completion, expected):
    assert rewards.countdown("", completion, **CD) == expected


@pytest.mark.parametrize("length, expected", [
    # max_len 100, cache_len 20: zero up to 80, then (80 - length) / 20, then -1.
    (0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0),
    (10_000, -1.0),
])
def test_soft_overlong_penalty(length, expected):
    assert rewards.soft_overlong_penalty(length, 100, 20) == pytest.approx(expected, abs=1e-12)


def test_soft_overlong_penalty_edge_cases():
    assert rewards.soft_overlong_penalty(100, 100, 0) == 0.0   # no buffer: a step
    assert rewards.soft_overlong_penalty(101, 100, 0) == -1.0
    assert rewards.soft_overlong_penalty(1, 100, 100) == -0.01
    with pytest.raises(ValueError, match="cache_len"):
        rewards.soft_overlong_penalty(5, 10, 20)
    assert rewards.overlong("", "", length=90, max_len=100, cache_len=20) == -0.5
    with pytest.raises(KeyError, match="length"):
        rewards.overlong("", "", max_len=100, cache_len=20)


@pytest.mark.parametrize("completion, script, expected", [
    (wrap("4", "two plus two"), "latin", 1.0),                   # 3 words, all Latin
    (wrap("4", "we add два and два"), "latin", 3 / 5),           # we add and | два два
    (wrap("четыре", "we add два and два"), "latin", 3 / 6),
    (wrap("четыре", "we add два and два"), "cyrillic", 3 / 6),
    (wrap("4", "café déjà vu"), "latin", 1.0),                   # accents are Latin
    (wrap("4", "cafe\u0301 ok"), "latin", 1.0),                  # combining accent
    (wrap("4", "2+2=4"), "latin", 1.0),                          # no words at all
    (wrap("4", "first 我们计算 then"), "latin", 2 / 6),          # each Han char a word
    (wrap("4", "first 我们计算 then"), ("cjk", "latin"), 1.0),
    (wrap("4", "helloмир"), "latin", 1 / 2),                     # split at the script change
    ("plain text без tags", "latin", 3 / 4),                     # whole completion
])
def test_language_consistency(completion, script, expected):
    got = rewards.language_consistency("", completion, script=script)
    assert got == pytest.approx(expected)


def test_language_consistency_defaults_to_latin():
    assert rewards.language_consistency("", wrap("ok", "alpha βήτα")) == pytest.approx(2 / 3)


CODE = "<think>easy</think><answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>"


def test_code_execution():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert rewards.code_execution("", CODE, tests=tests) == 1.0
    assert rewards.code_execution("", CODE, tests="assert add(2, 3) == 6") == 0.0
    assert rewards.code_execution("", CODE.replace("a + b", "a - b"), tests=tests) == 0.0
    assert rewards.code_execution("", "<answer>add = lambda a, b: a + b</answer>",
                                  tests=tests) == 0.0  # no fenced block
    loop = "```python\nwhile True:\n    pass\n```"
    assert rewards.code_execution("", loop, tests="", timeout_s=0.5) == 0.0
    with pytest.raises(KeyError, match="tests"):
        rewards.code_execution("", CODE)


def test_registry_and_score():
    assert set(rewards.REWARDS) == {"accuracy", "format", "countdown",
                                    "language_consistency", "code_execution", "overlong"}
    assert rewards.get_reward("format") is rewards.format_reward
    with pytest.raises(KeyError, match="known rewards"):
        rewards.get_reward("acuracy")
    completion = wrap("409")  # well formatted, wrong
    got = rewards.score({"accuracy": 1.0, "format": 0.5}, ARITH["prompt"], completion, **ARITH)
    assert got == {"accuracy": 0.0, "format": 0.5}
    got = rewards.score([("accuracy", 2.0), ("countdown", 1.0)], "", wrap("(3+5)*2"), **CD)
    assert got == {"accuracy": 2.0, "countdown": 1.0}
    with pytest.raises(ValueError, match="Unknown task"):
        rewards.accuracy("", wrap("1"), task="sorting", answer="1")
