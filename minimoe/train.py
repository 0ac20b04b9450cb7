"""Pretraining (supervised next-token learning) on a task's corpus.

Each step draws a fresh batch of problems, renders each as a direct answer, a worked solution or a worked
solution with one carry error (the corpus mix, see minimoe.tasks), and minimises the cross-entropy of the
completion tokens only — the prompt is context, not something to imitate:

    loss = mean over completion tokens of -log p(token | everything before it)   (+ MoE balance terms)

AdamW, linear warm-up then cosine decay, gradient clipping; periodic held-out evaluation; checkpoints that a
run can resume from bit for bit; a NaN/Inf loss stops the run and points at the last good checkpoint.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from .autograd import no_grad
from .backend import get_backend
from .loop import TrainingDiverged, TrainingRun, optimizer_step
from .optim import AdamW, WarmupCosine
from .tasks import DEFAULT_MIX, STYLES, Tokenizer, build_corpus
from .validation import Checks, Config, is_real

__all__ = ["PretrainConfig", "TrainingDiverged", "pretrain", "pretrain_step", "lm_batch", "lm_loss", "optimizer_step"]

IGNORE = -100  # target id the loss skips (prompt positions, padding)


@dataclass
class PretrainConfig(Config):
    """Pretraining settings; the defaults are the demo's (about two minutes on 2 CPU cores).

    checkpoint_every -- save every this many steps; 0 saves only after the last step (with an out_dir)"""

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

    def validate(self):
        """Raise a ConfigError naming every field that cannot work."""
        check = Checks("PretrainConfig", self)
        for name in ("steps", "batch_size", "eval_batch_size"):
            check.integer(name, minimum=1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):  # eval_every 0: no evaluation
            check.integer(name, minimum=0)
        check.optimizer_schedule()
        mix = self.mix
        if not isinstance(mix, Mapping) or not mix or set(mix) - set(STYLES) or not all(
                is_real(f) and f >= 0 for f in mix.values()) or abs(sum(mix.values()) - 1) > 1e-9:
            check.fail("mix", f"mix={mix!r} must map styles among {STYLES} to fractions ≥ 0 that sum to 1")
        check.done()


def lm_batch(corpus, tokenizer, backend=None):
    """(inputs, targets) backend arrays of shape (B, T-1) from a Corpus: targets are the next tokens, with
    IGNORE wherever the predicted token is not part of the completion (the prompt and the padding)."""
    ids, _, _, completion_mask = corpus.encode(tokenizer)
    targets = np.where(completion_mask[:, 1:], ids[:, 1:], IGNORE)
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


def make_optimizer(model, config, total_steps):
    optimizer = AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, WarmupCosine(optimizer, config.warmup_steps, total_steps, min_lr=config.min_lr)


@no_grad()
def heldout_loss(model, task, tokenizer, config, seed=12345):
    """Next-token loss on a fixed batch of held-out problems (the same batch every time it is called)."""
    was_training = model.training
    model.eval()
    corpus = build_corpus(task, config.eval_batch_size, np.random.default_rng(seed), config.mix, split="test")
    inputs, targets = lm_batch(corpus, tokenizer)
    loss = F.cross_entropy(model(inputs), targets, ignore_index=IGNORE).item()
    model.train(was_training)
    return loss


def pretrain(model, task, config=None, tokenizer=None, out_dir=None, resume_from=None, progress=True,
             on_step=None, on_eval=None, overwrite=False):
    """Pretrain `model` on `task`'s mixed corpus. Returns the history:
    {"step", "loss", "lm_loss", "lr", "grad_norm", "expert_load", "router_entropy" (and "mtp_loss", the mean
     of the MTP modules' losses, when the model has them): per-step lists;
     "eval": [{"step", "heldout_loss", ...}], "seconds": wall time}.

    out_dir      -- the run folder, where the checkpoint `pretrain_last.npz` goes; None: no checkpoints. A folder
                    that holds one already is refused unless resuming it or `overwrite` (minimoe.loop.RunFolder)
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
    history = {"step": [], "loss": [], "lm_loss": [], "lr": [], "grad_norm": [], "expert_load": [],
               "router_entropy": [], "eval": [], "seconds": 0.0}
    with TrainingRun("pretrain", model, optimizer, scheduler, config, out_dir, "pretrain_last", resume_from,
                     overwrite, progress) as run:
        history = run.resume(history)
        model.train()
        for step in run.steps():
            model.set_training_progress((step - 1) / config.steps)  # the MTP loss weight's schedule
            record = pretrain_step(model, optimizer, scheduler, task, tokenizer, config, run.data_rng)
            run.check_loss(step, record["loss"])
            record = {"step": step, **record}
            for key, value in record.items():
                history.setdefault(key, []).append(value)
            run.show(loss=f"{record['loss']:.3f}")
            if on_step:
                on_step(step, record)
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                evaluation = {"step": step, "heldout_loss": heldout_loss(model, task, tokenizer, config)}
                if on_eval:
                    evaluation.update(on_eval(model, step))
                history["eval"].append(evaluation)
                model.train()
            run.end_step(step, history)
    return run.finish(history)


def pretrain_step(model, optimizer, scheduler, task, tokenizer, config, data_rng):
    """One update on a fresh batch. Returns its record: loss, lm_loss, lr, grad_norm and the routing summary."""
    corpus = build_corpus(task, config.batch_size, data_rng, config.mix, split="train")
    inputs, targets = lm_batch(corpus, tokenizer)
    loss, lm = lm_loss(model, inputs, targets)
    lr = optimizer.lr
    grad_norm = optimizer_step(model, optimizer, scheduler, loss, config.grad_clip)
    model.update_routing_bias()
    loss_value = loss.item()  # the one host read per step: for the log, and the divergence check
    record = {"loss": loss_value, "lm_loss": lm.item(), "lr": lr, "grad_norm": grad_norm.item(),
              **model.routing_summary()}
    if model.config.n_mtp_modules:
        record["mtp_loss"] = model.last_mtp_loss.item()  # the MTP modules' mean loss, before the weight λ
    return record
