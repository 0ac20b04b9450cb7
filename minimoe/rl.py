"""Group Relative Policy Optimization (GRPO): reinforcement learning from rule-based rewards, as in
DeepSeekMath and DeepSeek-R1-Zero — no value network, no learned reward model.

For each prompt q the current policy samples a *group* of G responses o_1..o_G and a rule scores each one
(r_i). The group is its own baseline: a response is reinforced by how much better it did than its siblings,

    A_i = (r_i - mean(r)) / (std(r) + eps)                       the same advantage for every token of o_i

and the policy is pushed along A_i with PPO's clipped surrogate against the policy that sampled (π_old),
optionally held near a frozen reference policy (π_ref) by a per-token KL penalty:

    ρ_t   = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    ℓ_t   = min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε_high) A) - β · KL_t,   KL_t = π_ref/π_θ - log(π_ref/π_θ) - 1 ≥ 0
    loss  = - aggregate(ℓ_t over response tokens)

The aggregation is where the variants differ:
    "grpo"     mean over each response's tokens, then mean over responses (DeepSeekMath)
    "dapo"     sum over all tokens / number of tokens (token-level: long responses count per token)
    "dr_grpo"  sum over all tokens / (responses · max_new_tokens), a constant denominator (Dr. GRPO; use it
               with scale_rewards="none": dividing by std is the other bias Dr. GRPO removes)
    "reinforce" plain REINFORCE with the group mean as baseline: -(r_i - mean r) · Σ_t log π_θ(o_t), mean over
               responses; no ratio, no clipping.

With one gradient step per batch (μ = 1), π_old = π_θ, so ρ = 1 exactly and the loss value is ~0 — but its
gradient is not: ∇ρ = ρ ∇log π_θ. Groups whose rewards are all equal have A = 0 and teach nothing.
"""

import os
import sys
from dataclasses import dataclass

from . import functional as F
from .autograd import no_grad
from .backend import get_array_module, get_backend
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, weights_digest
from .evaluate import score_responses
from .generate import sample_responses
from .loop import TrainingRun, optimizer_step
from .optim import AdamW, WarmupCosine
from .tasks import Tokenizer
from .validation import Checks, Config

