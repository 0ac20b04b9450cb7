"""Speculative decoding with the multi-token prediction draft (minimoe/speculative.py), on the demo model
pretrained with one MTP module (lessons/data/mtp_addition3: `python -m minimoe train` with the demo's settings and
{"model": {"n_mtp_modules": 1}}). Held-out addition prompts, greedy decoding up to EOS (at most 40 new tokens),
two kinds of answer:

    direct   the prompt "347+589=": the model mostly answers at once, "<answer>936</answer>"
    worked   the prompt "347+589=<think>": the model writes its column sums first, "7+9=16 4+8+1=13 …"

Rows: the share of drafted tokens the main model kept (acceptance), and tokens/s with and without speculation at
batch 1 (prompts one at a time) and at batch 64, with their ratio speculative / plain. Speculative and plain
greedy decoding produce the same tokens (checked here), so the ratio is a ratio of times.

Where to expect it: one step costs a main pass over 1 + D positions plus D passes of an MTP module (a whole
Transformer block), and yields 1 + (kept drafts) tokens. With the demo's 2-layer model a module costs about half a
main pass, so even with every draft kept the ratio stays below 2 / 1.5 ≈ 1.33 (DeepSeek-V3: one block against 61
layers). The `minimoe` column holds the figures; PyTorch has no counterpart here.
"""

from pathlib import Path

import numpy

import minimoe
from minimoe.checkpoint import load_checkpoint
from minimoe.generate import generate
from minimoe.rewards import BOS
from minimoe.tasks import AdditionTask, Tokenizer

from .common import Entry, time_in_turns

__all__ = ["run", "CHECKPOINT"]

CHECKPOINT = Path(__file__).resolve().parents[1] / "lessons" / "data" / "mtp_addition3"
MAX_NEW_TOKENS = 40
BATCH_SIZES = (1, 64)
SINGLE_PROMPTS = 16  # batch 1: this many prompts, one after the other


def prompts(kind, count, backend, seed=0):
    """`count` held-out addition prompts (B, P) on `backend`; "worked" ones end with <think>."""
    problems = AdditionTask().sample(numpy.random.default_rng(seed), count, "test")
    suffix = "<think>" if kind == "worked" else ""
    ids, _ = Tokenizer().encode_batch([BOS + problem.prompt + suffix for problem in problems])
    return backend.asarray(ids)


def run(device, repeats, checkpoint=CHECKPOINT):
    """The rows for the model in `checkpoint` (any model with MTP modules; default: the committed demo model)."""
    tokenizer = Tokenizer()
    previous = minimoe.set_default_dtype("float32")
    try:
        with minimoe.use_backend(device.backend) as backend:
            model = load_checkpoint(str(checkpoint), restore_random_state=False)[0]
            entries = []
            for kind in ("direct", "worked"):
                entries += _measure(model, kind, backend, tokenizer, device, repeats)
    finally:
        minimoe.set_default_dtype(previous)
    return entries


def _measure(model, kind, backend, tokenizer, device, repeats):
    def decode(ids, speculative):
        return generate(model, ids, MAX_NEW_TOKENS, tokenizer.eos_id, tokenizer.pad_id, greedy=True,
                        speculative=speculative)

    entries = []
    for batch_size in BATCH_SIZES:
        ids = prompts(kind, max(batch_size, SINGLE_PROMPTS), backend)
        batches = [ids[i:i + 1] for i in range(SINGLE_PROMPTS)] if batch_size == 1 else [ids]
        plain = [decode(batch, False) for batch in batches]
        fast = [decode(batch, True) for batch in batches]
        for slow_run, fast_run in zip(plain, fast):
            if not numpy.array_equal(backend.to_numpy(slow_run.tokens), backend.to_numpy(fast_run.tokens)):
                raise AssertionError("speculative greedy decoding differs from plain greedy decoding")
        tokens = sum(int(backend.to_numpy(run.lengths).sum()) for run in plain)
        drafted = sum(int(backend.to_numpy(run.drafted).sum()) for run in fast)
        accepted = sum(int(backend.to_numpy(run.accepted).sum()) for run in fast)
        times = time_in_turns({"plain": lambda: [decode(batch, False) for batch in batches],
                               "speculative": lambda: [decode(batch, True) for batch in batches]}, repeats, device)
        plain_rate, fast_rate = tokens / times["plain"]["wall"], tokens / times["speculative"]["wall"]
        label = f"speculative, {kind} answers, batch {batch_size}"
        if batch_size == 1:
            entries.append(Entry(f"{label}: drafts kept ({drafted} drafted, D = {model.config.n_mtp_modules})",
                                 "share", accepted / drafted))
        entries += [Entry(f"{label}: plain greedy", "tokens/s (higher is better)", plain_rate),
                    Entry(f"{label}: speculative greedy", "tokens/s (higher is better)", fast_rate),
                    Entry(f"{label}: speculative / plain", "ratio (higher is better)", fast_rate / plain_rate),
                    Entry(f"{label}: main-model passes per token", "passes",
                          sum(run.steps for run in fast) / (tokens / batch_size))]
    return entries
