"""`python -m minimoe …`: the whole story in one command, and each of its steps on its own.

    python -m minimoe demo                      pretrain → evaluate → GRPO → evaluate, plots and a summary
    python -m minimoe train --out runs/base     pretrain a model (--checkpoint X: start from X's weights)
    python -m minimoe rl --checkpoint runs/base/pretrain_last --out runs/rl
    python -m minimoe eval --checkpoint runs/rl/rl_last
    python -m minimoe generate --checkpoint runs/rl/rl_last --prompt 347+589=
    python -m minimoe distill --teacher runs/rl/rl_last --out runs/distill   (a)-(c): a small student, 3 ways

Every command takes --seed, --backend (numpy | cupy | fakegpu), --threads, --debug and --config: a JSON file
whose sections override the defaults, e.g. {"model": {"dim": 96}, "pretrain": {"steps": 2000}, "grpo": {"lr":
1e-4}, "eval": {"n_problems": 500}, "task": "addition3"}. Everything is checked before any work starts: each flag,
each section and field of --config (type, range, consistency), and, where a model comes from a checkpoint, that
the --config model fields agree with it. An error prints one line, `minimoe: error: …`, and exits with status 2
(--debug shows the traceback).

demo, train and rl start from a preset (minimoe/preset.py), --config goes on top of it: --preset v3 (the default)
is DeepSeek-V3's architecture in miniature (Multi-head Latent Attention, a sigmoid gate, GRPO at 5e-4); --preset
classic is the library's own defaults (multi-head attention, a softmax gate, GRPO at 1e-3).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

from . import backend, distributed
from .backend import numpy
from .checkpoint import load_checkpoint
from .evaluate import check_evaluation, evaluate
from .generate import sample_responses
from .loop import RunFolder, RunFolderError
from .model import ModelConfig, Transformer
from .preset import DEFAULT_PRESET, PRESETS, load_preset
from .rl import GRPOConfig, train_grpo
from .tasks import AdditionTask, CountdownTask, Problem, Tokenizer, build_corpus
from .train import PretrainConfig, TrainingDiverged, pretrain
from .validation import ConfigError

TASKS = {"addition3": lambda: AdditionTask(3), "addition4": lambda: AdditionTask(4), "countdown": CountdownTask}
SECTIONS = ("model", "pretrain", "grpo", "eval", "task", "distill")
EVAL_DEFAULTS = {"n_problems": 200, "n_samples": 16, "k": 8, "temperature": 1.0, "max_new_tokens": 40}
METRICS = [("accuracy", "greedy accuracy"), ("pass_at_1", "pass@1 (T=1)"), ("pass_at_k", "pass@{k}"),
           ("mean_length", "mean response length"), ("thinking_share", "thinking share")]
# What the CLI reports as one line (exit status 2): a bad setting, a refused checkpoint, a file it cannot read or
# write, a diverged run. Anything else is a bug, and keeps its traceback.
ERRORS = (ValueError, OSError, TrainingDiverged, RunFolderError, backend.BackendUnavailableError)
BACKENDS = ("numpy", "cupy", "fakegpu")
RESUME_FIX = ("--resume continues a run as it was started: give it the same --preset, --config and --seed, or start a "
              "new run")
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def _unique_keys(pairs):
    """json object_pairs_hook: a key given twice is a mistake, not an override."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"key(s) {repeated} appear more than once in one object")
    return dict(pairs)


