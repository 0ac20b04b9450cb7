"""GRPO: the loss and its gradient against a PyTorch implementation of the same formulas (float64), for every
aggregation and for REINFORCE; the properties the algorithm rests on; and a short run that learns."""

import numpy as np
import pytest

import minimoe
from minimoe.model import ModelConfig, Transformer
from minimoe.rewards import Reward
from minimoe.rl import GRPOConfig, group_advantages, policy_loss, train_grpo
from minimoe.tasks import Problem, Task
from minimoe.testing import check_close, to_numpy
from parity import torch

B, N = 6, 5


def batch(seed=0, ratio_spread=0.4):
    """Log-probs of a policy that has moved away from the sampler (so ratios leave [1-ε, 1+ε] both ways),
    a reference, advantages of both signs and a response mask with different lengths."""
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 0.9, (B, N)))
    new = old + rng.normal(0, ratio_spread, (B, N))
    ref = old + rng.normal(0, 0.2, (B, N))
    advantages = rng.normal(0, 1, B)
    lengths = np.array([5, 3, 1, 4, 5, 2])
    mask = np.arange(N) < lengths[:, None]
    return new, old, ref, advantages, mask


def torch_policy_loss(logp, old, ref, advantages, mask, loss_type, epsilon, epsilon_high, beta, max_new_tokens):
    """DeepSeekMath's GRPO objective and its variants, written out again in PyTorch."""
    A = advantages[:, None]
    m = mask.to(logp.dtype)
    if loss_type == "reinforce":
        per_token = -A * logp
    else:
        ratio = torch.exp(logp - old)
        per_token = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return ((per_token * m).sum(1) / m.sum(1)).mean()
    if loss_type == "reinforce":
        return (per_token * m).sum(1).mean()
    if loss_type == "dapo":
        return (per_token * m).sum() / m.sum()
    return (per_token * m).sum() / (logp.shape[0] * max_new_tokens)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "reinforce"])
@pytest.mark.parametrize("beta, epsilon_high", [(0.0, None), (0.04, 0.28)], ids=["no_kl", "kl_and_clip_higher"])
def test_policy_loss_and_gradient_match_torch(backend, float64, loss_type, beta, epsilon_high):
    new, old, ref, advantages, mask = batch()
    xp = minimoe.get_backend()
    logp = minimoe.tensor(new, requires_grad=True)
    loss, stats = policy_loss(logp, xp.asarray(old), xp.asarray(advantages), xp.asarray(mask), loss_type,
                              epsilon=0.2, epsilon_high=epsilon_high, beta=beta, ref_logprobs=xp.asarray(ref),
                              max_new_tokens=N)
    loss.backward()
    t_logp = torch.tensor(new, requires_grad=True)
    expected = torch_policy_loss(t_logp, torch.tensor(old), torch.tensor(ref), torch.tensor(advantages),
                                 torch.tensor(mask), loss_type, 0.2, epsilon_high or 0.2, beta, N)
    expected.backward()
    check_close(loss, expected, 1e-12, 1e-10, name=f"{loss_type} loss")
    check_close(logp.grad, t_logp.grad, 1e-12, 1e-10, name=f"{loss_type} gradient")
    assert float(to_numpy(stats["kl"])) >= 0
    if loss_type != "reinforce":
        ratio = np.exp(new - old)
        low = ((ratio < 0.8) & (advantages[:, None] < 0) & mask).sum() / mask.sum()
        assert abs(float(to_numpy(stats["clip_low"])) - low) < 1e-12 and low > 0


def test_group_advantages_sum_to_zero_and_match_torch(backend, float64):
    rewards = np.random.default_rng(0).choice([0.0, 0.1, 1.0, 1.1], size=(4, 8))
    for scale in ("group", "batch", "none"):
        advantages = to_numpy(group_advantages(minimoe.get_backend().asarray(rewards), scale))
        np.testing.assert_allclose(advantages.sum(axis=1), 0, atol=1e-12)
        t = torch.tensor(rewards)
        centered = t - t.mean(1, keepdim=True)
        expected = {"group": centered / (t.std(1, keepdim=True) + 1e-4), "batch": centered / (t.std() + 1e-4),
                    "none": centered}[scale]
        check_close(advantages, expected, 1e-12, 1e-10, name=f"advantages ({scale})")
    with pytest.raises(ValueError, match="group of at least 2"):
        group_advantages(minimoe.get_backend().asarray(np.zeros((3, 1))))


def test_one_update_per_batch_has_ratio_one_but_a_gradient(float64):
    new, _, _, advantages, mask = batch()
    logp = minimoe.tensor(new, requires_grad=True)
    loss, stats = policy_loss(logp, logp.data.copy(), advantages, mask, "grpo")
    assert abs(loss.item() + (advantages * 1.0).mean()) < 1e-12  # ρ = 1: the loss is -mean(A)
    assert float(stats["clip_low"]) == 0 and float(stats["clip_high"]) == 0
    loss.backward()
    assert np.abs(logp.grad).max() > 1e-3, "ρ = 1 exactly, yet ∇ρ = ∇log π is not zero"


def test_kl_estimator_is_non_negative_and_zero_when_policies_agree(float64):
    new, old, ref, advantages, mask = batch()
    kls = []
    for reference in (ref, new):
        _, stats = policy_loss(minimoe.tensor(new), old, advantages, mask, beta=0.1, ref_logprobs=reference)
        kls.append(float(stats["kl"]))
    assert kls[0] > 0 and kls[1] == 0.0


def test_groups_with_equal_rewards_contribute_no_gradient(float64):
    new, old, _, _, mask = batch()
    rewards = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])  # group 0 all equal
    advantages = group_advantages(rewards).reshape(-1)
    logp = minimoe.tensor(new, requires_grad=True)
    policy_loss(logp, old, advantages, mask, "grpo")[0].backward()
    assert np.all(logp.grad[:3] == 0) and np.abs(logp.grad[3:]).max() > 0


def test_bad_arguments(float64):
    new, old, ref, advantages, mask = batch()
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(minimoe.tensor(new), old, advantages, mask, "ppo")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(minimoe.tensor(new), old, advantages, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        policy_loss(minimoe.tensor(new), old, advantages, mask, "dr_grpo")
    with pytest.raises(ValueError, match="group_size=1"):
        GRPOConfig(group_size=1)


class FirstDigitTask(Task):
    """A trivially learnable reward: 1 when the response starts with the digit 7."""

    name = "first_digit"

    def sample(self, rng, n, split="train"):
        return [Problem(prompt="1+1=", reference="7", task=self.name, operands=(1, 1), target=None)] * n

    def reward(self, problem, response, accuracy_weight=1.0, format_weight=0.1):
        score = float(response.startswith("7"))
        return Reward(score, score, 0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "reinforce"])
def test_a_short_rl_run_raises_the_reward(loss_type):
    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=26, dim=16, n_layers=1, n_heads=2, n_routed_experts=4,
                                    moe_inter_dim=8, max_seq_len=16))
    config = GRPOConfig(steps=25, prompts_per_step=4, group_size=8, lr=3e-2, min_lr=3e-2, warmup_steps=0,
                        max_new_tokens=3, loss_type=loss_type, scale_rewards="none" if loss_type == "reinforce"
                        else "group", log_kl=True, seed=0)
    history = train_grpo(model, FirstDigitTask(), config, progress=False)
    rewards = [step["reward_mean"] for step in history["steps"]]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.3, rewards
    assert history["steps"][-1]["kl"] > 0
