"""Beyond R1-Zero: rejection sampling, supervised fine-tuning on a model's own (or another model's) answers, and
distillation into a small student — the other half of the DeepSeek-R1 paper.

R1-Zero is one stage: a base model improved by GRPO against rule rewards (minimoe.rl). DeepSeek-R1 is four:

    cold start SFT   a few thousand clean, readable reasoning traces teach the format
    reasoning RL     GRPO with rule rewards, as in R1-Zero
    rejection        sample many responses per prompt from the RL checkpoint, keep only those a rule accepts
    sampling + SFT   (right answer, well-formed, readable), fine-tune on them (≈600k reasoning samples)
    RL again         for all scenarios

and the same filtered samples, used to fine-tune *small* dense models, gave the distilled R1 models: small
students trained on a strong teacher's filtered outputs beat the same students trained with RL directly (the R1
paper, distillation section). This module builds those pieces on the addition task:

    rejection_sample   k responses per prompt from a policy; keep those `accept_response` accepts: well-formed,
                       right, and reasoning consistent with the answer (rewards.addition_consistency); return the
                       SFT corpus and the acceptance statistics
    sft                next-token training on a response corpus, the prompt masked out of the loss
                       (train.lm_batch, train.lm_loss and the loop toolkit minimoe.loop, as pretraining uses them)
    run_distillation   the experiment: from one student base at a matched wall-clock budget per arm,
                       (a) GRPO on the student, (b) SFT on the teacher's accepted traces, (c) (b) then GRPO
    LoosenedTask       the addition task graded by a deliberately loosened rule, to watch GRPO exploit it
"""

import re
import time
from dataclasses import dataclass

import numpy as np

from .evaluate import evaluate
from .generate import sample_responses
from .loop import TrainingRun, optimizer_step
from .model import ModelConfig, Transformer
from .nn.module import Module
from .rewards import Reward, addition_consistency, format_reward, parse_addition_steps, parse_answer
from .rl import GRPOConfig, train_grpo
from .tasks import AdditionTask, Corpus, Tokenizer
from .train import lm_batch, lm_loss, make_optimizer, pretrain
from .validation import Checks, Config

__all__ = ["REASONS", "accept_response", "RejectionSample", "rejection_sample", "SFTConfig", "sft",
           "corpus_subset", "DistillConfig", "DistillError", "measure", "run_distillation", "student_config",
           "LoosenedTask", "self_consistency_judge", "first_number_judge", "reward_hacking_run", "ARMS",
           "save_distillation_models", "plot_distillation", "steps_to_reach", "cold_start_vs_zero"]

REASONS = ("accepted", "malformed", "wrong", "inconsistent")
ARMS = ("student base", "(a) GRPO", "(b) SFT on teacher", "(c) SFT then GRPO")


class DistillError(ValueError):
    """The distillation experiment cannot run with these inputs."""


# ---------------------------------------------------------------------------------------------------------------
# rejection sampling
# ---------------------------------------------------------------------------------------------------------------

def accept_response(task, problem, text):
    """Why a response is kept or dropped: "malformed" (format_reward 0: not <think>…</think><answer>…</answer>
    <eos>), "wrong" (the answer is not right), "inconsistent" (right answer, but the reasoning is wrong or does not
    give it: rewards.addition_consistency), else "accepted". The first failed test names the reason."""
    if format_reward(text) != 1.0:
        return "malformed"
    if task.reward(problem, text).accuracy != 1.0:
        return "wrong"
    if addition_consistency(text, problem.operands) != 1.0:
        return "inconsistent"
    return "accepted"