def _load_config(path, preset=None):
    """The settings of a run: the preset's sections (minimoe.preset; none for a command without --preset), then
    the --config overrides on top, field by field. The file is checked for shape: a JSON object whose keys are
    known sections, each section an object (its fields are checked by `_setup`), "task" one of TASKS. Errors name
    the file (and line, column). config["given"] keeps the file's own "model" fields, the ones a checkpoint's
    model must agree with."""
    config = {"model": {}, "pretrain": {}, "grpo": {}, "eval": {}, "distill": {}, "task": "addition3",
              "source": "--config", "preset": preset, "given": {}}
    for section, fields in (load_preset(preset) if preset else {}).items():
        config[section] = fields
    if not path:
        return config
    where = config["source"] = f"--config {path}"
    try:
        with open(path) as file:
            overrides = json.load(file, object_pairs_hook=_unique_keys)
    except OSError as error:
        raise ConfigError(f"{where}: cannot read it ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}") \
            from None
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: expected a JSON object of sections ({', '.join(SECTIONS)}), got "
                          f"{JSON_TYPES[type(overrides)]}")
    unknown = sorted(set(overrides) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; the sections are {list(SECTIONS)}")
    for key, value in overrides.items():
        if key == "task":
            if not isinstance(value, str) or value not in TASKS:
                raise ConfigError(f'{where}: "task" must be one of {sorted(TASKS)}, got {value!r}')
        elif not isinstance(value, dict):
            raise ConfigError(f'{where}: section "{key}" must be an object of fields, got {json.dumps(value)}')
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    config["given"] = overrides.get("model", {})
    return config


def _section(config, name, cls, **defaults):
    """The validated dataclass of one --config section (defaults first, then the file's fields)."""
    try:
        return cls.from_dict({**defaults, **config[name]})
    except ConfigError as error:
        raise ConfigError(f'{config["source"]}, section "{name}": {error}') from None


def _setup(args):
    """Check everything, then do the cheap global setup. In order: the --config file and every section of it (so
    a bad eval `k` stops the demo before pretraining, not after), then the backend, the BLAS threads and the seed.
    Returns (config, task, tokenizer); config holds the validated "model_config" (for a new model),
    "pretrain_config", "grpo_config" and "eval_settings", the merged sections, and in "given" the --config
    file's own "model" fields (to compare with a model loaded from a checkpoint)."""
    config = _load_config(args.config, getattr(args, "preset", None))
    task, tokenizer = TASKS[config["task"]](), Tokenizer()
    problems = []  # every bad section at once, not one per run
    defaults = {"model": {"vocab_size": tokenizer.vocab_size}, "pretrain": {"seed": args.seed},
                "grpo": {"seed": args.seed}}
    for name, cls in (("model", ModelConfig), ("pretrain", PretrainConfig), ("grpo", GRPOConfig)):
        try:
            config[f"{name}_config"] = _section(config, name, cls, **defaults[name])
        except ConfigError as error:
            problems.append(str(error))
    try:
        config["eval_settings"] = _eval_settings(config, task)
    except ConfigError as error:
        problems.append(str(error))
    if "model_config" in config and config["model_config"].vocab_size < tokenizer.vocab_size:
        problems.append(f'{config["source"]}, section "model": vocab_size={config["model_config"].vocab_size} '
                        f"is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        backend.set_backend(args.backend)
    except (backend.BackendUnavailableError, ValueError) as error:
        raise ConfigError(f"--backend {args.backend}: {error}") from None
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads, user_api="blas")  # after NumPy's import: limits bind loaded libraries
    backend.keep_freed_host_memory()  # a training loop reuses its temporaries: keep them instead of page-faulting
    backend.manual_seed(args.seed)
    return config, task, tokenizer


def _eval_settings(config, task):
    """The evaluation settings: EVAL_DEFAULTS (48 new tokens for 4-digit addition), then the eval section's,
    checked (unknown keys, types, ranges, k ≤ n_samples)."""
    unknown = sorted(set(config["eval"]) - set(EVAL_DEFAULTS))
    if unknown:
        raise ConfigError(f'{config["source"]}, section "eval": unknown field(s) {unknown}; known fields are '
                          f"{sorted(EVAL_DEFAULTS)}")
    settings = {**EVAL_DEFAULTS, **config["eval"]}
    if isinstance(task, AdditionTask) and task.digits > 3 and "max_new_tokens" not in config["eval"]:
        settings["max_new_tokens"] = 48
    check_evaluation(f'{config["source"]}, section "eval"', **settings)
    return settings


def _refuse_differences(where, given, saved, what, fix):
    """Refuse settings given now that disagree with those a checkpoint was saved with, naming only the fields
    that differ."""
    differing = [f"{name}={value!r} (saved: {saved.get(name)!r})" for name, value in given.items()
                 if saved.get(name) != value]
    if differing:
        raise ConfigError(f"{where} was saved with a different {what}: {', '.join(differing)}; {fix}")


def _load_model(path, config, tokenizer):
    """A model from a checkpoint, after checking that the --config model fields (if any) describe it and that
    the tokenizer fits its vocabulary."""
    model, state = load_checkpoint(path, restore_random_state=False)
    _refuse_differences(f"checkpoint {path}", config["given"], model.config.to_dict(), "model",
                        'the checkpoint defines the model: drop these fields from the --config "model" section')
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"checkpoint {path}: vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    return model, state


def _check_lengths(model_config, task, tokenizer, max_new_tokens, where):
    """Prompt plus response must fit the model's context: found here, not after pretraining. (From a sample
    of the task's prompts: a bound, not a proof; generate() still refuses a sequence that does not fit.)"""
    problems = task.sample(numpy.random.default_rng(0), 64, split="test")
    longest = max(len(tokenizer.encode("<bos>" + p.prompt)) for p in problems)
    if longest + max_new_tokens > model_config.max_seq_len:
        raise ConfigError(f"{where}: max_new_tokens={max_new_tokens} plus the task's prompts (up to {longest} "
                          f"tokens) exceed the model's max_seq_len={model_config.max_seq_len}")


def _check_corpus_length(model_config, task, tokenizer, pretrain_config, where):
    """The pretraining texts must fit the model's context (the inputs are a text less its last token)."""
    corpus = build_corpus(task, 256, numpy.random.default_rng(0), pretrain_config.mix)
    longest = int(corpus.encode(tokenizer).lengths.max()) - 1
    if longest > model_config.max_seq_len:
        raise ConfigError(f"{where}: the task's pretraining texts reach {longest} input tokens (in a sample of 256), "
                          f"more than the model's max_seq_len={model_config.max_seq_len}")


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


@contextlib.contextmanager
def _run_folder(args, out, *names, resume=False):
    """Hold the run folder `out` (checked writable before any work) for the whole command. A folder that holds
    a run already (one of the checkpoints `names`, or a demo's summary) is refused unless --resume continues it
    or --overwrite replaces it; --resume needs a checkpoint to continue."""
    if resume and args.overwrite:
        raise SystemExit("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    try:
        folder = RunFolder(out)
        folder.acquire()
    except RunFolderError as error:
        raise SystemExit(f"--out: {error}") from None
    try:
        existing = folder.holds_run(*names)
        if args.command == "demo" and os.path.exists(os.path.join(out, "summary.json")):
            existing.append(os.path.join(out, "summary.json"))
        if resume and not folder.holds_run(names[0]):
            raise SystemExit(f"--resume: {out} holds no checkpoint {names[0]}.npz to continue")
        if existing and not (resume or args.overwrite):
            raise SystemExit(f"--out {out} already holds a run ({existing[0]}); continue it with --resume, replace "
                             "it with --overwrite, or choose another --out")
        yield folder
    finally:
        folder.release()


def command_demo(args):
    started = time.perf_counter()
    config, task, tokenizer = _setup(args)
    model_config, pretrain_config = config["model_config"], config["pretrain_config"]
    grpo_config, evaluation = config["grpo_config"], config["eval_settings"]
    for max_new_tokens, section in ((evaluation["max_new_tokens"], "eval"), (grpo_config.max_new_tokens, "grpo")):
        _check_lengths(model_config, task, tokenizer, max_new_tokens, f'{config["source"]}, section "{section}"')
    _check_corpus_length(model_config, task, tokenizer, pretrain_config, f'{config["source"]}, section "model"')
    out = args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    with _run_folder(args, out, "pretrain_last", "rl_last", "rl_reference"):
        try:
            return _demo(args, started, config, task, tokenizer, out)
        except KeyboardInterrupt:  # checkpoints are written whole or not at all (minimoe.checkpoint)
            saved = [f for f in ("pretrain_last.npz", "rl_last.npz") if os.path.exists(os.path.join(out, f))]
            print(f"demo interrupted; checkpoints written so far in {out}: {', '.join(saved) or 'none'}",
                  file=sys.stderr)
            raise SystemExit(130) from None


def _demo(args, started, config, task, tokenizer, out):
    from .plots import plot_expert_load, plot_pretraining, plot_rl

    model_config, pretrain_config = config["model_config"], config["pretrain_config"]
    grpo_config, evaluation = config["grpo_config"], config["eval_settings"]
    model = Transformer(model_config)
    counts = model.parameter_counts()
    print(f"minimoe demo: preset {config['preset']}, {counts['total']:,} parameters ({counts['activated']:,} active "
          f"per token), task {config['task']}, backend {args.backend}, seed {args.seed}, run folder {out}")

    pretrain_history = pretrain(model, task, pretrain_config, tokenizer, out_dir=out, progress=not args.quiet,
                                overwrite=args.overwrite)
    print(f"pretrained {pretrain_config.steps} steps in {pretrain_history['seconds']:.0f} s, "
          f"final loss {pretrain_history['lm_loss'][-1]:.3f}; evaluating ...")
    before = evaluate(model, task, tokenizer, **evaluation)
    before_samples = _samples(model, task, tokenizer)

    rl_history = train_grpo(model, task, grpo_config, tokenizer, out_dir=out, progress=not args.quiet,
                            overwrite=args.overwrite)
    print(f"GRPO {grpo_config.steps} steps in {rl_history['seconds']:.0f} s; evaluating ...")
    after = evaluate(model, task, tokenizer, **evaluation)
    after_samples = _samples(model, task, tokenizer)

    plot_pretraining(pretrain_history, os.path.join(out, "pretraining.png"))
    plot_rl(rl_history, os.path.join(out, "grpo.png"))
    plot_expert_load({"pretraining": pretrain_history, "GRPO": rl_history}, os.path.join(out, "expert_load.png"))
    summary = {"before": before, "after": after, "seconds": time.perf_counter() - started,
               "pretrain_seconds": pretrain_history["seconds"], "rl_seconds": rl_history["seconds"],
               "task": config["task"], "preset": config["preset"], "seed": args.seed, "backend": args.backend,
               "parameters": counts, "model": model_config.to_dict(), "pretrain": pretrain_config.to_dict(),
               "grpo": grpo_config.to_dict(), "eval": evaluation, "rl_warnings": rl_history["warnings"],
               "samples": {"before": before_samples, "after": after_samples}}
    with open(os.path.join(out, "summary.json"), "w") as file:
        json.dump(summary, file, indent=1)
    print("\n" + _table(before, after))
    print("\nHeld-out problems, greedy answers before RL:")
    print("\n".join("  " + s for s in before_samples))
    print("after RL:")
    print("\n".join("  " + s for s in after_samples))
    for warning in rl_history["warnings"]:
        print(f"\nWARNING (GRPO step {warning['step']}): {warning['message']}")
    print(f"\nplots, checkpoints and summary.json in {out} ({summary['seconds']:.0f} s in all)")
    return summary


def command_train(args):
    config, task, tokenizer = _setup(args)
    out = args.out or os.path.join("runs", time.strftime("train-%Y%m%d-%H%M%S"))
    pretrain_config = config["pretrain_config"]
    checkpoint = os.path.join(out, "pretrain_last")
    comm = distributed.world()  # under `mpiexec -n W`: data + expert parallel over W processes
    # rank 0 owns the run folder (and writes the one checkpoint); an error on any rank aborts the whole job
    folder = _run_folder(args, out, "pretrain_last", resume=args.resume) if comm.rank == 0 else contextlib.nullcontext()
    with distributed.abort_on_error(comm), folder:
        resume = checkpoint if args.resume else None
        if resume:
            model, state = _load_model(resume, config, tokenizer)
            _refuse_differences(f"the run in {out}", pretrain_config.to_dict(), state.get("config", {}),
                                'pretrain section', RESUME_FIX)
        elif args.checkpoint:  # a new run that starts from these weights (and a fresh optimizer)
            model = _load_model(args.checkpoint, config, tokenizer)[0]
        else:
            model = Transformer(config["model_config"])
        _check_corpus_length(model.config, task, tokenizer, pretrain_config, f'{config["source"]}, section "model"')
        try:
            if comm.size == 1:
                history = pretrain(model, task, pretrain_config, tokenizer, out_dir=out, resume_from=resume,
                                   progress=not args.quiet, overwrite=args.overwrite)
            else:
                history = distributed.pretrain(model, task, pretrain_config, tokenizer, out_dir=out,
                                               resume_from=resume, progress=not args.quiet, comm=comm)
        except KeyboardInterrupt:  # the loop has said where its last checkpoint is
            raise SystemExit(130) from None
        if comm.rank:
            return
        from .plots import plot_pretraining

        plot_pretraining(history, os.path.join(out, "pretraining.png"))
    print(f"final loss {history['lm_loss'][-1]:.3f}; checkpoint {checkpoint}.npz")


def command_rl(args):
    config, task, tokenizer = _setup(args)
    out = args.out or os.path.join("runs", time.strftime("rl-%Y%m%d-%H%M%S"))
    model = _load_model(args.checkpoint, config, tokenizer)[0]
    grpo_config = config["grpo_config"]
    _check_lengths(model.config, task, tokenizer, grpo_config.max_new_tokens, f'{config["source"]}, section "grpo"')
    checkpoint = os.path.join(out, "rl_last")
    with _run_folder(args, out, "rl_last", "rl_reference", resume=args.resume):
        resume = checkpoint if args.resume else None
        if resume:
            _refuse_differences(f"the run in {out}", grpo_config.to_dict(),
                                load_checkpoint(resume, restore_random_state=False)[1].get("config", {}),
                                "grpo section", RESUME_FIX)
        try:
            history = train_grpo(model, task, grpo_config, tokenizer, out_dir=out, resume_from=resume,
                                 progress=not args.quiet, overwrite=args.overwrite)
        except KeyboardInterrupt:  # the loop has said where its last checkpoint is
            raise SystemExit(130) from None
        from .plots import plot_expert_load, plot_rl

        plot_rl(history, os.path.join(out, "grpo.png"))
        plot_expert_load({"GRPO": history}, os.path.join(out, "expert_load.png"))
    print(f"final batch accuracy {history['steps'][-1]['accuracy']:.3f}; checkpoint {checkpoint}.npz")


def command_eval(args):
    config, task, tokenizer = _setup(args)
    model = _load_model(args.checkpoint, config, tokenizer)[0]
    settings = config["eval_settings"]
    _check_lengths(model.config, task, tokenizer, settings["max_new_tokens"], f'{config["source"]}, section "eval"')
    result = evaluate(model, task, tokenizer, **settings)
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eval.json"), "w") as file:
            json.dump(result, file, indent=1)


def command_generate(args):
    config, task, tokenizer = _setup(args)
    if not args.prompt:
        raise ConfigError("--prompt: give the text to continue, e.g. --prompt 347+589=")
    try:
        tokenizer.encode(args.prompt)
    except ValueError as error:
        raise ConfigError(f"--prompt {args.prompt!r}: {error}") from None
    model = _load_model(args.checkpoint, config, tokenizer)[0]
    problem = Problem(prompt=args.prompt, reference="", task=config["task"], operands=(), target=None)
    responses = sample_responses(model, [problem], tokenizer, args.n, config["eval_settings"]["max_new_tokens"],
                                 temperature=args.temperature or 1.0, greedy=args.temperature == 0,
                                 speculative=args.speculative)
    for text in responses.texts:
        print(f"{args.prompt}{text}")


def command_export_hf(args):
    """Write a checkpoint as a Hugging Face DeepseekV3 model folder (see minimoe/hf.py)."""
    from .hf import export_hf

    export_hf(args.checkpoint, args.out)  # an HFFormatError is a ValueError: one line, exit status 2
    print(f"wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained({args.out!r}) and "
          f"AutoTokenizer.from_pretrained({args.out!r})")


def command_distill(args):
    """Distillation in miniature (minimoe.distill.run_distillation): the --config "model" and "pretrain" sections
    describe the student (defaults: distill.student_config, and no held-out loss evaluations), "grpo" the GRPO of
    arms (a) and (c) (default lr 2e-4 → 2e-5; its steps are set by the budget), "distill" the experiment
    (distill.DistillConfig)."""
    from .distill import (DistillConfig, plot_distillation, run_distillation, save_distillation_models,
                          student_config)

    config, task, tokenizer = _setup(args)
    distill_config = _section(config, "distill", DistillConfig, seed=args.seed)
    # The arms' own defaults: GRPO gentler than the demo's (it must not undo (c)'s SFT), no held-out loss evaluations
    config["grpo_config"] = _section(config, "grpo", GRPOConfig, seed=args.seed, lr=2e-4, min_lr=2e-5)
    config["pretrain_config"] = _section(config, "pretrain", PretrainConfig, seed=args.seed, eval_every=0)
    teacher = _load_model(args.teacher, {"given": {}}, tokenizer)[0]
    student = _load_model(args.student, config, tokenizer)[0] if args.student else None
    try:
        student_model = student.config if student else student_config(teacher.config, **config["model"])
    except ConfigError as error:
        raise ConfigError(f'{config["source"]}, section "model" (the student): {error}') from None
    out = args.out or os.path.join("runs", time.strftime("distill-%Y%m%d-%H%M%S"))
    names = ("student_base", "arm_a_grpo", "arm_b_sft", "arm_c_sft_grpo")
    with _run_folder(args, out, *names):
        if os.path.exists(os.path.join(out, "summary.json")) and not args.overwrite:
            raise SystemExit(f"--out {out} already holds a run (summary.json); replace it with --overwrite, or "
                             "choose another --out")
        result = run_distillation(teacher, task, student_model, config["pretrain_config"], config["grpo_config"],
                                  distill_config, config["eval_settings"], tokenizer, student, not args.quiet)
        save_distillation_models(result, out, names)
        plot_distillation(result, os.path.join(out, "distillation.png"))
        summary = {key: result[key] for key in ("rows", "rejection", "steps", "seconds", "cpu_seconds")}
        summary.update(arms=result["rows"], teacher=args.teacher, seed=args.seed, task=config["task"],
                       student_model=student_model.to_dict(), pretrain=config["pretrain_config"].to_dict(),
                       grpo=config["grpo_config"].to_dict(), distill=distill_config.to_dict(),
                       eval=config["eval_settings"])
        del summary["rows"]
        with open(os.path.join(out, "summary.json"), "w") as file:
            json.dump(summary, file, indent=1)
    print(f"plots, checkpoints and summary.json in {out} ({result['seconds']:.0f} s in all, "
          f"{result['cpu_seconds']:.0f} CPU s)")
    return summary


COMMANDS = {"demo": command_demo, "train": command_train, "rl": command_rl, "eval": command_eval,
            "generate": command_generate, "distill": command_distill, "export-hf": command_export_hf}


def _number(kind, minimum):
    """An argparse type: an int (or a finite float) ≥ minimum, refused with a message naming the value."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be ≥ {minimum}")
        return value
    return parse


def build_parser():
    """One sub-command each, with only the flags it uses: a flag a command would ignore is an error."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="JSON file of overrides: sections model, pretrain, grpo, eval, task")
    common.add_argument("--seed", type=_number(int, 0), default=0, help="seed of every random generator (≥ 0)")
    common.add_argument("--backend", default=os.environ.get("MINIMOE_BACKEND", "numpy"), choices=BACKENDS)
    common.add_argument("--threads", type=_number(int, 0), default=1,
                        help="BLAS threads (default 1: this model's matrices are too small to share, and a second "
                             "thread spin-waits on a busy core; 0 leaves the BLAS library's own setting)")
    common.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    parser = argparse.ArgumentParser(prog="python -m minimoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    helps = {"demo": "pretrain, evaluate, GRPO, evaluate: plots and a summary", "train": "pretrain a model",
             "rl": "improve a pretrained model with GRPO", "eval": "measure a checkpoint",
             "generate": "sample continuations of a prompt",
             "export-hf": "write a checkpoint as a Hugging Face DeepseekV3 folder (config, safetensors, tokenizer)",
             "distill": "a small student three ways: GRPO, SFT on a teacher's filtered traces, both"}
    sub = {name: commands.add_parser(name, parents=[common], help=helps[name], description=helps[name])
           for name in COMMANDS}
    for name in ("demo", "train", "rl", "distill"):
        sub[name].add_argument("--out", help="run folder (checkpoints, plots, summary)")
        sub[name].add_argument("--quiet", action="store_true", help="no progress bars")
        sub[name].add_argument("--overwrite", action="store_true",
                               help="replace the run that --out holds (refused without it)")
        sub[name].set_defaults(resume=False, checkpoint=None)  # shared code may read them on any training command
    for name in ("demo", "train", "rl"):
        sub[name].add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                               help=f"the settings --config starts from (default {DEFAULT_PRESET}: DeepSeek-V3's "
                                    "architecture in miniature; classic: multi-head attention and a softmax gate; "
                                    "see minimoe/preset.py)")
    for name in ("train", "rl"):
        sub[name].add_argument("--resume", action="store_true", help="continue the run in --out")
    sub["train"].add_argument("--checkpoint", help="start a new run from this checkpoint's weights (a fresh "
                                                   "optimizer and schedule); not with --resume")
    for name in ("rl", "eval", "generate", "export-hf"):
        sub[name].add_argument("--checkpoint", required=True,
                               help="a checkpoint path" + (" (a pretrained model)" * (name == "rl")))
    sub["eval"].add_argument("--out", help="folder for eval.json")
    sub["export-hf"].add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, "
                                                                "tokenizer files)")
    sub["distill"].add_argument("--teacher", required=True, help="the teacher's checkpoint (an RL-trained model)")
    sub["distill"].add_argument("--student", help="a pretrained student base to start the arms from (default: "
                                                  "pretrain one as the pretrain section says)")
    sub["generate"].add_argument("--prompt", required=True, help="the prompt, e.g. 347+589=")
    sub["generate"].add_argument("--n", type=_number(int, 1), default=4, help="number of samples (≥ 1)")
    sub["generate"].add_argument("--temperature", type=_number(float, 0), default=1.0, help="0 for greedy")
    sub["generate"].add_argument("--speculative", action="store_true",
                                 help="draft with the model's multi-token prediction modules (n_mtp_modules ≥ 1)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.resume and args.checkpoint:
        parser.error("train: --checkpoint starts a new run from a model, --resume continues the run in --out; "
                     "give one of them")
    try:
        return COMMANDS[args.command](args)
    except (*ERRORS, SystemExit) as error:  # SystemExit("message"): a command that stops with a message
        message = error.code if isinstance(error, SystemExit) else str(error) or type(error).__name__
        if args.debug or not isinstance(message, str):  # SystemExit(130) and the like pass through
            raise
        print(f"minimoe: error: {' '.join(message.splitlines())}", file=sys.stderr)
        raise SystemExit(2) from None

if __name__ == "__main__":
    main()
