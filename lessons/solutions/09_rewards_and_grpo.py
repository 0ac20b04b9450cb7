"""Solutions to the exercises of lessons/09_rewards_and_grpo.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, math, minimoe, F, ...). tests/test_lessons.py
runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: leave_one_out_advantages
def leave_one_out_advantages(rewards):
    """rewards: host array (P, G). Returns (P, G): r_i minus the mean of the other G-1 rewards of its group."""
    G = rewards.shape[1]
    others_mean = (rewards.sum(axis=1, keepdims=True) - rewards) / (G - 1)  # (P, G): the group without r_i
    return rewards - others_mean


# %% exercise: token_level_losses
def token_level_losses(logprobs, old_logprobs, advantages, mask, max_new_tokens, epsilon=0.2):
    """logprobs: Tensor (B, N); old_logprobs (B, N), advantages (B,), mask (B, N) bool: host arrays.
    Returns (dapo, dr_grpo): two 0-d Tensors, minus the clipped surrogate summed over the masked tokens, divided by
    the number of masked tokens (dapo) or by B * max_new_tokens (dr_grpo)."""
    ratio = F.exp(logprobs - minimoe.tensor(old_logprobs))  # (B, N)
    A = minimoe.tensor(advantages[:, None])  # (B, 1)
    surrogate = F.minimum(ratio * A, F.clip(ratio, 1 - epsilon, 1 + epsilon) * A)
    total = (surrogate * minimoe.tensor(mask.astype(np.float64))).sum()  # over every response token of the batch
    return -total / mask.sum(), -total / (mask.shape[0] * max_new_tokens)


# %% exercise: pass_at_k_by_comb
def pass_at_k_by_comb(n, c, k):
    """1 - C(n - c, k) / C(n, k) for integers 0 <= c <= n, 1 <= k <= n, as a float."""
    if n - c < k:  # every k-subset holds a right sample (math.comb would give 0 here anyway)
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# %% exercise: grpo_step
def grpo_step(model, optimizer, task, tokenizer, problems, config):
    """One GRPO step on `problems` (a list of Problems), mu = 1, beta = 0, with the settings of `config` (a
    GRPOConfig). Samples from the current backend's generator; updates the model's weights in place through
    `optimizer`. Returns the loss, a host float."""
    responses = sample_responses(model, problems, tokenizer, config.group_size, config.max_new_tokens,
                                 temperature=config.temperature)  # rollout: G responses per problem
    scores = score_responses(task, responses, config.accuracy_weight, config.format_weight)
    rewards = scores["reward"].reshape(len(problems), config.group_size)  # (P, G)
    advantages = group_advantages(rewards, config.scale_rewards).reshape(-1)  # (B,)
    logprobs, _ = token_logprobs(model, responses.tokens, config.temperature)  # (B, L-1)
    loss, _ = policy_loss(logprobs, logprobs.data.copy(), advantages, responses.response_mask, config.loss_type,
                          config.epsilon, config.epsilon_high, max_new_tokens=config.max_new_tokens)  # ratio 1
    optimizer.zero_grad()
    loss.backward()
    clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()
