"""Experiments for issue 19 (why MLA's base is weak, why GRPO collapses on it): the demo's pipeline cut in two so
that one pretrained base serves several RL recipes.

    python -m benchmarks.mla_rl base --config CFG.json --seed 0 --out DIR [--steps N]
        pretrain exactly as `python -m minimoe demo --preset classic` does (same config sections, same seeding:
        CFG.json goes over the library's defaults, not over the v3 preset), then the demo's
        evaluation, plus the held-out loss of each answer style; writes DIR/base.json and DIR/pretrain_last.npz
    python -m benchmarks.mla_rl rl --base DIR --config CFG.json --seed 0 --out DIR2
        GRPO from DIR/pretrain_last.npz with the grpo section of CFG.json, the demo's evaluation after, and per
        step: accuracy, format, KL to the reference, entropy, and the update norm of each parameter group;
        writes DIR2/rl.json

Run with OPENBLAS_NUM_THREADS=1 and nice. CPU time per run: a base ~86 s, GRPO ~44 s (the demo: ~110 s in all).

The configurations measured for issue 19 (lesson 08, section 8), each the V3-style model section
    {"attention": "mla", "score_func": "sigmoid", "n_shared_experts": 1, "bias_update_speed": 0.001,
     "route_scale": 2.5, "n_expert_groups": 4, "n_limited_groups": 2}
plus, one at a time, {"qk_rope_head_dim": 16} or {"kv_lora_rank": 64}; MHA is the classic config ({}). Then, on
the slow seed first, {"kv_lora_rank": 64, "rope_theta": 100.0} with pretraining sections such as {"steps": 1200}
(the first V3 preset), {"steps": 1100}, {"batch_size": 64, "steps": 2000}, {"min_lr": 1e-3} or
{"weight_decay": 0.1}. Last, the MoE: that attention with the softmax gate, with the sigmoid gate at route scale 1
and one group (today's preset, minimoe/presets/v3.json, the demo's default), with groups or route scale 2.5
added, with route scale 0.5, the softmax gate at route scale 2, or {"ffn": "dense"}; and GRPO from the same bases at {"lr": 5e-4, "min_lr": 5e-5} against the classic 1e-3.
Lesson 08, section 8 has the tables.
"""

import argparse
import json
import os
import time

import numpy as np

from minimoe import backend
from minimoe.checkpoint import load_checkpoint
from minimoe.cli import _setup
from minimoe.evaluate import evaluate
from minimoe.model import Transformer
from minimoe.rl import train_grpo
from minimoe.tasks import STYLES
from minimoe.train import heldout_loss, pretrain


def _args(config, seed):
    return argparse.Namespace(config=config, seed=seed, backend="numpy", threads=1)


def style_losses(model, task, tokenizer, pretrain_config):
    """Held-out next-token loss of each answer style alone (the same 256 test problems for every model)."""
    out = {}
    for style in STYLES:
        one = type(pretrain_config).from_dict({**pretrain_config.to_dict(), "mix": {style: 1.0}})
        out[style] = heldout_loss(model, task, tokenizer, one)
    return out


def parameter_group(name):
    """A coarse name for a parameter: attention projections by name, experts, gate, norms, embed/head."""
    parts = name.split(".")
    if parts[0] in ("embed", "head", "norm"):
        return parts[0]
    if "attn" in parts:
        return "attn." + parts[parts.index("attn") + 1]
    if "gate" in parts:
        return "ffn.gate"
    if "norm" in parts[-2]:
        return "norms"
    return "ffn.experts"


def command_base(args):
    config, task, tokenizer = _setup(_args(args.config, args.seed))
    pretrain_config = config["pretrain_config"]
    if args.steps:
        pretrain_config.steps = args.steps
        pretrain_config.warmup_steps = min(pretrain_config.warmup_steps, args.steps)
        pretrain_config.checkpoint_every = 0
        pretrain_config.eval_every = 0
    model = Transformer(config["model_config"])
    started = time.perf_counter()
    history = pretrain(model, task, pretrain_config, tokenizer, out_dir=args.out, progress=False, overwrite=True)
    seconds = time.perf_counter() - started
    before = evaluate(model, task, tokenizer, **config["eval_settings"])
    result = {"config": args.config, "seed": args.seed, "steps": pretrain_config.steps, "pretrain_seconds": seconds,
              "cpu_seconds": time.process_time(),
              "final_loss": history["lm_loss"][-1], "style_loss": style_losses(model, task, tokenizer,
                                                                                pretrain_config),
              "before": before, "model": model.config.to_dict()}
    with open(os.path.join(args.out, "base.json"), "w") as file:
        json.dump(result, file, indent=1)
    print(json.dumps({k: result[k] for k in ("config", "seed", "steps", "pretrain_seconds", "style_loss")}))
    print({k: before[k] for k in ("accuracy", "pass_at_1", "pass_at_k", "thinking_share")})


class Stop(Exception):
    """Ends a diagnostic run early."""


def command_rl(args):
    config, task, tokenizer = _setup(_args(args.config, args.seed))
    model = load_checkpoint(os.path.join(args.base, "pretrain_last"), restore_random_state=False)[0]
    grpo_config = config["grpo_config"]
    previous = {name: p.data.copy() for name, p in model.named_parameters()}
    groups = sorted({parameter_group(name) for name in previous})

    def on_step(step, record):
        norms = {g: 0.0 for g in groups}
        for name, p in model.named_parameters():
            norms[parameter_group(name)] += float(((p.data - previous[name]) ** 2).sum())
            previous[name] = p.data.copy()
        record["update_norm"] = {g: v ** 0.5 for g, v in norms.items()}
        records.append(record)
        if step == args.stop_after:
            raise Stop

    records = []
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    try:
        history = train_grpo(model, task, grpo_config, tokenizer, out_dir=args.out, progress=False, on_step=on_step,
                             overwrite=True)
    except Stop:
        history = {"steps": records, "warnings": "stopped early"}
    seconds = time.perf_counter() - started
    after = {} if args.no_eval or args.stop_after else evaluate(model, task, tokenizer, **config["eval_settings"])
    keys = ("step", "accuracy", "format_rate", "reward_mean", "all_equal_share", "zero_accuracy_share", "kl",
            "policy_shift", "entropy", "grad_norm", "lr", "update_norm", "thinking_share")
    steps = [{k: s.get(k) for k in keys} for s in history["steps"]]
    result = {"config": args.config, "base": args.base, "seed": args.seed, "rl_seconds": seconds, "after": after,
              "cpu_seconds": time.process_time(),
              "grpo": grpo_config.to_dict(), "steps": steps,
              "warnings": history["warnings"]}
    with open(os.path.join(args.out, "rl.json"), "w") as file:
        json.dump(result, file, indent=1)
    print({k: after.get(k) for k in ("accuracy", "pass_at_1", "pass_at_k", "thinking_share")}, f"{seconds:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base")
    base.add_argument("--config")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--out", required=True)
    base.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the config's)")
    rl = sub.add_parser("rl")
    rl.add_argument("--base", required=True)
    rl.add_argument("--config")
    rl.add_argument("--seed", type=int, default=0)
    rl.add_argument("--out", required=True)
    rl.add_argument("--stop-after", type=int, default=0, help="stop after this many steps (the schedule is the "
                                                               "config's); 0: run them all")
    rl.add_argument("--no-eval", action="store_true", help="skip the evaluation after RL")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    {"base": command_base, "rl": command_rl}[args.command](args)


if __name__ == "__main__":
    np.seterr(all="ignore")
    backend.get_backend()
    main()
