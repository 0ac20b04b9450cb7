"""`python -m minimoe …`: the whole story in one command, and each of its steps on its own.

    python -m minimoe demo                      pretrain → evaluate → GRPO → evaluate, plots and a summary
    python -m minimoe train --out runs/base     pretrain a model
    python -m minimoe rl --checkpoint runs/base/pretrain_last --out runs/rl
    python -m minimoe eval --checkpoint runs/rl/rl_last
    python -m minimoe generate --checkpoint runs/rl/rl_last --prompt 347+589=

Every command takes --seed, --backend (numpy | cupy | fakegpu), --out and --config: a JSON file whose sections
override the defaults, e.g. {"model": {"dim": 96}, "pretrain": {"steps": 2000}, "grpo": {"lr": 1e-4},
"eval": {"n_problems": 500}, "task": "addition3"}.
"""

import argparse
import json
import os
import time

from . import backend
from .backend import numpy
from .checkpoint import load_checkpoint
from .evaluate import evaluate, sample_responses
from .model import ModelConfig, Transformer
from .plots import plot_expert_load, plot_pretraining, plot_rl
from .rl import GRPOConfig, train_grpo
from .tasks import AdditionTask, CountdownTask, Problem, Tokenizer
from .train import PretrainConfig, pretrain

TASKS = {"addition3": lambda: AdditionTask(3), "addition4": lambda: AdditionTask(4), "countdown": CountdownTask}
EVAL_DEFAULTS = {"n_problems": 200, "n_samples": 16, "k": 8, "temperature": 1.0, "max_new_tokens": 40}
METRICS = [("accuracy", "greedy accuracy"), ("pass_at_1", "pass@1 (T=1)"), ("pass_at_k", "pass@{k}"),
           ("mean_length", "mean response length"), ("thinking_share", "thinking share")]


def _load_config(path):
    config = {"model": {}, "pretrain": {}, "grpo": {}, "eval": {}, "task": "addition3"}
    if path:
        with open(path) as file:
            overrides = json.load(file)
        unknown = set(overrides) - set(config)
        if unknown:
            raise SystemExit(f"--config {path}: unknown section(s) {sorted(unknown)}; known: {sorted(config)}")
        for key, value in overrides.items():
            config[key] = value if key == "task" else {**config[key], **value}
    if config["task"] not in TASKS:
        raise SystemExit(f"--config: unknown task {config['task']!r}; choose one of {sorted(TASKS)}")
    return config


def _setup(args):
    """Backend, seed and BLAS threads, then the task and the tokenizer."""
    try:
        backend.set_backend(args.backend)
    except backend.BackendUnavailableError as error:
        raise SystemExit(f"--backend {args.backend}: {error}") from None
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads, user_api="blas")  # after NumPy's import: limits bind loaded libraries
    backend.keep_freed_host_memory()  # a training loop reuses its temporaries: keep them instead of page-faulting
    backend.manual_seed(args.seed)
    config = _load_config(args.config)
    return config, TASKS[config["task"]](), Tokenizer()


def _eval_settings(config, task):
    settings = {**EVAL_DEFAULTS, **config["eval"]}
    if isinstance(task, AdditionTask) and task.digits > 3 and "max_new_tokens" not in config["eval"]:
        settings["max_new_tokens"] = 48
    return settings


def _table(before, after):
    """The before/after table as text."""
    rows = [f"{'':24}{'before RL':>12}{'after RL':>12}"]
    for key, label in METRICS:
        label = label.format(k=after.get("k", before.get("k")))
        rows.append(f"{label:24}" + "".join(f"{m[key]:>12.3f}" if key != "mean_length" else f"{m[key]:>12.1f}"
                                            for m in (before, after)))
    return "\n".join(rows)


def _samples(model, task, tokenizer, n=6, seed=99):
    problems = task.sample(numpy.random.default_rng(seed), n, split="test")
    texts = sample_responses(model, problems, tokenizer, greedy=True).texts
    return [f"{p.prompt}  ->  {text}   [{'right' if task.reward(p, text).accuracy else 'wrong'}, answer "
            f"{p.reference}]" for p, text in zip(problems, texts)]