__all__ = ["GRPOConfig", "train_grpo", "rollout", "compute_rewards", "policy_update", "record_step",
           "reference_policy", "group_advantages", "token_logprobs", "policy_loss", "policy_entropy",
           "accuracy_signal", "check_base", "control_step_size", "collapse_signs", "WeakBaseError", "LOSS_TYPES", "SCALE_REWARDS"]

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "reinforce")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards, scale="group", eps=1e-4):
    """Advantages (P, G) from rewards (P, G) of P prompts × G responses: reward minus its group's mean,
    divided by the group's standard deviation ("group"), by the whole batch's ("batch"), or not at all
    ("none"). Standard deviations are Bessel-corrected (divide by n - 1), as TRL and torch.std do."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"group_advantages: scale must be one of {SCALE_REWARDS}, got {scale!r}")
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: rewards must be (prompts, group) with a group of at least 2, "
                         f"got shape {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    if scale == "group":
        return centered / (rewards.std(axis=1, ddof=1, keepdims=True) + eps)
    if scale == "batch":
        return centered / (rewards.std(ddof=1) + eps)
    return centered


def token_logprobs(model, tokens, temperature=1.0):
    """log π(token t+1 | tokens ≤ t) for every position, (B, L-1), from one forward pass over tokens (B, L), and
    the logits (B, L-1, V) as an array (for the entropy log). The logits are divided by the sampling temperature
    first, so these are the probabilities the sampler used. Differentiable (under no_grad for π_old / π_ref);
    a response mask picks out the positions that matter."""
    logits = model(tokens[:, :-1])  # (B, L-1, V): position t predicts token t + 1
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    return -F.cross_entropy(logits, tokens[:, 1:], reduction="none"), logits.data  # (B, L-1)


def policy_loss(logprobs, old_logprobs, advantages, mask, loss_type="grpo", epsilon=0.2, epsilon_high=None,
                beta=0.0, ref_logprobs=None, max_new_tokens=None):
    """The GRPO objective (or a variant, see the module docstring) as a loss to minimise.

    logprobs      -- Tensor (B, N): log π_θ of the response tokens (with gradient)
    old_logprobs  -- array (B, N): log π_old, the sampling policy (no gradient)
    advantages    -- array (B,): one advantage per response
    mask          -- array (B, N) bool: response tokens up to and including EOS
    ref_logprobs  -- array (B, N): log π_ref, needed when beta > 0
    Returns (loss, stats) with stats of 0-d arrays: "kl" (mean per token), "clip_low", "clip_high" (share of
    tokens whose ratio was clipped below / above)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"policy_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.shape != mask.shape or old_logprobs.shape != mask.shape or advantages.shape != mask.shape[:1]:
        raise ValueError(f"policy_loss: logprobs {logprobs.shape}, old_logprobs {old_logprobs.shape} and mask "
                         f"{mask.shape} must be (B, N) and advantages {advantages.shape} (B,)")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logprobs (the frozen reference policy's log-probs)")
    xp = get_array_module(mask)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    weights = mask.astype(logprobs.dtype)  # (B, N)
    A = advantages[:, None].astype(logprobs.dtype)  # (B, 1)
    token_count = xp.maximum(weights.sum(), 1)
    stats = {}

    if loss_type == "reinforce":
        per_token = -(logprobs * A)
    else:
        ratio = F.exp(logprobs - old_logprobs)  # (B, N), exactly 1 when μ = 1
        clipped = F.clip(ratio, 1 - epsilon, 1 + epsilon_high)
        per_token = -F.minimum(ratio * A, clipped * A)
        with no_grad():
            r = ratio.data
            stats["clip_low"] = (((r < 1 - epsilon) & (A < 0)) * weights).sum() / token_count
            stats["clip_high"] = (((r > 1 + epsilon_high) & (A > 0)) * weights).sum() / token_count
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs  # log(π_ref / π_θ)
        kl = F.exp(log_ratio) - log_ratio - 1  # (B, N), ≥ 0
        stats["kl"] = (kl.data * weights).sum() / token_count
        if beta > 0:
            per_token = per_token + beta * kl

    masked = per_token * weights
    if loss_type in ("grpo", "reinforce"):
        per_response = masked.sum(axis=1)
        if loss_type == "grpo":
            per_response = per_response / xp.maximum(weights.sum(axis=1), 1)
        loss = per_response.mean()
    elif loss_type == "dapo":
        loss = masked.sum() / token_count
    else:
        if max_new_tokens is None:
            raise ValueError("policy_loss: loss_type 'dr_grpo' needs max_new_tokens (its constant denominator)")
        loss = masked.sum() * (1.0 / (mask.shape[0] * max_new_tokens))
    return loss, stats


def policy_entropy(logits, mask):
    """Mean entropy -Σ p log p of the policy over masked response positions (for logging; no gradient).
    logits: array (B, N, V); mask: (B, N)."""
    xp = get_array_module(logits)
    e, total, m = F.shifted_exp(logits)
    log_p = logits - m - xp.log(total)  # (B, N, V)
    entropy = -(e / total * log_p).sum(axis=-1)  # (B, N)
    return (entropy * mask).sum() / xp.maximum(mask.sum(), 1)



# ==============================================================================================================
# the training loop
# ==============================================================================================================

@dataclass
class GRPOConfig(Config):
    """GRPO settings; the defaults are the classic demo's (`--preset classic`: 16 prompts × 8 responses per step,
    ~0.3 s a step on 2 cores). The demo's default preset, v3, halves the learning rate (lr 5e-4, min_lr 5e-5):
    one update moves a latent-attention (MLA) policy about twice as far as a multi-head one, and at 1e-3 GRPO
    collapsed on MLA bases (lesson 08 §8); over MHA and MLA, dense and MoE, 5e-4 never did. Use
    `GRPOConfig(**minimoe.preset.load_preset("v3")["grpo"])` for it.

    The learning rate decays along a cosine: late in training almost every group scores the same, and a constant
    rate lets a few noisy updates knock a good policy off its peak. checkpoint_every: 0 saves only after the last
    step (with an out_dir).

    The collapse guard: a run refuses to start (WeakBaseError) when fewer than `min_base_pass_at_g` of the first
    step's groups hold a correct response — an estimate of the base's pass@group_size on training problems; below
    it almost every group's advantages come from the format reward alone, and GRPO teaches well-formed nonsense.
    `allow_weak_base` starts anyway (to watch that happen). During the run, `collapse_signs` over the last
    `collapse_window` steps are reported once each, in the progress output and in history["warnings"]."""

    steps: int = 150
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-3  # the classic recipe, tuned on MHA; MLA wants 5e-4 (the v3 preset's)
    min_lr: float = 1e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 40
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    epsilon: float = 0.2
    epsilon_high: float = None  # None: the same as epsilon
    beta: float = 0.0  # weight of the KL penalty to the reference policy (R1-Zero used ~0.001)
    mu: int = 1  # gradient steps per sampled batch
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    log_kl: bool = True  # measure the KL to the reference even when beta = 0 (one extra forward pass a step)
    target_kl: float = 0.0  # step control: KL(π_old ‖ π_new) per token one update should move; 0: off
    checkpoint_every: int = 50
    seed: int = 0
    # the collapse guard (see check_base and collapse_signs)
    min_base_pass_at_g: float = 0.1  # refuse a base with a correct answer in fewer of the first step's groups
    allow_weak_base: bool = False  # True: start anyway (to watch the collapse on purpose)
    collapse_window: int = 10  # steps averaged by the collapse warnings; 0: no warnings

    def validate(self):
        """Raise a ConfigError naming every field that cannot work."""
        check = Checks("GRPOConfig", self)
        for name in ("steps", "prompts_per_step", "max_new_tokens"):
            check.integer(name, minimum=1)
        check.integer("group_size", minimum=2)  # the group is its own baseline: one response has nothing to beat
        check.integer("mu", minimum=1)
        for name in ("warmup_steps", "checkpoint_every", "seed", "collapse_window"):
            check.integer(name, minimum=0)
        check.real("min_base_pass_at_g", minimum=0, maximum=1)
        check.flag("allow_weak_base")
        check.optimizer_schedule(warmup_within_steps=False)  # the warm-up counts optimizer steps: steps × mu
        check.real("temperature", above=0)
        for name in ("beta", "accuracy_weight", "format_weight", "target_kl"):
            check.real(name, minimum=0)
        check.real("epsilon", minimum=0, below=1)  # the ratio is clipped below at 1 - epsilon > 0
        check.real("epsilon_high", minimum=0, optional=True)
        check.choice("loss_type", LOSS_TYPES)
        check.choice("scale_rewards", SCALE_REWARDS)
        check.flag("log_kl")
        if check.ok("steps", "mu", "warmup_steps") and self.warmup_steps > self.steps * self.mu:
            check.fail("warmup_steps", f"warmup_steps={self.warmup_steps} must be ≤ steps × mu = "
                                       f"{self.steps * self.mu} (the optimizer steps of the run)")
        check.done()


def train_grpo(model, task, config=None, tokenizer=None, out_dir=None, resume_from=None, progress=True,
               on_step=None, overwrite=False):
    """Improve `model` on `task` with GRPO (or a variant: config.loss_type). Returns the history:
    {"steps": [one record per step: rewards, accuracy, lengths, thinking share, KL, clipping, entropy, grad norm,
    expert load, router entropy], "warnings": [the collapse guard's, {"step", "kind", "message"}], "seconds": wall
    time}.

    Each step is the loop body of DeepSeekMath's GRPO algorithm box (Algorithm 1), with π_old = π_θ at sampling:
        sample a batch of prompts, and G outputs for each from π_θ     rollout
        compute the rewards r_i of each output                         compute_rewards
        compute the advantages Â_i of each output's tokens             group_advantages
        update π_θ by maximising the GRPO objective (μ times)          policy_update
    then the step's measurements are recorded (record_step) and a checkpoint saved on schedule. The collapse guard
    looks at the first step's rewards before any update (check_base: refuse a base that never answers right) and
    at the records after every step (collapse_signs).

    out_dir / resume_from / overwrite -- as in minimoe.train.pretrain; the checkpoint is `rl_last.npz` and the
    reference policy `rl_reference.npz`, both in the run folder (a resumed run finds its reference beside
    the checkpoint it resumes from, and checks that it is the same one).

    RL runs the model in eval mode throughout — no dropout, no noisy routing, no token dropping — so the policy
    that samples is exactly the policy being trained; gradients flow in eval mode all the same. The MoE routing
    bias (auxiliary-loss-free balancing) is updated once after each step, never within one."""
    config = config or GRPOConfig()
    tokenizer = tokenizer or Tokenizer()
    optimizer = AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = WarmupCosine(optimizer, config.warmup_steps, config.steps * config.mu, min_lr=config.min_lr)
    with TrainingRun("train_grpo", model, optimizer, scheduler, config, out_dir, "rl_last", resume_from,
                     overwrite, progress) as run:
        history = run.resume({"steps": [], "warnings": [], "seconds": 0.0})
        history.setdefault("warnings", [])
        reference, reference_state = reference_policy(model, config, out_dir, resume_from, run.saved_state)
        step_scale = run.saved_state.get("step_scale", 1.0)
        model.eval()
        for step in run.steps("grpo"):
            responses = rollout(model, task, tokenizer, config, run.data_rng)
            scores, rewards = compute_rewards(task, responses, config)
            if step == 1:  # before the first update: is there anything for GRPO to reinforce?
                _warn(run, history, step, check_base(accuracy_signal(scores["accuracy"], rewards.shape), config))
            advantages = group_advantages(get_backend().asarray(rewards), config.scale_rewards).reshape(-1)  # (B,)
            optimizer.lr = scheduler.lr_at(scheduler.last_step) * step_scale
            update = policy_update(model, optimizer, scheduler, reference, responses, advantages, tokenizer, config)
            step_scale = control_step_size(step_scale, update["policy_shift"], config.target_kl)
            model.update_routing_bias()
            run.check_loss(step, update["loss"])
            record = record_step(step, model, responses, scores, rewards, update)
            history["steps"].append(record)
            run.show(reward=f"{record['reward_mean']:.2f}", acc=f"{record['accuracy']:.2f}",
                     think=f"{record['thinking_share']:.2f}")
            for kind, message in collapse_signs(history["steps"], config.collapse_window):
                _warn(run, history, step, (kind, message))
            if on_step:
                on_step(step, record)
            run.end_step(step, history, step_scale=step_scale, **reference_state)
    return run.finish(history)


class WeakBaseError(ValueError):
    """GRPO was asked to start from a base model that (almost) never answers right (GRPOConfig.min_base_pass_at_g)."""


def accuracy_signal(accuracy, shape):
    """How much accuracy signal one step's groups carry, from the accuracy of each response (P·G,) and the
    groups' shape (P, G): the share of groups with no correct response (all advantages then come from the format
    reward) and the share with both right and wrong responses (the groups that teach accuracy)."""
    correct = accuracy.reshape(shape) > 0  # (P, G)
    solved = correct.any(axis=1)
    return {"zero_accuracy_share": float((~solved).mean()),
            "signal_share": float((solved & ~correct.all(axis=1)).mean())}


def check_base(signal, config):
    """The floor under R1-Zero-style RL: it only works because the base can already sometimes answer (DeepSeek-R1
    starts from V3-Base). `signal` is accuracy_signal of the first step. Raises WeakBaseError when fewer than
    config.min_base_pass_at_g of the groups hold a correct response, unless config.allow_weak_base; then returns a
    ("weak_base", message) warning, and None when the base is strong enough."""
    solved = 1.0 - signal["zero_accuracy_share"]
    if solved >= config.min_base_pass_at_g:
        return None
    message = (f"only {solved:.0%} of the first step's {config.prompts_per_step} groups of {config.group_size} hold a "
               f"correct response (min_base_pass_at_g={config.min_base_pass_at_g}): nearly every advantage would "
               "come from the format reward, and GRPO would teach well-formed wrong answers")
    if not config.allow_weak_base:
        raise WeakBaseError(f"train_grpo: the base model is too weak for RL: {message}. Pretrain longer or on an "
                            "easier task, or set allow_weak_base=True to run it anyway")
    return "weak_base", message


def collapse_signs(steps, window=10):
    """The signs of a collapsing run in the step records so far, as (kind, message) pairs (empty when healthy):
    "no_accuracy_signal" -- over the last `window` steps at least 90% of the groups held no correct response;
    "accuracy_falling"   -- the last `window` steps' mean accuracy is below half of the best earlier window's
                            (which reached at least 0.1) while the format rate held or rose: the policy is
                            trading answers for format (typically a step size too large for the architecture)."""
    if not window or len(steps) < window:
        return []

    def mean(records, key):
        return sum(r[key] for r in records) / len(records)

    recent, signs = steps[-window:], []
    no_signal = mean(recent, "zero_accuracy_share")
    if no_signal >= 0.9:
        signs.append(("no_accuracy_signal", f"{no_signal:.0%} of the groups of the last {window} steps held no "
                                            "correct response: the advantages come from the format reward alone"))
    if len(steps) >= 2 * window:
        end = max(range(window, len(steps) - window + 1), key=lambda e: mean(steps[e - window:e], "accuracy"))
        best = steps[end - window:end]
        accuracy, best_accuracy = mean(recent, "accuracy"), mean(best, "accuracy")
        form, best_form = mean(recent, "format_rate"), mean(best, "format_rate")
        if best_accuracy >= 0.1 and accuracy < 0.5 * best_accuracy and form >= best_form - 0.02:
            signs.append(("accuracy_falling", f"accuracy fell from {best_accuracy:.2f} (steps {end - window + 1}-"
                                              f"{end}) to {accuracy:.2f} (last {window} steps) while the format "
                                              f"rate went {best_form:.2f} → {form:.2f}: the policy is trading "
                                              "answers for format; try a lower lr (MLA: 5e-4, the v3 preset's)"))
    return signs


def _warn(run, history, step, warning):
    """Report a guard's warning once per kind: in the progress output (stderr) and in history["warnings"]."""
    if warning is None or warning[0] in {w["kind"] for w in history["warnings"]}:
        return
    kind, message = warning
    history["warnings"].append({"step": step, "kind": kind, "message": message})
    text = f"train_grpo: WARNING at step {step}: {message}"
    if run.bar is not None:
        run.bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr)


