"""Look inside base models on the worked solutions of 3-digit addition (issue 19): which tokens do the slow MLA
bases get wrong, where do their heads look when they must fetch a digit, and which parameters move the policy
most in one GRPO update.

    python -m benchmarks.mla_probe --model "MHA good=/tmp/run/pretrain_last" --model "MLA weak=..." [--out DIR]
                                   [--grpo]

Each --model is GROUP=CHECKPOINT (a checkpoint path without .npz); a group may repeat, and the tables average
over its checkpoints after listing each one. Any checkpoint will do: a run's `pretrain_last.prev` (its previous
save) shows what the run learned last. Three measurements, on the held-out worked solutions behind the "loss:
worked" of lesson 08's table (minimoe.train.heldout_loss with `mix={"worked": 1}`: 256 test problems, seed 12345):

1. roles    next-token loss per token *role* (minimoe.probe: the roles, read from the task's own rendering; the
            edit test and the misses beside the right digit).
2. lookup   attention mass on the one token a digit must be copied from, and for MLA the score split into its
            content and RoPE parts (minimoe.probe). Figures: attention maps of one worked example
            (DIR/attention_<name>.png).
3. --grpo   one GRPO step's update (rollout, rewards, advantages, policy_update, as minimoe.rl does it) from
            each checkpoint, then that update applied to one parameter group at a time (groups of
            benchmarks.mla_rl.parameter_group; MLA's wkv_a also split into its latent rows and its RoPE-key rows;
            all attention groups together; all the rest): KL(π_old ‖ π_new) per response token on the rollout's
            tokens, exact over the vocabulary. A first AdamW step moves every weight by ±lr (m/√v = g/|g|), so a
            group's update norm is lr·√(its size), and KL/norm² compares how far equal steps move the policy.

Measurements 1 and 2 live in the library (lesson 08 uses them on two committed bases); this script runs them over
many checkpoints, prints the tables, draws the figures and adds 3.
CPU only (NumPy), a few seconds per model for 1 and 2; --grpo adds ~10 s per model. Run with
OPENBLAS_NUM_THREADS=1.
"""

import argparse
import os
from collections import defaultdict

import numpy as np

from minimoe.autograd import no_grad
from minimoe.checkpoint import load_checkpoint
from minimoe.probe import best_reader, heldout_worked, probe, trace
from minimoe.rewards import EOS
from minimoe.tasks import AdditionTask, Tokenizer
from minimoe.testing import to_numpy


# ---------------------------------------------------------------------------------------------------------
# Reports


