"""Do the experts specialise? Three experiments over several seeds, written to one JSON file (issue 17).

    rl           the committed classic demo base model (lessons/data/base_addition3) before and after GRPO, one GRPO run
                 per seed: does RL change who does what? (specialisation U per labelling and layer, the share of
                 tokens whose experts changed, greedy accuracy)
    granularity  coarse (8 experts of width I, top-2) vs fine-grained (16 of width I/2, top-4), each with and
                 without the shared expert (without it, one more routed expert's worth is activated: top-3 /
                 top-6), so that every model activates the same FFN width per token (192): DeepSeekMoE's
                 comparison at equal compute (total FFN width 576 with the shared expert, 512 without; the
                 shared expert of the fine model is two of width I/2, i.e. one of width I). Each is pretrained from
                 scratch per seed (reduced steps: see --pretrain-steps) and measured: U, the excess over the
                 shuffled null, the mean cosine similarity between experts' outputs (redundancy), accuracy.
    ablation     per model (the committed base, and the coarse+shared model of each seed): every routed expert of
                 every layer is removed in turn (the gate never picks it); for each, the change in next-token loss
                 at the positions whose input is of each category, and the greedy accuracy answering directly and
                 when made to think (prompt + <think>). Then: the rank correlation over (expert, category) pairs
                 between routing lift p(e|c)/p(e) and loss increase; and for a few categories, the specialist (the
                 highest lift among experts taking ≥ 20 % of the category) against the median other expert of
                 its layer.

All analysis runs on fixed held-out token sequences (the test split's corpus, all three styles), teacher-forced.

    nice -n 10 python -m benchmarks.specialisation --seeds 0 1 2 --pretrain-steps 400 \
        --compact --out lessons/data/specialisation.json        # lesson 15's copy (about 1.5 h on 2 busy cores)
"""

import argparse
import dataclasses
import json
import os
import time

import numpy as np

import minimoe
from minimoe import analysis
from minimoe.checkpoint import load_checkpoint
from minimoe.evaluate import sample_responses, score_responses
from minimoe.model import ModelConfig, Transformer
from minimoe.rewards import THINK
from minimoe.rl import GRPOConfig, train_grpo
from minimoe.tasks import AdditionTask, Tokenizer, build_corpus
from minimoe.train import PretrainConfig, heldout_loss, pretrain

BASE = os.path.join(os.path.dirname(__file__), "..", "lessons", "data", "base_addition3")
VARIANTS = {
    "coarse+shared": dict(n_routed_experts=8, moe_inter_dim=64, n_activated_experts=2, n_shared_experts=1),
    "coarse": dict(n_routed_experts=8, moe_inter_dim=64, n_activated_experts=3, n_shared_experts=0),
    "fine+shared": dict(n_routed_experts=16, moe_inter_dim=32, n_activated_experts=4, n_shared_experts=2),
    "fine": dict(n_routed_experts=16, moe_inter_dim=32, n_activated_experts=6, n_shared_experts=0),
}
ABLATION_TARGETS = [("token", "<answer>"), ("token", "</answer>"), ("token", "="), ("token", "space"),
                    ("digit_role", "carry"), ("digit_role", "answer")]


def analysis_set(n=256, seed=7):
    """Fixed held-out sequences (ids (B, T), completion mask (B, T)) in the corpus's mix of styles."""
    corpus = build_corpus(AdditionTask(3), n, np.random.default_rng(seed), split="test")
    encoded = corpus.encode(Tokenizer())
    return encoded.ids, encoded.completion_mask


def greedy(model, problems):
    responses = sample_responses(model, problems, Tokenizer(), 1, 40, greedy=True)
    scores = score_responses(AdditionTask(3), responses)
    return responses, scores


def measure(model, ids, problems, n_shuffles=20):
    routes = analysis.route(model, ids)
    categories = analysis.token_categories(ids)
    similarity = analysis.expert_output_similarity(model, routes)
    off_diagonal = [float(s[~np.eye(len(s), dtype=bool)].mean()) for s in similarity]
    _, scores = greedy(model, problems)
    loads = [np.bincount(e[routes.mask].reshape(-1), minlength=s.shape[-1]) for e, s in
             zip(routes.experts, routes.scores)]
    top1 = routes._replace(experts=[e[..., :1] for e in routes.experts])  # K differs between models: compare top-1
    return routes, {"specialisation": analysis.specialisation(routes, categories, ids, n_shuffles),
                    "specialisation_top1": analysis.specialisation(top1, categories, ids, n_shuffles),
                    "output_cosine": off_diagonal,
                    "load_max_over_mean": [float(load.max() / load.mean()) for load in loads],
                    "accuracy": float(scores["accuracy"].mean()), "thinking_share": float(scores["thinks"].mean())}


def routing_change(before, after):
    """Share of real tokens whose top-1 expert changed, and the mean Jaccard overlap of the top-K sets, per layer."""
    result = []
    for e0, e1 in zip(before.experts, after.experts):
        mask = before.mask
        top1 = float((e0[..., 0] != e1[..., 0])[mask].mean())
        same = (e0[..., :, None] == e1[..., None, :]).any(-1).sum(-1)  # (B, T) experts in both sets
        k = e0.shape[-1]
        result.append({"top1_changed": top1, "jaccard": float((same / (2 * k - same))[mask].mean())})
    return result