@dataclass
class RejectionSample:
    """What rejection sampling returns.

    corpus    -- the accepted responses as SFT texts (tasks.Corpus, style "sampled"): "<bos>" + prompt, response
                 up to and including its <eos>
    accepted  -- (P,) int: accepted responses per prompt, of k (before removing duplicates)
    kept      -- (P,) int: texts per prompt in the corpus (after removing duplicates, if asked)
    reasons   -- {reason: count} over all P·k responses (REASONS)
    k         -- responses sampled per prompt
    seconds   -- the wall time of sampling and filtering"""

    corpus: Corpus
    accepted: np.ndarray
    kept: np.ndarray
    reasons: dict
    k: int
    seconds: float = 0.0

    @property
    def acceptance_rate(self):
        """Accepted responses / sampled responses."""
        return float(self.accepted.sum() / (len(self.accepted) * self.k))

    @property
    def prompt_coverage(self):
        """Share of prompts with at least one accepted response: the prompts the SFT corpus can teach."""
        return float((self.accepted > 0).mean())

    def summary(self):
        return {"prompts": len(self.accepted), "k": self.k, "responses": int(len(self.accepted) * self.k),
                "acceptance_rate": self.acceptance_rate, "prompt_coverage": self.prompt_coverage,
                "corpus_size": len(self.corpus), "reasons": dict(self.reasons),
                "accepted_per_prompt": np.bincount(self.accepted, minlength=self.k + 1).tolist(),
                "seconds": self.seconds}


