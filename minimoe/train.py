"""Pretraining (supervised next-token learning) on a task's corpus.

Each step draws a fresh batch of problems, renders each as a direct answer, a worked solution or a worked
solution with one carry error (the corpus mix, see minimoe.tasks), and minimises the cross-entropy of the
completion tokens only — the prompt is context, not something to imitate:

    loss = mean over completion tokens of -log p(token | everything before it)   (+ MoE balance terms)

AdamW, linear warm-up then cosine decay, gradient clipping; periodic held-out evaluation; checkpoints that a
run can resume from bit for bit; a NaN/Inf loss stops the run and points at the last good checkpoint.
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from . import functional as F
from .autograd import no_grad
from .backend import get_backend, numpy
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import AdamW, WarmupCosine, clip_grad_norm_
from .tasks import DEFAULT_MIX, Tokenizer, build_corpus

__all__ = ["PretrainConfig", "TrainingDiverged", "pretrain", "lm_batch", "lm_loss", "optimizer_step"]

IGNORE = -100  # target id the loss skips (prompt positions, padding)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class PretrainConfig:
    """Pretraining settings; the defaults are the demo's (about two minutes on 2 CPU cores)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    eval_every: int = 250
    eval_batch_size: int = 256
    checkpoint_every: int = 250
    seed: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)


def lm_batch(corpus, tokenizer, backend=None):
    """(inputs, targets) backend arrays of shape (B, T-1) from a Corpus: targets are the next tokens, with
    IGNORE wherever the predicted token is not part of the completion (the prompt and the padding)."""
    ids, _, _, completion_mask = corpus.encode(tokenizer)
    targets = numpy.where(completion_mask[:, 1:], ids[:, 1:], IGNORE)
    backend = backend or get_backend()
    return backend.asarray(ids[:, :-1]), backend.asarray(targets)


def lm_loss(model, inputs, targets):
    """(total, lm): the next-token loss on the completion tokens, and the same plus the MoE balance terms and,
    for a model with multi-token prediction modules, λ·L_MTP (DeepSeek-V3 §2.2; its value is then kept in
    model.last_mtp_loss)."""
    lm = F.cross_entropy(model(inputs, mtp=model.config.n_mtp_modules > 0), targets, ignore_index=IGNORE)
    total = lm
    for extra in (model.balance_loss(), model.mtp_loss(targets, IGNORE)):
        total = total if extra is None else total + extra
    return total, lm


def optimizer_step(model, optimizer, scheduler, loss, grad_clip):
    """Backward, clip, step, schedule. Returns the gradient norm (a 0-d tensor, still on the device).
    The caller updates the routing bias (DeepSeek-V3's auxiliary-loss-free balancing) once per step."""
    optimizer.zero_grad()
    loss.backward()
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return grad_norm


def check_finite(who, loss_value, step, checkpoint):
    """Stop a run whose loss became NaN or infinite, saying where its last good checkpoint is."""
    if math.isfinite(loss_value):
        return
    where = f"the last good checkpoint is {checkpoint}" if checkpoint and os.path.exists(checkpoint + ".json") \
        else "no checkpoint was written yet"
    raise TrainingDiverged(f"{who}: the loss became {loss_value} at step {step}; stopping ({where}). "
                           "Try a lower learning rate or a smaller grad_clip.")


def make_optimizer(model, config, total_steps):
    optimizer = AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, WarmupCosine(optimizer, config.warmup_steps, total_steps, min_lr=config.min_lr)


@no_grad()
def heldout_loss(model, task, tokenizer, config, seed=12345):
    """Next-token loss on a fixed batch of held-out problems (the same batch every time it is called)."""
    was_training = model.training
    model.eval()
    corpus = build_corpus(task, config.eval_batch_size, numpy.random.default_rng(seed), config.mix, split="test")
    inputs, targets = lm_batch(corpus, tokenizer)
    loss = F.cross_entropy(model(inputs), targets, ignore_index=IGNORE).item()
    model.train(was_training)
    return loss


