"""How lessons/data/distill_results.json was made (lesson 12 reads it; remaking it takes ~8 CPU minutes).

    # the teacher: the classic demo's GRPO (learning rate 1e-3)
    python -m minimoe rl --preset classic --checkpoint lessons/data/base_addition3 --out runs/teacher
    # lessons/data/teacher_addition3.npz is runs/teacher/rl_last's weights (save_checkpoint(path, model))
    for seed in 0 1 2; do                  # the distill defaults, 8 samples per problem for pass@8
        python -m minimoe distill --teacher lessons/data/teacher_addition3 --out runs/distill-$seed --seed $seed \
            --config eval8.json            # {"eval": {"n_samples": 8}}
    done
    python lessons/data/distill_experiments.py cold_start                # cold start vs zero -> runs/cold_start.json
    python lessons/data/distill_experiments.py cold_start runs/cold_start_lr1e-4.json 1e-4   # gentler GRPO after SFT
    python lessons/data/distill_experiments.py collect runs/distill-0 runs/distill-1 runs/distill-2

`collect` gathers the three summaries, the cold-start comparison and the reward-hacking curves (rerun here, as the
lesson does) into distill_results.json, and copies seed 0's student checkpoints next to it.
"""

import json
import os
import shutil
import sys

import numpy as np

import minimoe
from minimoe.checkpoint import load_checkpoint
from minimoe.distill import cold_start_vs_zero, reward_hacking_run, self_consistency_judge
from minimoe.rl import GRPOConfig
from minimoe.tasks import AdditionTask

HERE = os.path.dirname(os.path.abspath(__file__))


def cold_start(out="runs/cold_start.json", lr=None):
    """Cold start vs zero with the demo's GRPO settings; with `lr`, only the cold-start arm, at that GRPO lr."""
    minimoe.manual_seed(0)
    base = load_checkpoint(os.path.join(HERE, "base_addition3"), restore_random_state=False)[0]
    grpo = GRPOConfig(seed=0) if lr is None else GRPOConfig(seed=0, lr=float(lr), min_lr=float(lr) / 10)
    results = cold_start_vs_zero(base, AdditionTask(3), n_clean=300, seed=0, grpo_config=grpo,
                                 arms=("cold_start", "zero") if lr is None else ("cold_start",))
    keep = ("accuracy", "pass_at_1", "pass_at_k", "mean_length", "consistency", "thinking_share", "steps_to_90",
            "cpu_seconds", "sft_cpu_seconds")
    summary = {arm: {**{k: r[k] for k in keep},
                     "batch_accuracy": [s["accuracy"] for s in r["history"]["steps"]],
                     "after_sft": {k: r["after_sft"][k] for k in keep if k in r["after_sft"]} if r["after_sft"]
                     else None} for arm, r in results.items()}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as file:
        json.dump(summary, file, indent=1)
    print(json.dumps({arm: {k: v for k, v in r.items() if k != "batch_accuracy"} for arm, r in summary.items()},
                     indent=1))


def collect(*runs, cold="runs/cold_start.json", cold_low_lr="runs/cold_start_lr1e-4.json"):
    seeds = []
    for run in runs:
        with open(os.path.join(run, "summary.json")) as file:
            summary = json.load(file)
        seeds.append({key: summary[key] for key in ("seed", "arms", "rejection", "steps", "seconds", "distill")})
    minimoe.manual_seed(0)
    base = load_checkpoint(os.path.join(HERE, "base_addition3"), restore_random_state=False)[0]
    hacking = reward_hacking_run(base, self_consistency_judge, GRPOConfig(steps=40, log_kl=False))
    results = {"seeds": seeds, "reward_hacking": hacking}
    if os.path.exists(cold):
        with open(cold) as file:
            results["cold_start"] = json.load(file)
    if os.path.exists(cold_low_lr):
        with open(cold_low_lr) as file:
            results["cold_start"]["cold_start_grpo_lr1e-4"] = json.load(file)["cold_start"]
    with open(os.path.join(HERE, "distill_results.json"), "w") as file:
        json.dump(results, file, indent=1)
    os.makedirs(os.path.join(HERE, "distill"), exist_ok=True)
    for name in ("student_base", "arm_a_grpo", "arm_b_sft", "arm_c_sft_grpo"):
        shutil.copy(os.path.join(runs[0], name + ".npz"), os.path.join(HERE, "distill", name + ".npz"))
    table = {}
    for seed in seeds:
        for row in seed["arms"]:
            table.setdefault(row["arm"], []).append(row)
    for arm, rows in table.items():
        print(f"{arm:22}" + "  ".join(f"{key} {np.mean([r[key] for r in rows]):.3f}±{np.std([r[key] for r in rows]):.3f}"
                                      for key in ("accuracy", "pass_at_1", "pass_at_k", "consistency", "mean_length")))


if __name__ == "__main__":
    {"cold_start": cold_start, "collect": collect}[sys.argv[1]](*sys.argv[2:])