def experiment_rl(seeds, steps, ids, problems, log):
    base, _ = load_checkpoint(BASE, restore_random_state=False)
    routes_before, before = measure(base, ids, problems)
    runs = []
    for seed in seeds:
        started = time.perf_counter()
        model, _ = load_checkpoint(BASE, restore_random_state=False)
        minimoe.manual_seed(seed)
        history = train_grpo(model, AdditionTask(3), GRPOConfig(steps=steps, seed=seed), progress=False)
        routes_after, after = measure(model, ids, problems)
        runs.append({"seed": seed, "after": after, "change": routing_change(routes_before, routes_after),
                     "final_train_accuracy": history["steps"][-1]["accuracy"],
                     "seconds": time.perf_counter() - started})
        log(f"rl seed {seed}: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
            f"{time.perf_counter() - started:.0f} s")
    return {"grpo_steps": steps, "before": before, "runs": runs}


def train_variant(name, seed, steps, folder):
    config = ModelConfig(vocab_size=Tokenizer().vocab_size, **VARIANTS[name])
    path = os.path.join(folder, f"{name}_seed{seed}_steps{steps}")
    if os.path.exists(path + ".json"):
        return load_checkpoint(path, restore_random_state=False)[0], None
    from minimoe.checkpoint import save_checkpoint

    minimoe.manual_seed(seed)
    model = Transformer(config)
    train_config = PretrainConfig(steps=steps, seed=seed, warmup_steps=min(50, steps // 10), eval_every=steps,
                                  checkpoint_every=0)
    history = pretrain(model, AdditionTask(3), train_config, progress=False)
    save_checkpoint(path, model)
    return model, history


def experiment_granularity(seeds, steps, ids, problems, folder, log):
    results = {name: [] for name in VARIANTS}
    models = {}
    for seed in seeds:
        for name in VARIANTS:
            started = time.perf_counter()
            model, _ = train_variant(name, seed, steps, folder)
            _, measured = measure(model, ids, problems)
            measured.update(seed=seed, heldout_loss=heldout_loss(model, AdditionTask(3), Tokenizer(),
                                                                 PretrainConfig()),
                            parameters=model.parameter_counts(), seconds=time.perf_counter() - started)
            results[name].append(measured)
            models[name, seed] = model
            log(f"granularity {name} seed {seed}: U(token) "
                f"{[round(l['U'], 3) for l in measured['specialisation']['token']]}, "
                f"cos {[round(c, 3) for c in measured['output_cosine']]}, acc {measured['accuracy']:.3f}, "
                f"{time.perf_counter() - started:.0f} s")
            yield results, models


def ablate(model, ids, completion, problems, targets=ABLATION_TARGETS):
    """The ablation experiment on one model (see the module docstring). Every routed expert of every layer is
    disabled in turn; for each, the change in next-token loss at the positions whose input token is of each
    category (positions that predict a completion token only), and the greedy accuracy answering directly and
    when made to think (the prompt ends with <think>, so the answer needs the column walk)."""
    routes = analysis.route(model, ids)
    categories = analysis.token_categories(ids)
    predicts = completion[:, 1:]  # (B, T-1): position t predicts a completion token
    base_loss = analysis.token_losses(model, ids)  # (B, T-1)
    thinking = [dataclasses.replace(p, prompt=p.prompt + THINK) for p in problems]
    base = {"direct": float(greedy(model, problems)[1]["accuracy"].mean()),
            "think": float(greedy(model, thinking)[1]["accuracy"].mean())}
    labellings = ("token", "digit_role")
    inputs = {name: categories[name].labels[:, :-1] for name in labellings}  # (B, T-1) category of the input
    experts = []
    for layer, chosen in enumerate(routes.experts):
        n_experts = routes.scores[layer].shape[-1]
        for expert in range(n_experts):
            with analysis.experts_disabled(model, {layer: [expert]}):
                delta = analysis.token_losses(model, ids) - base_loss
                accuracy = {"direct": float(greedy(model, problems)[1]["accuracy"].mean()),
                            "think": float(greedy(model, thinking)[1]["accuracy"].mean())}
            record = {"layer": layer, "expert": expert, "accuracy": accuracy,
                      "delta_loss_all": float(delta[predicts].mean())}
            for name in labellings:
                counts = analysis.contingency(categories[name].labels, chosen, len(categories[name].names), n_experts)
                share = counts[:, expert] / np.maximum(counts.sum(axis=1), 1)  # (C,) p(e|c)
                load = counts[:, expert].sum() / counts.sum()
                lift = share / load if load > 0 else np.zeros_like(share)  # an expert nobody picks: no lift
                rows = {}
                for c, category in enumerate(categories[name].names):
                    here = (inputs[name] == c) & predicts
                    if here.sum() >= 20:
                        rows[category] = {"delta_loss": float(delta[here].mean()),
                                          "delta_loss_other": float(delta[predicts & ~here].mean()),
                                          "share": float(share[c]), "lift": float(lift[c]), "tokens": int(here.sum())}
                record[name] = rows
            experts.append(record)
    # Does routing specialisation predict what an expert is needed for? Rank correlation, over all (expert,
    # category) pairs, between the expert's lift for the category and the loss increase on it when it is removed.
    from scipy.stats import spearmanr

    pairs = [(row["lift"], row["delta_loss"]) for record in experts for name in labellings
             for row in record[name].values()]
    rho = spearmanr(*zip(*pairs))
    specialists = []
    for name, category in targets:
        candidates = [r for r in experts if category in r[name] and r[name][category]["share"] >= 0.2]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r[name][category]["lift"])
        others = [r for r in experts if r["layer"] == best["layer"] and r is not best and category in r[name]]
        deltas = sorted((r[name][category]["delta_loss"] for r in experts
                         if r["layer"] == best["layer"] and category in r[name]), reverse=True)
        row = best[name][category]
        specialists.append({
            "labelling": name, "category": category, "layer": best["layer"], "expert": best["expert"],
            "lift": row["lift"], "share": row["share"], "tokens": row["tokens"],
            "delta_loss_category": row["delta_loss"], "delta_loss_other": row["delta_loss_other"],
            "rank_of_its_delta_in_layer": deltas.index(row["delta_loss"]) + 1,
            "others_median_delta_loss_category": float(np.median([r[name][category]["delta_loss"] for r in others])),
            "accuracy_drop_direct": base["direct"] - best["accuracy"]["direct"],
            "accuracy_drop_think": base["think"] - best["accuracy"]["think"],
            "others_median_accuracy_drop_direct": float(np.median([base["direct"] - r["accuracy"]["direct"]
                                                                   for r in others])),
            "others_median_accuracy_drop_think": float(np.median([base["think"] - r["accuracy"]["think"]
                                                                  for r in others]))})
    return {"accuracy": base, "lift_vs_delta_loss_spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "pairs": len(pairs), "specialists": specialists, "experts": experts}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.specialisation", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--grpo-steps", type=int, default=150)
    parser.add_argument("--problems", type=int, default=200, help="held-out problems for greedy accuracy")
    parser.add_argument("--ablation-problems", type=int, default=100,
                        help="held-out problems for greedy accuracy, twice per expert removed")
    parser.add_argument("--experiments", nargs="+", default=["rl", "ablation", "granularity"])
    parser.add_argument("--base-seeds", type=int, nargs="*", default=[1, 2],
                        help="ablation: also pretrain the demo configuration with these seeds, for as many steps as "
                             "the committed (seed 0) base model had")
    parser.add_argument("--folder", default="runs/specialisation", help="where pretrained variants are cached")
    parser.add_argument("--out", default="runs/specialisation/specialisation.json")
    parser.add_argument("--compact", action="store_true", help="leave out the per-expert ablation records (the "
                                                                 "lesson's copy in lessons/data/ is compact)")
    args = parser.parse_args(argv)
    os.makedirs(args.folder, exist_ok=True)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    results = {"settings": {**vars(args), "analysis_sequences": 256, "null_shuffles": 20,
                            "variants": VARIANTS, "pretrain": "PretrainConfig defaults (batch 128, lr 3e-3) "
                                                              "except steps, warmup min(50, steps/10), seed"}}

    def save():
        if args.compact:
            for run in results.get("ablation", {}).values():
                run.pop("experts", None)
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)

    ids, completion = analysis_set()
    problems = AdditionTask(3).sample(np.random.default_rng(1234), args.problems, split="test")
    ablation_problems = AdditionTask(3).sample(np.random.default_rng(1234), args.ablation_problems, split="test")
    if "rl" in args.experiments:
        results["rl"] = experiment_rl(args.seeds, args.grpo_steps, ids, problems, log)
        save()
    if "ablation" in args.experiments:
        base, state = load_checkpoint(BASE, restore_random_state=False)
        results["ablation"] = {"base seed 0 (committed)": ablate(base, ids, completion, ablation_problems)}
        log("ablation on the committed base done")
        save()
        for seed in args.base_seeds:
            model, _ = train_variant("coarse+shared", seed, state["config"]["steps"], args.folder)
            results["ablation"][f"base seed {seed}"] = ablate(model, ids, completion, ablation_problems)
            log(f"ablation on the base model of seed {seed} done")
            save()
    if "granularity" in args.experiments:
        for granularity, _ in experiment_granularity(args.seeds, args.pretrain_steps, ids, problems, args.folder,
                                                     log):
            results["granularity"] = granularity
            save()
    if "ablation" in args.experiments:
        for seed in args.seeds:
            model, _ = train_variant("coarse+shared", seed, args.pretrain_steps, args.folder)
            name = f"coarse+shared, {args.pretrain_steps} steps, seed {seed}"
            results["ablation"][name] = ablate(model, ids, completion, ablation_problems)
            log(f"ablation seed {seed} done")
            save()
    log("all done")


if __name__ == "__main__":
    main()