def rejection_sample(policy, task, problems, k=8, tokenizer=None, max_new_tokens=40, temperature=1.0,
                     unique=True, generator=None):
    """Sample k responses to each problem from `policy` and keep those accept_response accepts.

    policy  -- a model (sampled with generate.sample_responses at `temperature`), or any function
               (problems, k) -> list of len(problems)·k response texts, grouped by problem (problem 0's first)
    unique  -- keep each distinct accepted text once per prompt (a right worked solution to a given addition is
               one text, so an exact copy teaches nothing new; it would only weigh easy prompts more)
    Returns a RejectionSample."""
    if not isinstance(task, AdditionTask):
        raise ValueError(f"rejection_sample: the consistency rule is defined for the addition task, got "
                         f"{type(task).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"rejection_sample: k must be an int ≥ 1, got {k!r}")
    if not problems:
        raise ValueError("rejection_sample: no problems to sample responses to")
    started = time.perf_counter()
    if isinstance(policy, Module):
        texts = sample_responses(policy, problems, tokenizer, k, max_new_tokens, temperature=temperature,
                                 generator=generator).texts
    else:
        texts = list(policy(problems, k))
    if len(texts) != len(problems) * k:
        raise ValueError(f"rejection_sample: the policy returned {len(texts)} responses for {len(problems)} "
                         f"problems × k={k}")
    reasons = dict.fromkeys(REASONS, 0)
    accepted, kept = np.zeros(len(problems), dtype=np.int64), np.zeros(len(problems), dtype=np.int64)
    chosen = Corpus([], [], [], [])
    for i, problem in enumerate(problems):
        seen = set()
        for text in texts[i * k:(i + 1) * k]:
            reason = accept_response(task, problem, text)
            reasons[reason] += 1
            if reason != "accepted":
                continue
            accepted[i] += 1
            completion = text.split("<eos>", 1)[0] + "<eos>"
            if unique and completion in seen:
                continue
            seen.add(completion)
            kept[i] += 1
            chosen.problems.append(problem)
            chosen.styles.append("sampled")
            chosen.prompts.append("<bos>" + problem.prompt)
            chosen.completions.append(completion)
    return RejectionSample(chosen, accepted, kept, reasons, k, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------
# supervised fine-tuning on a response corpus
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SFTConfig(Config):
    """Fine-tuning settings: minibatches drawn without replacement within a step, with replacement across steps.
    checkpoint_every 0: save only after the last step (with an out_dir)."""

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 0
    seed: int = 0

    def validate(self):
        check = Checks("SFTConfig", self)
        for name in ("steps", "batch_size"):
            check.integer(name, minimum=1)
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            check.integer(name, minimum=0)
        check.optimizer_schedule()
        check.done()


def corpus_subset(corpus, indices):
    """The texts of `corpus` at `indices`, as a Corpus."""
    pick = lambda items: [items[i] for i in indices]  # noqa: E731
    return Corpus(pick(corpus.problems), pick(corpus.styles), pick(corpus.prompts), pick(corpus.completions))


def sft(model, corpus, config=None, tokenizer=None, out_dir=None, progress=False, on_step=None, overwrite=False):
    """Fine-tune `model` on the responses of `corpus` (a tasks.Corpus): each step the next-token loss of a
    minibatch's *completion* tokens only — lm_batch sets every prompt and padding target to IGNORE, so the model
    is taught to answer, not to pose the question:

        loss = mean over completion tokens of -log p(token | prompt, completion so far)   (+ MoE balance terms)

    The same loss, optimizer, schedule and loop toolkit as pretraining (minimoe.train, minimoe.loop); only the
    data differ. Returns the history {"step", "loss", "lm_loss", "grad_norm": per-step lists, "seconds"}."""
    config = config or SFTConfig()
    tokenizer = tokenizer or Tokenizer()
    if len(corpus) == 0:
        raise ValueError("sft: the corpus is empty (did rejection sampling accept nothing?)")
    optimizer, scheduler = make_optimizer(model, config, config.steps)
    history = {"step": [], "loss": [], "lm_loss": [], "grad_norm": [], "seconds": 0.0}
    batch_size = min(config.batch_size, len(corpus))
    with TrainingRun("sft", model, optimizer, scheduler, config, out_dir, "sft_last", None, overwrite,
                     progress) as run:
        model.train()
        for step in run.steps():
            inputs, targets = lm_batch(corpus_subset(corpus, run.data_rng.choice(len(corpus), batch_size,
                                                                                 replace=False)), tokenizer)
            loss, lm = lm_loss(model, inputs, targets)
            grad_norm = optimizer_step(model, optimizer, scheduler, loss, config.grad_clip)
            model.update_routing_bias()
            run.check_loss(step, loss.item())
            for key, value in (("step", step), ("loss", loss.item()), ("lm_loss", lm.item()),
                               ("grad_norm", grad_norm.item())):
                history[key].append(value)
            run.show(loss=f"{history['loss'][-1]:.3f}")
            if on_step:
                on_step(step, history)
            run.end_step(step, history)
    model.eval()
    return run.finish(history)


# ---------------------------------------------------------------------------------------------------------------
# the distillation experiment
# ---------------------------------------------------------------------------------------------------------------

def student_config(teacher_config, **overrides):
    """The default student: a *dense* model of half the teacher's width (dim 32, 4 heads of 8), two layers and a
    SwiGLU MLP of width 64: about a fifth of the demo teacher's activated parameters. Dense, like the R1 paper's
    distilled students (Qwen, Llama): at a quarter of the teacher's activated parameters, a Mixture of Experts
    would have experts of a few hundred weights each, and routing would cost more than it saves."""
    base = {"vocab_size": teacher_config.vocab_size, "max_seq_len": teacher_config.max_seq_len, "dim": 32,
            "n_layers": 2, "n_heads": 4, "ffn": "dense", "inter_dim": 64}
    return ModelConfig.from_dict({**base, **overrides})


@dataclass
class DistillConfig(Config):
    """The experiment's own settings (the student's model, pretraining, GRPO and evaluation come from their usual
    configurations).

    n_prompts, k          -- teacher traces: k samples for each of n_prompts training problems, filtered
    arm_seconds           -- the matched budget of each arm, in CPU seconds (wall seconds on a quiet machine, one
                             BLAS thread); steps per arm are set from the CPU seconds per step measured in a few
                             calibration steps; 0: use grpo_steps / sft_steps as given
    grpo_steps, sft_steps -- the steps of each arm when arm_seconds is 0
    sft_share             -- arm (c)'s share of the budget spent on SFT (the rest on GRPO)
    max_activated_ratio   -- refuse a student with more activated parameters than this times the teacher's"""

    n_prompts: int = 2048
    k: int = 2
    teacher_temperature: float = 1.0
    arm_seconds: float = 20.0
    grpo_steps: int = 100
    sft_steps: int = 150
    sft_share: float = 0.5
    sft_batch_size: int = 64
    sft_lr: float = 2e-3
    max_activated_ratio: float = 0.25
    seed: int = 0

    def validate(self):
        check = Checks("DistillConfig", self)
        for name in ("n_prompts", "k", "grpo_steps", "sft_steps", "sft_batch_size"):
            check.integer(name, minimum=1)
        check.integer("seed", minimum=0)
        check.real("teacher_temperature", above=0)
        check.real("arm_seconds", minimum=0)
        check.real("sft_share", above=0, below=1)
        check.real("sft_lr", above=0)
        check.real("max_activated_ratio", above=0, maximum=1)
        check.done()


def measure(model, task, tokenizer=None, n_problems=200, n_samples=16, k=8, temperature=1.0, max_new_tokens=40,
            seed=1234):
    """evaluate()'s held-out metrics (greedy accuracy, pass@1, pass@k, mean length, ...) plus `consistency`: the
    share of greedy answers whose reasoning is right and gives the answer (rewards.addition_consistency; a direct
    answer has no reasoning and counts as not consistent)."""
    tokenizer = tokenizer or Tokenizer()
    metrics = evaluate(model, task, tokenizer, n_problems, n_samples, k, temperature, max_new_tokens, seed=seed)
    problems = task.sample(np.random.default_rng(seed), n_problems, split="test")  # evaluate()'s problems
    greedy = sample_responses(model, problems, tokenizer, 1, max_new_tokens, greedy=True)
    metrics["consistency"] = float(np.mean([addition_consistency(t, p.operands)
                                            for p, t in zip(problems, greedy.texts)]))
    return metrics


def _row(arm, metrics, seconds, activated, **extra):
    keys = ("pass_at_1", "accuracy", "pass_at_k", "mean_length", "consistency")
    return {"arm": arm, **{key: metrics[key] for key in keys}, "seconds": seconds, "activated_parameters": activated,
            **extra}


def _clone(model):
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def _seconds_per_step(train, model, steps=3):
    """CPU seconds per step of `train(model_copy, steps)`, from a short run on a throwaway copy (the first step,
    which warms caches, is included: a slight overestimate, the safe side of a budget).

    The budget is counted in this process's CPU time, not in wall time: on a machine shared with other jobs the
    wall clock measures the queue, CPU time the work. With one BLAS thread on a quiet machine the two agree."""
    started = time.process_time()
    train(_clone(model), steps)
    return (time.process_time() - started) / steps


def check_distillation(teacher, student_model_config, task, tokenizer, config, grpo_config, eval_settings):
    """Refuse inputs that cannot work, before any sampling or training (DistillError names what and why)."""
    if not isinstance(task, AdditionTask):
        raise DistillError(f"distill: the consistency filter is defined for the addition task, got {task.name}")
    if teacher.config.vocab_size < tokenizer.vocab_size:
        raise DistillError(f"distill: the teacher's vocab_size={teacher.config.vocab_size} is smaller than the "
                           f"tokenizer's {tokenizer.vocab_size} tokens: it was not trained on this task's texts")
    longest = max(len(tokenizer.encode("<bos>" + p.prompt)) for p in task.sample(np.random.default_rng(0), 64))
    for who, model_config in (("teacher", teacher.config), ("student", student_model_config)):
        for what, new_tokens in (("grpo", grpo_config.max_new_tokens), ("eval", eval_settings["max_new_tokens"])):
            if longest + new_tokens > model_config.max_seq_len:
                raise DistillError(f"distill: the {who}'s max_seq_len={model_config.max_seq_len} cannot hold a "
                                   f"prompt ({longest} tokens) plus {what} max_new_tokens={new_tokens}")
    teacher_active = teacher.parameter_counts()["activated"]
    student_active = Transformer(student_model_config).parameter_counts()["activated"]
    if student_active > teacher_active:
        raise DistillError(f"distill: the student has {student_active:,} activated parameters, more than the "
                           f"teacher's {teacher_active:,}: distillation is from a larger model into a smaller one")
    if student_active > config.max_activated_ratio * teacher_active:
        raise DistillError(f"distill: the student has {student_active:,} activated parameters, more than "
                           f"max_activated_ratio={config.max_activated_ratio} × the teacher's {teacher_active:,}")
    return teacher_active, student_active


def run_distillation(teacher, task, student_model_config, pretrain_config, grpo_config, config, eval_settings,
                     tokenizer=None, student=None, progress=False, log=print):
    """The distillation experiment in miniature. Returns the summary: {"rows": one per arm plus the teacher's and
    the student base's (see _row), "rejection": the acceptance statistics, "histories", "steps", ...}.

    1. check everything (check_distillation), then rejection-sample the teacher on n_prompts training problems
       (an empty corpus stops here, before the student is trained);
    2. pretrain the student on the same imperfect corpus as the teacher's base (skipped if `student` is given);
    3. from copies of that one student base, at a matched wall-clock budget per arm:
       (a) GRPO, (b) SFT on the teacher's accepted traces, (c) SFT then GRPO (sft_share of the budget on SFT);
    4. measure every arm, the student base and the teacher on the same held-out problems."""
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = tokenizer or Tokenizer()
    teacher.eval()
    teacher_active, student_active = check_distillation(teacher, student_model_config, task, tokenizer, config,
                                                        grpo_config, eval_settings)
    traces = _teacher_traces(teacher, task, tokenizer, config, grpo_config, log)
    student, pretrain_seconds, pretrain_cpu = _student_base(student, student_model_config, task, pretrain_config,
                                                            tokenizer, progress, log)
    run_sft, run_grpo = _arm_trainers(task, traces, tokenizer, config, grpo_config, progress)
    steps = _arm_steps(config, student, run_sft, run_grpo)
    log(f"steps per arm: {steps}")

    measure_kwargs = {**eval_settings, "seed": 1234}
    rows = [_row("teacher", measure(teacher, task, tokenizer, **measure_kwargs), None, teacher_active),
            _row(ARMS[0], measure(student, task, tokenizer, **measure_kwargs), pretrain_seconds, student_active,
                 cpu_seconds=pretrain_cpu)]
    arm_rows, histories, models = _run_arms(student, task, tokenizer, run_sft, run_grpo, steps, student_active,
                                            measure_kwargs)
    rows += arm_rows
    _log_rows(rows, log)
    return {"rows": rows, "rejection": traces.summary(), "steps": steps, "histories": histories,
            "models": {"student": student, "a": models[ARMS[1]], "b": models[ARMS[2]], "c": models[ARMS[3]]},
            "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started}


def _teacher_traces(teacher, task, tokenizer, config, grpo_config, log):
    """Step 1: the teacher's accepted traces on n_prompts training problems (DistillError if it has none)."""
    rng = np.random.default_rng(config.seed)
    problems = task.sample(rng, config.n_prompts, split="train")
    traces = rejection_sample(teacher, task, problems, config.k, tokenizer, grpo_config.max_new_tokens,
                              config.teacher_temperature)
    log(f"teacher traces: {traces.accepted.sum()} of {len(problems) * config.k} accepted "
        f"({traces.acceptance_rate:.1%}), {len(traces.corpus)} distinct texts, {traces.seconds:.1f} s")
    if len(traces.corpus) == 0:
        raise DistillError(f"distill: rejection sampling accepted none of the teacher's {len(problems) * config.k} "
                           f"responses (reasons: {traces.reasons}); the teacher cannot teach this task")
    return traces


def _student_base(student, student_model_config, task, pretrain_config, tokenizer, progress, log):
    """Step 2: (the student base in eval mode, its pretraining wall seconds, its CPU seconds); a given `student`
    is taken as it is (0 s)."""
    pretrain_seconds = pretrain_cpu = 0.0
    if student is None:
        pretrain_cpu = time.process_time()
        student = Transformer(student_model_config)
        pretrain_seconds = pretrain(student, task, pretrain_config, tokenizer, progress=progress)["seconds"]
        pretrain_cpu = time.process_time() - pretrain_cpu
        log(f"student pretrained: {pretrain_config.steps} steps in {pretrain_seconds:.0f} s "
            f"({pretrain_cpu:.0f} CPU s)")
    student.eval()
    return student, pretrain_seconds, pretrain_cpu


def _arm_trainers(task, traces, tokenizer, config, grpo_config, progress):
    """(run_sft, run_grpo): each trains a model in place for a number of steps and returns its history."""

    def sft_config(steps):
        return SFTConfig(steps=steps, batch_size=config.sft_batch_size, lr=config.sft_lr, min_lr=config.sft_lr / 10,
                         warmup_steps=min(10, steps), seed=config.seed)

    def grpo_config_of(steps):  # the arms run GRPO on whatever base the student is: a weak one is the point of (a)
        return GRPOConfig.from_dict({**grpo_config.to_dict(), "steps": steps, "allow_weak_base": True,
                                     "warmup_steps": min(grpo_config.warmup_steps, steps), "checkpoint_every": 0})

    def run_sft(model, steps):
        return sft(model, traces.corpus, sft_config(steps), tokenizer, progress=progress)

    def run_grpo(model, steps):
        return train_grpo(model, task, grpo_config_of(steps), tokenizer, progress=progress)

    return run_sft, run_grpo


def _arm_steps(config, student, run_sft, run_grpo):
    """The steps of each training phase: {"grpo", "sft", "c_sft", "c_grpo"}, from the matched wall-clock budget
    arm_seconds (timed on the student) or, with arm_seconds = 0, from the configured step counts."""
    if config.arm_seconds > 0:
        per_grpo_step = _seconds_per_step(run_grpo, student)
        per_sft_step = _seconds_per_step(run_sft, student)
        return {"grpo": max(1, round(config.arm_seconds / per_grpo_step)),
                "sft": max(1, round(config.arm_seconds / per_sft_step)),
                "c_sft": max(1, round(config.sft_share * config.arm_seconds / per_sft_step)),
                "c_grpo": max(1, round((1 - config.sft_share) * config.arm_seconds / per_grpo_step))}
    c_sft = max(1, round(config.sft_share * config.sft_steps))
    return {"grpo": config.grpo_steps, "sft": config.sft_steps, "c_sft": c_sft,
            "c_grpo": max(1, round((1 - config.sft_share) * config.grpo_steps))}


def _run_arms(student, task, tokenizer, run_sft, run_grpo, steps, student_active, measure_kwargs):
    """Step 3 and 4: train each arm on its own copy of the student base and measure it.
    Returns (rows, histories, {arm: trained model})."""
    rows, histories, models = [], {}, {}
    for arm, plan in ((ARMS[1], (("a_grpo", run_grpo, "grpo"),)), (ARMS[2], (("b_sft", run_sft, "sft"),)),
                      (ARMS[3], (("c_sft", run_sft, "c_sft"), ("c_grpo", run_grpo, "c_grpo")))):
        model, arm_started = _clone(student), time.process_time()
        for key, train, budget in plan:
            histories[key] = train(model, steps[budget])
        cpu_seconds = time.process_time() - arm_started
        models[arm] = model
        rows.append(_row(arm, measure(model, task, tokenizer, **measure_kwargs),
                         sum(histories[key]["seconds"] for key, *_ in plan), student_active, cpu_seconds=cpu_seconds,
                         steps={budget.removeprefix("c_"): steps[budget] for _, _, budget in plan}))
    return rows, histories, models


def _log_rows(rows, log):
    for row in rows:
        log(f"{row['arm']:22} CPU s {row.get('cpu_seconds') or 0:6.1f}  accuracy {row['accuracy']:.3f}  "
            f"pass@1 {row['pass_at_1']:.3f}  pass@k {row['pass_at_k']:.3f}  consistency {row['consistency']:.3f}  "
            f"length {row['mean_length']:.1f}")


# ---------------------------------------------------------------------------------------------------------------
# reward hacking, live
# ---------------------------------------------------------------------------------------------------------------

def _answer_from_steps(text):
    """The number the written column steps give (right or not), or None if there are no steps."""
    steps = parse_addition_steps(text)
    if not steps:
        return None
    return str(steps[-1][3]) + "".join(str(total % 10) for *_, total in reversed(steps[:-1]))


def self_consistency_judge(problem, text):
    """A loosened accuracy rule: 1.0 if the answer is the number the written steps give — whether or not the steps'
    arithmetic is right. A judge that checks the reasoning *supports* the answer but never checks it against the
    truth, as a reward model that rates how convincing a solution looks might."""
    answer = parse_answer(text)
    return float(answer is not None and answer.strip(" ") == _answer_from_steps(text))


def first_number_judge(problem, text):
    """A loosened accuracy rule: 1.0 if the first run of digits anywhere in the response is the reference, as a
    careless regex grader `re.search(r"[0-9]+", response)` would read it."""
    match = re.search(r"[0-9]+", text.split("<eos>", 1)[0])
    return float(match is not None and match.group() == problem.reference)


class LoosenedTask(AdditionTask):
    """The addition task graded by a loosened accuracy rule `judge(problem, text) -> 0.0 | 1.0` (the format
    reward stays the strict one). Every response it grades is also scored by the strict rule, out of the policy's
    sight: `true_accuracy` holds those scores in grading order, for a monitor to compare."""

    def __init__(self, judge, digits=3):
        super().__init__(digits)
        self.judge = judge
        self.true_accuracy = []

    def reward(self, problem, response, accuracy_weight=1.0, format_weight=0.1):
        strict = super().reward(problem, response, accuracy_weight, format_weight)
        self.true_accuracy.append(strict.accuracy)
        loose = float(self.judge(problem, response))
        return Reward(accuracy_weight * loose + format_weight * strict.format, loose, strict.format)


def reward_hacking_run(model, judge, grpo_config=None, tokenizer=None, n_samples=6, progress=False):
    """GRPO on `model` (trained in place) against a loosened rule. Returns {"steps", "loose_reward" (the mean
    loose accuracy the policy was paid per step), "true_accuracy" (the strict rule's, on the same responses),
    "thinking_share", "samples" (held-out greedy answers at the end, with both verdicts), "seconds"}."""
    task = LoosenedTask(judge)
    config = grpo_config or GRPOConfig(steps=40, log_kl=False)
    curves = {"steps": [], "loose_reward": [], "true_accuracy": [], "thinking_share": []}

    def on_step(step, record):
        per_step = config.prompts_per_step * config.group_size
        curves["steps"].append(step)
        curves["loose_reward"].append(record["accuracy"])
        curves["true_accuracy"].append(float(np.mean(task.true_accuracy[-per_step:])))
        curves["thinking_share"].append(record["thinking_share"])

    history = train_grpo(model, task, config, tokenizer, progress=progress, on_step=on_step)
    problems = AdditionTask(task.digits).sample(np.random.default_rng(99), n_samples, split="test")
    texts = sample_responses(model, problems, tokenizer, greedy=True).texts
    strict = AdditionTask(task.digits)
    curves["samples"] = [{"prompt": p.prompt, "response": t, "reference": p.reference,
                          "loose": float(judge(p, t)), "true": strict.reward(p, t).accuracy}
                         for p, t in zip(problems, texts)]
    curves["seconds"] = history["seconds"]
    return curves


# ---------------------------------------------------------------------------------------------------------------
# saving and plotting
# ---------------------------------------------------------------------------------------------------------------

def save_distillation_models(result, out_dir, names=("student_base", "arm_a_grpo", "arm_b_sft", "arm_c_sft_grpo")):
    """Save the student base and the three arms' models (weights only) as `<out_dir>/<name>.npz`."""
    import os

    from .checkpoint import save_checkpoint

    for name, key in zip(names, ("student", "a", "b", "c")):
        save_checkpoint(os.path.join(out_dir, name), result["models"][key])


def plot_distillation(result, path=None):
    """Left: held-out metrics per arm (and the teacher's). Right: the arms' training curves against wall time."""
    import matplotlib

    if path:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = result["rows"]
    metrics = ("accuracy", "pass_at_1", "pass_at_k", "consistency")
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        bars.bar(np.arange(len(metrics)) + i * width, [row[m] for m in metrics], width, label=row["arm"])
    bars.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, ["greedy accuracy", "pass@1", "pass@k",
                                                                "consistency"])
    bars.set_ylim(0, 1)
    bars.set_title("held-out metrics")
    bars.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    histories = result["histories"]
    for key, label in (("a_grpo", "(a) GRPO"), ("c_grpo", "(c) GRPO after SFT")):
        steps = histories[key]["steps"]
        seconds = np.linspace(0, histories[key]["seconds"], len(steps) + 1)[1:]
        offset = histories["c_sft"]["seconds"] if key == "c_grpo" else 0.0
        curves.plot(seconds + offset, [s["accuracy"] for s in steps], label=f"{label}: batch accuracy")
    for key, label in (("b_sft", "(b) SFT"), ("c_sft", "(c) SFT")):
        loss = histories[key]["loss"]
        curves.plot(np.linspace(0, histories[key]["seconds"], len(loss) + 1)[1:], np.exp(-np.array(loss)),
                    "--", label=f"{label}: exp(-loss), per-token probability")
    curves.set_xlabel("wall seconds of training (the matched budget is in CPU seconds; a busy machine stretches "
                      "these)")
    curves.set_ylim(0, 1)
    curves.set_title("training")
    curves.legend(fontsize=8)
    figure.tight_layout()
    if path:
        figure.savefig(path, dpi=100)
        plt.close(figure)
    return figure


# ---------------------------------------------------------------------------------------------------------------
# cold start (R1) against zero (R1-Zero)
# ---------------------------------------------------------------------------------------------------------------

def steps_to_reach(history, threshold=0.9, window=10):
    """The first GRPO step at which the batch accuracy, averaged over the last `window` steps, reaches
    `threshold` (None if it never does)."""
    accuracy = np.array([record["accuracy"] for record in history["steps"]])
    if len(accuracy) < window:
        return None
    sums = np.convolve(accuracy, np.ones(window), mode="valid")  # sums[i]: steps i+1 .. i+window
    reached = np.nonzero(sums >= threshold * window - 1e-9)[0]  # a sum of tenths is inexact in binary
    return int(reached[0] + window) if len(reached) else None


def cold_start_vs_zero(base, task, n_clean=300, sft_config=None, grpo_config=None, tokenizer=None, eval_settings=None,
                       seed=0, progress=False, arms=("cold_start", "zero")):
    """R1's first stage against R1-Zero, from copies of one base model:
    cold start -- SFT on n_clean clean worked solutions (tasks.build_corpus with only the "worked" style), then GRPO
    zero       -- GRPO alone
    Returns {"cold_start": ..., "zero": ...}, each with measure()'s metrics, "steps_to_90" (steps_to_reach) and the
    GRPO history."""
    from .tasks import build_corpus

    tokenizer = tokenizer or Tokenizer()
    grpo_config = grpo_config or GRPOConfig(seed=seed)
    sft_config = sft_config or SFTConfig(steps=60, batch_size=64, lr=1e-3, seed=seed)
    clean = build_corpus(task, n_clean, np.random.default_rng(seed), mix={"worked": 1.0})
    results = {}
    for arm in arms:
        model, sft_history, after_sft, sft_seconds = _clone(base), None, None, 0.0
        if arm == "cold_start":
            started = time.process_time()
            sft_history = sft(model, clean, sft_config, tokenizer, progress=progress)
            sft_seconds = time.process_time() - started
            after_sft = measure(model, task, tokenizer, **(eval_settings or {}))
        started = time.process_time()
        history = train_grpo(model, task, grpo_config, tokenizer, progress=progress)
        results[arm] = {**measure(model, task, tokenizer, **(eval_settings or {})),
                        "steps_to_90": steps_to_reach(history),
                        "cpu_seconds": sft_seconds + time.process_time() - started, "sft_cpu_seconds": sft_seconds,
                        "after_sft": after_sft, "sft_history": sft_history, "history": history}
    return results
