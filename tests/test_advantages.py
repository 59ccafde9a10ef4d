"""Group advantages against direct per-element formulas, and the GRPO batch layout."""
import statistics

import numpy as np
import pytest

from deepseek_jax.rl import advantages as adv_lib


@pytest.fixture
def rewards():
    return np.random.default_rng(0).choice([0.0, 0.1, 1.0], size=(5, 4)).astype(np.float32)


def test_grpo_is_the_group_z_score(rewards):
    got = adv_lib.group_advantages(rewards, "grpo", eps=1e-4)
    for p, group in enumerate(rewards.tolist()):
        mu, sd = statistics.fmean(group), statistics.pstdev(group)
        np.testing.assert_allclose(got[p], [(r - mu) / (sd + 1e-4) for r in group], rtol=1e-5, atol=1e-6)


def test_rloo_is_leave_one_out(rewards):
    got = adv_lib.group_advantages(rewards, "rloo")
    G = rewards.shape[1]
    for p, group in enumerate(rewards.tolist()):
        want = [r - (sum(group) - r) / (G - 1) for r in group]
        np.testing.assert_allclose(got[p], want, rtol=1e-5, atol=1e-6)


def test_dr_grpo_only_centres(rewards):
    got = adv_lib.group_advantages(rewards, "dr_grpo")
    np.testing.assert_allclose(got, rewards - rewards.mean(1, keepdims=True), atol=1e-6)


def test_equal_groups_have_zero_advantage_and_are_filtered():
    r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert np.all(adv_lib.group_advantages(r, "grpo")[0] == 0)
    assert adv_lib.informative_groups(r).tolist() == [False, True]


def test_bad_estimator_and_shapes():
    with pytest.raises(ValueError, match="use one of"):
        adv_lib.group_advantages(np.zeros((2, 2)), "ppo")
    with pytest.raises(ValueError, match="prompts, group"):
        adv_lib.group_advantages(np.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        adv_lib.group_advantages(np.zeros((3, 1)), "rloo")


def test_batch_layout():
    # Two rows, prompt slots P = 2 (left padded), completion slots N = 3.
    tokens = np.array([[7, 8, 1, 2, 3], [0, 9, 4, 0, 0]])
    valid = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    completion = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
    old = np.array([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]])
    batch = adv_lib.build_grpo_batch(tokens, positions, valid, completion, old, np.array([0.5, -1.0]),
                                     keep_B=np.array([True, False]))
    np.testing.assert_array_equal(batch["tokens"][0], [7, 8, 1, 2])
    np.testing.assert_array_equal(batch["targets"][0], [8, 1, 2, 3])
    # Loss on the targets that are completion tokens: 1, 2, 3 (predicted from 8, 1, 2).
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 1, 1, 1])
    np.testing.assert_allclose(batch["old_logprobs"][0], [0, -0.1, -0.2, -0.3])
    np.testing.assert_array_equal(batch["positions"][1], [0, 0, 1, 1])
    assert batch["loss_mask"][1].sum() == 0  # dropped row: in the batch, without loss