def pretrain(model, task, config=None, tokenizer=None, out_dir=None, resume_from=None, progress=True,
             on_step=None, on_eval=None):
    """Pretrain `model` on `task`'s mixed corpus. Returns the history:
    {"step", "loss", "lm_loss", "lr", "grad_norm", "expert_load", "router_entropy" (and "mtp_loss", the mean
     of the MTP modules' losses, when the model has them): per-step lists;
     "eval": [{"step", "heldout_loss", ...}], "seconds": wall time}.

    out_dir      -- where checkpoints go (`pretrain_last.npz/.json`); None: no checkpoints
    resume_from  -- a checkpoint of an interrupted run with the same config: continue where it stopped
    on_step      -- called as on_step(step, record) after every step (e.g. live plots in a notebook)
    on_eval      -- called as on_eval(model, step) at each evaluation; its dict is merged into the eval record
    """
    config = config or PretrainConfig()
    tokenizer = tokenizer or Tokenizer()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"pretrain: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    optimizer, scheduler = make_optimizer(model, config, config.steps)
    data_rng = numpy.random.default_rng(config.seed)
    history = {"step": [], "loss": [], "lm_loss": [], "lr": [], "grad_norm": [], "expert_load": [],
               "router_entropy": [], "eval": [], "seconds": 0.0}
    start_step = 0
    if resume_from is not None:
        _, state = load_checkpoint(resume_from, model, optimizer, scheduler)
        if state.get("config") != config.to_dict():
            raise ValueError(f"pretrain: cannot resume from {resume_from!r}: it was saved with a different "
                             f"PretrainConfig ({state.get('config')} vs {config.to_dict()})")
        start_step, history = state["step"], state["history"]
        data_rng.bit_generator.state = state["data_rng"]
    checkpoint = os.path.join(out_dir, "pretrain_last") if out_dir else None

    def save(step):
        save_checkpoint(checkpoint, model, optimizer, scheduler,
                        {"step": step, "history": history, "config": config.to_dict(),
                         "data_rng": data_rng.bit_generator.state})

    model.train()
    started = time.perf_counter() - history["seconds"]
    bar = tqdm(range(start_step, config.steps), desc="pretrain", disable=not progress, initial=start_step,
               total=config.steps)
    for step in bar:
        corpus = build_corpus(task, config.batch_size, data_rng, config.mix, split="train")
        inputs, targets = lm_batch(corpus, tokenizer)
        model.set_training_progress(step / config.steps)  # the MTP loss weight's schedule
        loss, lm = lm_loss(model, inputs, targets)
        lr = optimizer.lr
        grad_norm = optimizer_step(model, optimizer, scheduler, loss, config.grad_clip)
        model.update_routing_bias()
        loss_value = loss.item()  # the one host read per step: for the log, and the divergence check
        check_finite("pretrain", loss_value, step + 1, checkpoint)
        record = {"step": step + 1, "loss": loss_value, "lm_loss": lm.item(), "lr": lr,
                  "grad_norm": grad_norm.item(), **model.routing_summary()}
        if model.config.n_mtp_modules:
            record["mtp_loss"] = model.last_mtp_loss.item()
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if on_step:
            on_step(step + 1, record)
        if config.eval_every and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            evaluation = {"step": step + 1, "heldout_loss": heldout_loss(model, task, tokenizer, config)}
            if on_eval:
                evaluation.update(on_eval(model, step + 1))
            history["eval"].append(evaluation)
            model.train()
        history["seconds"] = time.perf_counter() - started
        if checkpoint and config.checkpoint_every and ((step + 1) % config.checkpoint_every == 0
                                                       or step + 1 == config.steps):
            save(step + 1)
    bar.close()
    history["seconds"] = time.perf_counter() - started
    return history