def reference_policy(model, config, out_dir, resume_from, saved_state):
    """The frozen reference policy π_ref (None when neither the KL penalty nor its log needs it), and the state
    keys that let a resumed run find it again: a new run copies the model's current weights and saves them as
    `rl_reference.npz` in its run folder; a resumed run loads the one beside the checkpoint it resumes from."""
    if not (config.beta > 0 or config.log_kl):
        return None, {}
    if resume_from is None:
        reference = _frozen_copy(model)
        state = {"reference": "rl_reference", "reference_sha256": weights_digest(reference)}
    else:
        folder = os.path.dirname(os.path.abspath(str(resume_from)))
        if not saved_state.get("reference"):
            raise CheckpointError(f"train_grpo: the run in {folder} saved no reference policy to resume with")
        path = os.path.join(folder, os.path.basename(saved_state["reference"]))  # a name, relative to the run
        reference = load_checkpoint(path, restore_random_state=False)[0].eval()
        state = {"reference": "rl_reference", "reference_sha256": weights_digest(reference)}
        if saved_state.get("reference_sha256", state["reference_sha256"]) != state["reference_sha256"]:
            raise CheckpointError(f"train_grpo: the reference policy {path} is not the one the run in {folder} "
                                  "started from (its weights differ)")
        if out_dir and os.path.abspath(out_dir) == folder:
            return reference, state
    if out_dir:
        save_checkpoint(os.path.join(out_dir, "rl_reference"), reference)
    return reference, state