def command_demo(args):
    started = time.perf_counter()
    config, task, tokenizer = _setup(args)
    out = args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    model_config = ModelConfig(**{"vocab_size": tokenizer.vocab_size, **config["model"]})
    pretrain_config = PretrainConfig(**{"seed": args.seed, **config["pretrain"]})
    grpo_config = GRPOConfig(**{"seed": args.seed, **config["grpo"]})
    evaluation = _eval_settings(config, task)
    model = Transformer(model_config)
    counts = model.parameter_counts()
    print(f"minimoe demo: {counts['total']:,} parameters ({counts['activated']:,} active per token), "
          f"task {config['task']}, backend {args.backend}, seed {args.seed}, run folder {out}")

    pretrain_history = pretrain(model, task, pretrain_config, tokenizer, out_dir=out, progress=not args.quiet)
    print(f"pretrained {pretrain_config.steps} steps in {pretrain_history['seconds']:.0f} s, "
          f"final loss {pretrain_history['lm_loss'][-1]:.3f}; evaluating ...")
    before = evaluate(model, task, tokenizer, **evaluation)
    before_samples = _samples(model, task, tokenizer)

    rl_history = train_grpo(model, task, grpo_config, tokenizer, out_dir=out, progress=not args.quiet)
    print(f"GRPO {grpo_config.steps} steps in {rl_history['seconds']:.0f} s; evaluating ...")
    after = evaluate(model, task, tokenizer, **evaluation)
    after_samples = _samples(model, task, tokenizer)

    plot_pretraining(pretrain_history, os.path.join(out, "pretraining.png"))
    plot_rl(rl_history, os.path.join(out, "grpo.png"))
    plot_expert_load({"pretraining": pretrain_history, "GRPO": rl_history}, os.path.join(out, "expert_load.png"))
    summary = {"before": before, "after": after, "seconds": time.perf_counter() - started,
               "pretrain_seconds": pretrain_history["seconds"], "rl_seconds": rl_history["seconds"],
               "task": config["task"], "seed": args.seed, "backend": args.backend,
               "parameters": counts, "model": model_config.to_dict(), "pretrain": pretrain_config.to_dict(),
               "grpo": grpo_config.to_dict(), "eval": evaluation,
               "samples": {"before": before_samples, "after": after_samples}}
    with open(os.path.join(out, "summary.json"), "w") as file:
        json.dump(summary, file, indent=1)
    print("\n" + _table(before, after))
    print("\nHeld-out problems, greedy answers before RL:")
    print("\n".join("  " + s for s in before_samples))
    print("after RL:")
    print("\n".join("  " + s for s in after_samples))
    print(f"\nplots, checkpoints and summary.json in {out} ({summary['seconds']:.0f} s in all)")
    return summary


def command_train(args):
    config, task, tokenizer = _setup(args)
    out = args.out or os.path.join("runs", time.strftime("train-%Y%m%d-%H%M%S"))
    pretrain_config = PretrainConfig(**{"seed": args.seed, **config["pretrain"]})
    resume = os.path.join(out, "pretrain_last") if args.resume else None
    model = load_checkpoint(resume, restore_random_state=False)[0] if resume else \
        Transformer(ModelConfig(**{"vocab_size": tokenizer.vocab_size, **config["model"]}))
    history = pretrain(model, task, pretrain_config, tokenizer, out_dir=out, resume_from=resume,
                       progress=not args.quiet)
    plot_pretraining(history, os.path.join(out, "pretraining.png"))
    print(f"final loss {history['lm_loss'][-1]:.3f}; checkpoint {os.path.join(out, 'pretrain_last')}")


def command_rl(args):
    config, task, tokenizer = _setup(args)
    if not args.checkpoint:
        raise SystemExit("rl: --checkpoint (a pretrained model) is required")
    out = args.out or os.path.join("runs", time.strftime("rl-%Y%m%d-%H%M%S"))
    model = load_checkpoint(args.checkpoint, restore_random_state=False)[0]
    grpo_config = GRPOConfig(**{"seed": args.seed, **config["grpo"]})
    resume = os.path.join(out, "rl_last") if args.resume else None
    history = train_grpo(model, task, grpo_config, tokenizer, out_dir=out, resume_from=resume,
                         progress=not args.quiet)
    plot_rl(history, os.path.join(out, "grpo.png"))
    plot_expert_load({"GRPO": history}, os.path.join(out, "expert_load.png"))
    print(f"final batch accuracy {history['steps'][-1]['accuracy']:.3f}; checkpoint {os.path.join(out, 'rl_last')}")


def command_eval(args):
    config, task, tokenizer = _setup(args)
    if not args.checkpoint:
        raise SystemExit("eval: --checkpoint is required")
    model = load_checkpoint(args.checkpoint, restore_random_state=False)[0]
    result = evaluate(model, task, tokenizer, **_eval_settings(config, task))
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eval.json"), "w") as file:
            json.dump(result, file, indent=1)


def command_generate(args):
    config, task, tokenizer = _setup(args)
    if not args.checkpoint or not args.prompt:
        raise SystemExit("generate: --checkpoint and --prompt are required")
    model = load_checkpoint(args.checkpoint, restore_random_state=False)[0]
    problem = Problem(prompt=args.prompt, reference="", task=config["task"], operands=(), target=None)
    try:
        responses = sample_responses(model, [problem], tokenizer, args.n, _eval_settings(config, task)["max_new_tokens"],
                                     temperature=args.temperature, greedy=args.temperature == 0,
                                     speculative=args.speculative)
    except ValueError as error:
        raise SystemExit(f"generate: {error}") from None
    for text in responses.texts:
        print(f"{args.prompt}{text}")


COMMANDS = {"demo": command_demo, "train": command_train, "rl": command_rl, "eval": command_eval,
            "generate": command_generate}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minimoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--config", help="JSON file of overrides: sections model, pretrain, grpo, eval, task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=os.environ.get("MINIMOE_BACKEND", "numpy"),
                        choices=["numpy", "cupy", "fakegpu"])
    parser.add_argument("--out", help="run folder (checkpoints, plots, summary)")
    parser.add_argument("--checkpoint", help="a checkpoint path (without .npz/.json) for rl, eval, generate")
    parser.add_argument("--resume", action="store_true", help="train/rl: continue the run in --out")
    parser.add_argument("--prompt", help="generate: the prompt, e.g. 347+589=")
    parser.add_argument("--n", type=int, default=4, help="generate: number of samples")
    parser.add_argument("--temperature", type=float, default=1.0, help="generate: 0 for greedy")
    parser.add_argument("--speculative", action="store_true",
                        help="generate: draft with the model's multi-token prediction modules (n_mtp_modules ≥ 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (default 1: this model's matrices are too small to share, and a second "
                             "thread spin-waits on a busy core; 0 leaves the BLAS library's own setting)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
