"""A training step of the demo models (classic: MHA and a softmax gate; V3: MLA and a sigmoid gate, the default)
and of a 4× wider classic one, minimoe against its PyTorch twin.

One step is what `minimoe.train.pretrain` does per batch: forward, cross-entropy on the completion tokens, backward,
gradient clipping, AdamW, the learning-rate schedule, DeepSeek-V3's routing-bias update, and one host read of the
loss. The twin does the same with torch.optim.AdamW and torch.nn.utils.clip_grad_norm_. Batches of 128 addition
texts (~40 tokens each), the demo's data, cycled through in the same order by both.
"""

import itertools

from minimoe.optim import AdamW, WarmupCosine
from minimoe.train import lm_loss, optimizer_step

from .common import Entry, time_in_turns
from .workload import DEMO, V3, WIDE, addition_batches, build_pair, describe

__all__ = ["run", "minimoe_step", "torch_step"]

BATCH_SIZE, LR, WEIGHT_DECAY, GRAD_CLIP = 128, 3e-3, 0.01, 1.0


def minimoe_step(model, next_batch):
    """A zero-argument callable: one training step of `model` on the batch `next_batch()` returns (a pair
    ((inputs, targets), (torch inputs, torch targets)), see workload.addition_batches); returns the loss (a float)."""
    optimizer = AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = WarmupCosine(optimizer, warmup_steps=0, total_steps=10 ** 6)

    def step():
        (inputs, targets), _ = next_batch()
        loss, _ = lm_loss(model, inputs, targets)
        optimizer_step(model, optimizer, scheduler, loss, GRAD_CLIP)
        model.update_routing_bias()
        return loss.item()
    return step


def torch_step(twin, next_batch):
    import torch

    from .torch_model import train_step

    optimizer = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step():
        _, (inputs, targets) = next_batch()
        return train_step(twin, optimizer, inputs, targets, GRAD_CLIP)
    return step


def run(device, repeats):
    entries = []
    for label, config in (("classic demo model", DEMO), ("V3 demo model", V3), ("4x wider classic model", WIDE)):
        model, twin = build_pair(config, device)
        batches = addition_batches(4, BATCH_SIZE, device)
        tokens = batches[0][0][0].shape[1]
        calls = {"minimoe": minimoe_step(model, itertools.cycle(batches).__next__),
                 "torch": torch_step(twin, itertools.cycle(batches).__next__)}
        times = time_in_turns(calls, repeats, device, warmup=2)
        name = f"training step, {label} ({describe(config, model)}; batch {BATCH_SIZE}x{tokens})"
        entries.append(Entry(name, "ms", 1e3 * times["minimoe"]["wall"], 1e3 * times["torch"]["wall"]))
        if not device.is_gpu:
            entries.append(Entry(name, "ms CPU time", 1e3 * times["minimoe"]["cpu"], 1e3 * times["torch"]["cpu"]))
    return entries