def _frozen_copy(model):
    """A copy of the model's current weights that never trains: the reference policy π_ref."""
    reference = type(model)(model.config)
    reference.load_state_dict(model.state_dict())  # copies: the arrays are the model's, load_state_dict copies them
    return reference.eval()


def rollout(model, task, tokenizer, config, data_rng):
    """Sample `prompts_per_step` training problems and a group of `group_size` responses to each from the
    current policy. Returns the Responses (rows grouped by problem: `responses.problems`)."""
    problems = task.sample(data_rng, config.prompts_per_step, split="train")
    return sample_responses(model, problems, tokenizer, config.group_size, config.max_new_tokens,
                            temperature=config.temperature)


def compute_rewards(task, responses, config):
    """The rule-based scores of every response, and the rewards as (prompts, group) for the advantages."""
    scores = score_responses(task, responses, config.accuracy_weight, config.format_weight)
    return scores, scores["reward"].reshape(config.prompts_per_step, config.group_size)


def policy_update(model, optimizer, scheduler, reference, responses, advantages, tokenizer, config):
    """μ gradient steps on the GRPO objective for one sampled batch. Returns {"loss" (host float), "lr",
    "grad_norm" (0-d array), "stats" (policy_loss's), "logits", "mask"} of the last step."""
    width = int((responses.tokens != tokenizer.pad_id).sum(axis=1).max())  # drop columns that are all PAD
    tokens, mask = responses.tokens[:, :width], responses.response_mask[:, :width - 1]
    with no_grad():
        old_logprobs = token_logprobs(model, tokens, config.temperature)[0].data if config.mu > 1 else None
        ref_logprobs = token_logprobs(reference, tokens, config.temperature)[0].data if reference is not None \
            else None
    for _ in range(config.mu):
        logprobs, logits = token_logprobs(model, tokens, config.temperature)
        old = old_logprobs if old_logprobs is not None else logprobs.data.copy()  # μ = 1: ratio exactly 1
        loss, stats = policy_loss(logprobs, old, advantages, mask, config.loss_type, config.epsilon,
                                  config.epsilon_high, config.beta, ref_logprobs, config.max_new_tokens)
        balance = model.balance_loss()
        if balance is not None:
            loss = loss + balance
        lr = optimizer.lr
        grad_norm = optimizer_step(model, optimizer, scheduler, loss, config.grad_clip)
    shift = None
    if config.target_kl > 0:  # how far the update moved the policy on the batch it learned from
        with no_grad():
            log_ratio = token_logprobs(model, tokens, config.temperature)[0].data - old  # (B, N) log π_new / π_old
        xp = get_array_module(log_ratio)
        shift = float(((xp.exp(log_ratio) - 1 - log_ratio) * mask).sum() / xp.maximum(mask.sum(), 1))
    return {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm, "stats": stats, "logits": logits, "mask": mask,
            "policy_shift": shift}