def example_attention(model, task, tokenizer, problem, path, title):
    """Figure: every head's attention on one worked solution, queries (rows) from <think> on, all keys."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = "<bos>" + problem.prompt + task.solution(problem, "worked") + EOS
    ids = np.array([tokenizer.encode(text)])
    _, layers = trace(model.eval(), ids[:, :-1])
    labels = [tokenizer.tokens[i].replace("<answer>", "<a>").replace("</answer>", "</a>")
              .replace("<think>", "<t>").replace("</think>", "</t>") for i in ids[0, :-1]]
    start = len(tokenizer.encode("<bos>" + problem.prompt)) - 1  # the query that predicts <think>
    heads = len(layers) * layers[0]["weights"].shape[1]
    fig, axes = plt.subplots(len(layers), heads // len(layers), figsize=(3.2 * heads // len(layers),
                                                                         3.4 * len(layers)), squeeze=False)
    for layer, parts in enumerate(layers):
        for head, ax in enumerate(axes[layer]):
            ax.imshow(parts["weights"][0, head, start:], cmap="Greys", vmin=0, vmax=1, aspect="auto")
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            ax.set_xticks(range(len(labels)), labels, fontsize=4, rotation=90)
            ax.set_yticks(range(len(labels) - start), [f"→{labels[i + 1] if i + 1 < len(labels) else '<eos>'}"
                                                        for i in range(start, len(labels))], fontsize=4)
    fig.suptitle(f"{title}: attention on {problem.prompt} (row: the query predicting the token after →)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def print_table(title, rows, columns, cell):
    """A plain-text table: one row per entry of `rows`, one column per entry of `columns`."""
    first = max(len(str(r)) for r in rows) + 2
    width = max(16, *(len(str(c)) + 2 for c in columns))
    print(f"\n{title}")
    print(" " * first + "".join(f"{str(c):>{width}}" for c in columns))
    for r in rows:
        print(f"{str(r):<{first}}" + "".join(f"{cell(r, c):>{width}}" for c in columns))


def report(results, groups):
    """Print the tables of measurements 1 and 2: per group (the mean over its checkpoints), then per checkpoint."""
    names = list(results)

    def group_mean(group, pick):
        return np.mean([pick(results[name]) for name in groups[group]], axis=0)

    def loss(result, role):
        return result["loss"] if role == "all tokens" else result["roles"][role]

    roles = ["all tokens"] + list(results[names[0]]["roles"])
    print_table("held-out worked solutions: mean next-token loss per role (group means)", roles, list(groups),
                lambda r, g: f"{group_mean(g, lambda x: loss(x, r)):.4f}")
    print_table("per checkpoint", roles, names, lambda r, n: f"{loss(results[n], r):.4f}")
    lookups = [key for key in results[names[0]]["lookup"] if "col" in key]
    print_table("attention mass on the source digit, or on a key ≤ 3 after it, at the head that reads it most: "
                "mass [layer, head, +offset]", lookups, names,
                lambda r, n: "{:.2f} [{},{},+{}]".format(results[n]["lookup"][r].max(),
                                                         *best_reader(results[n]["lookup"][r])))
    print_table("the same mass, group means", lookups, list(groups),
                lambda r, g: f"{group_mean(g, lambda x: x['lookup'][r].max()):.2f}")
    print_table("mass on the source digit itself (offset 0) at its best head, group means", lookups, list(groups),
                lambda r, g: f"{group_mean(g, lambda x: x['lookup'][r][..., 0].max()):.2f}")
    edits = list(results[names[0]]["edit"])
    print_table("the source sum digit in <think> edited to (digit + 5) mod 10: the answer's probability of the "
                "edited digit / of the digits next to it / of the original digit", edits, names,
                lambda r, n: "{edited:.2f} / {neighbours:.2f} / {true:.2f}".format(**results[n]["edit"][r]))
    print_table("the answer digit's most likely value: share wrong / share of those that are the right digit ± 1",
                edits, names, lambda r, n: "{wrong:.3f} / {beside:.2f}".format_map(results[n]["misses"][r]))
    read_back = [(np.log(result["roles"][role]), result["lookup"][role].max())
                 for result in results.values() for role in edits]
    if len(read_back) > 2:
        correlation = np.corrcoef(np.array(read_back).T)[0, 1]
        print(f"\nover these {len(results)} checkpoints × {len(edits)} columns: correlation of log(read-back loss) "
              f"and the best head's mass on the source (or ≤ 3 after it): {correlation:.2f}")
    split_columns = ["content std", "position std", "content lead", "position lead", "content var share",
                     "position var share", "loss, content only", "loss, position only"]
    for group, members in groups.items():
        if not all(results[name]["split"] for name in members):
            continue
        print_table(f"MLA score split at the reading head (content: q_nope·k_nope, position: q_pe·k_pe, both "
                    f"/√d), {group}, mean over its checkpoints", lookups, split_columns,
                    lambda r, c: f"{group_mean(group, lambda x: x['split'][r].get(c, np.nan)):.2f}")


# ---------------------------------------------------------------------------------------------------------
# 3. Which parameters move the policy in one GRPO update


def policy_kl(old_logits, new_logits, mask):
    """KL(π_old ‖ π_new) per masked position, summed over the whole vocabulary, averaged over the mask."""
    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    old, new = log_softmax(old_logits), log_softmax(new_logits)
    kl = (np.exp(old) * (old - new)).sum(axis=-1)  # (B, L-1)
    return float((kl * mask).sum() / mask.sum())


def grpo_step_shift(model, task, tokenizer, config, seed=0):
    """One GRPO update from `model` (a copy is changed, not `model`): the rollout, rewards, advantages and
    policy_update of minimoe.rl.train_grpo's first step, at the full learning rate config.lr (no warm-up).
    Returns {"accuracy": of the rollout, "kl": {group: KL(π_old ‖ π_new) per response token when only that
    parameter group's part of the update is applied; "all": the whole update}, "update_norm": {group: ‖Δθ‖}}."""
    from benchmarks.mla_rl import parameter_group
    from minimoe.backend import manual_seed
    from minimoe.optim import AdamW, WarmupCosine
    from minimoe.rl import compute_rewards, group_advantages, policy_update, rollout, token_logprobs

    policy = type(model)(model.config)
    policy.load_state_dict(model.state_dict())
    policy.eval()
    manual_seed(seed)
    responses = rollout(policy, task, tokenizer, config, np.random.default_rng(seed))
    scores, rewards = compute_rewards(task, responses, config)
    advantages = group_advantages(rewards, config.scale_rewards).reshape(-1)  # (B,)
    optimizer = AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = WarmupCosine(optimizer, 0, config.steps, min_lr=config.min_lr)
    before = {name: p.data.copy() for name, p in policy.named_parameters()}
    update = policy_update(policy, optimizer, scheduler, None, responses, advantages, tokenizer, config)
    delta = {name: p.data - before[name] for name, p in policy.named_parameters()}
    mask = to_numpy(update["mask"])
    width = mask.shape[1] + 1
    tokens = responses.tokens[:, :width]

    def logits_with(part):
        """Logits on the rollout's tokens with only `part` ({name: row mask or None for all}) of Δθ applied."""
        for name, p in policy.named_parameters():
            rows = part.get(name, False)
            p.data[...] = before[name] + (delta[name] if rows is None else delta[name] * rows)
        with no_grad():
            return to_numpy(token_logprobs(policy, tokens)[1])

    old = logits_with({})
    parts = defaultdict(dict)
    for name, value in delta.items():
        parts[parameter_group(name)][name] = None
        if name.endswith("attn.wkv_a.weight"):  # its rows make the latent c_kv, then the RoPE key k_pe
            rope_rows = (np.arange(value.shape[0]) >= model.config.kv_lora_rank)[:, None]
            parts["attn.wkv_a: latent rows"][name] = ~rope_rows
            parts["attn.wkv_a: RoPE-key rows"][name] = rope_rows
    attention = {name for name in delta if parameter_group(name).startswith("attn.")}
    parts["attention, all of it"] = dict.fromkeys(attention)
    parts["all but attention"] = dict.fromkeys(set(delta) - attention)
    kl = {group: policy_kl(old, logits_with(part), mask) for group, part in sorted(parts.items())}
    kl["all"] = policy_kl(old, logits_with(dict.fromkeys(delta)), mask)
    norms = {group: float(np.sqrt(sum(((delta[n] if rows is None else delta[n] * rows) ** 2).sum()
                                      for n, rows in part.items()))) for group, part in parts.items()}
    return {"accuracy": float(scores["accuracy"].mean()), "kl": kl, "update_norm": norms}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="GROUP=CHECKPOINT",
                        help="a checkpoint (path without .npz) and the group it belongs to; repeat")
    parser.add_argument("--out", help="folder for the attention figures (one per group, its first checkpoint)")
    parser.add_argument("--grpo", action="store_true", help="also measure 3: the policy shift of one GRPO update")
    parser.add_argument("--grpo-seeds", type=int, default=3, help="rollouts (each from the base) to average over")
    args = parser.parse_args()
    task, tokenizer = AdditionTask(3), Tokenizer()
    data = heldout_worked(task, tokenizer)
    groups, results, models = defaultdict(list), {}, {}
    for entry in args.model:
        group, _, path = entry.partition("=")
        if not path:
            parser.error(f"--model {entry!r}: expected GROUP=CHECKPOINT")
        folder, file = os.path.split(os.path.normpath(path))
        run = os.path.basename(folder) + ("" if file == "pretrain_last" else "/" + file)
        name = f"{group}: {run}"  # the run folder, and the file unless it is the run's last pretraining checkpoint
        models[name] = load_checkpoint(path, restore_random_state=False)[0]
        results[name] = probe(models[name], data, task.digits, tokenizer, ablate=True)
        groups[group].append(name)
    report(results, groups)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        problem = task.problem(478, 356)  # a carry into every column: the answer reads back 8+6=14, 7+5+1=13, 4+3+1=8
        for group, names in groups.items():
            path = os.path.join(args.out, "attention_" + "".join(c if c.isalnum() else "_" for c in group) + ".png")
            example_attention(models[names[0]], task, tokenizer, problem, path, names[0])
            print(f"wrote {path}")
    if args.grpo:
        from minimoe.rl import GRPOConfig
        shifts = {}
        for name, model in models.items():  # the mean over args.grpo_seeds rollouts
            runs = [grpo_step_shift(model, task, tokenizer, GRPOConfig(), seed) for seed in range(args.grpo_seeds)]
            shifts[name] = {key: {g: float(np.mean([run[key][g] for run in runs])) for g in runs[0][key]}
                            for key in ("kl", "update_norm")}
            shifts[name]["accuracy"] = float(np.mean([run["accuracy"] for run in runs]))
        rows = sorted({group for shift in shifts.values() for group in shift["update_norm"]}) + ["all"]
        print_table(f"one GRPO update (lr 1e-3, 16 prompts × 8, mean of {args.grpo_seeds} rollouts): "
                    "KL(π_old ‖ π_new) per response token, applying one parameter group's part of the update alone",
                    rows, list(shifts),
                    lambda r, n: f"{shifts[n]['kl'].get(r, float('nan')):.5f}")
        print_table("  ... and the norm of that part of the update", rows[:-1], list(shifts),
                    lambda r, n: f"{shifts[n]['update_norm'].get(r, float('nan')):.4f}")
        print_table("  ... and KL / norm²: how far a unit of update moves the policy (KL grows as the square of a "
                    "small step)", rows[:-1], list(shifts),
                    lambda r, n: f"{shifts[n]['kl'].get(r, np.nan) / shifts[n]['update_norm'].get(r, np.nan) ** 2:.3f}")
        print_table("  rollout accuracy", ["accuracy"], list(shifts), lambda r, n: f"{shifts[n]['accuracy']:.3f}")


if __name__ == "__main__":
    main()