def control_step_size(scale, shift, target_kl):
    """The step control: the learning rate is the schedule's times `scale` ≤ 1, and `scale` follows how far
    the last update moved the policy, shift = KL(π_old ‖ π_new) per response token (estimated on the sampled
    tokens as r - 1 - log r, r = π_new / π_old): halved when shift > 2·target_kl, grown by 1.5× (back up to
    1) when shift < target_kl / 2 — the adaptive rule PPO implementations use for their learning rate. An
    architecture whose policy moves more per unit of parameter change (MLA's shared latent and RoPE key) gets
    a smaller step without anyone tuning it; the schedule stays the ceiling."""
    if not target_kl or shift is None:
        return scale
    if shift > 2 * target_kl:
        return max(scale / 2, 1 / 64)
    if shift < target_kl / 2:
        return min(scale * 1.5, 1.0)
    return scale


def record_step(step, model, responses, scores, rewards, update):
    """One step's measurements (host numbers): what the demo plots and R1-Zero's curves show."""
    correct = scores["accuracy"] > 0
    stats = update["stats"]
    return {
        "step": step, "loss": update["loss"], "lr": update["lr"], "grad_norm": update["grad_norm"].item(),
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "accuracy": float(scores["accuracy"].mean()), "format_rate": float(scores["format"].mean()),
        "all_equal_share": float((rewards.std(axis=1) == 0).mean()),
        **accuracy_signal(scores["accuracy"], rewards.shape),
        "mean_length": float(responses.lengths.mean()),
        "length_correct": float(responses.lengths[correct].mean()) if correct.any() else None,
        "length_wrong": float(responses.lengths[~correct].mean()) if (~correct).any() else None,
        "truncated_share": float(scores["truncated"].mean()),
        "thinking_share": float(scores["thinks"].mean()),
        "kl": float(stats["kl"]) if "kl" in stats else None,
        "policy_shift": update["policy_shift"],
        "clip_low": float(stats["clip_low"]) if "clip_low" in stats else None,
        "clip_high": float(stats["clip_high"]) if "clip_high" in stats else None,
        "entropy": float(policy_entropy(update["logits"], update["mask"])),
        **model.routing_summary(),
    }
