"""Speculative decoding with the multi-token prediction draft (minimoe/speculative.py), on the classic demo
model pretrained with one MTP module (lessons/data/mtp_addition3: `python -m minimoe train --preset classic` with
{"model": {"n_mtp_modules": 1}}). Held-out addition prompts, greedy decoding up to EOS (at most 40 new tokens),
two kinds of answer:

    direct   the prompt "347+589=": the model mostly answers at once, "<answer>936</answer>"
    worked   the prompt "347+589=<think>": the model writes its column sums first, "7+9=16 4+8+1=13 …"

Rows: the share of drafted tokens the main model kept (acceptance), and tokens/s with and without speculation at
batch 1 (prompts one at a time) and at batch 64, with their ratio speculative / plain. Speculative and plain
greedy decoding produce the same tokens (checked here), so the ratio is a ratio of times.

Where to expect it. One greedy step with D = 1 is a main pass over two positions (the last token and the draft)
and a draft (module 1 and the shared head), and yields 1 + (draft kept) tokens. In units of a plain step (a main
pass over one position), with a the share of drafts kept, after each call's first token:

    speculative / plain  =  (1 + a) / (v + c + b)  ≤  (1 + a) / (v + c)  ≤  2 / (v + c)

    v     a main pass over two positions / over one (about 1.1 at batch 1: per-operation overhead dominates)
    c     the draft / a plain step: c1 after a refused draft, c2 after a kept one, when module 1 also feeds the
          position it drafted from (its input then was the unconfirmed draft); c = (1 − a)·c1 + a·c2
    b     the bookkeeping (accept, roll back, one host read per step, net of plain decoding's own), and module 1's
          first pass, over the whole prompt, spread over the steps

The end-to-end ratio also carries what both decoders pay once per call (the prefill, a main pass that drafts
nothing; switching to eval mode), which pulls it towards 1 for short answers; the rows split it off by timing each
call's first token alone.

The rows give each term, the ceilings and the measured ratio. In the demo's model (two layers) the draft is an MoE
block and the head against two blocks and the head, c ≈ 0.6: even with every draft kept the ratio cannot pass
about 2 / 1.7 ≈ 1.2, and at a ≈ 0.72 about 1.0 — the 1.4× target is out of reach for this model whatever the
bookkeeping costs. The same pass costs for untrained models of the demo's width with 6 and 12 layers (timing does
not depend on the weights) show the draft getting cheap (c ≈ 0.2 and 0.1: ceilings ≈ 1.6 and 1.7; DeepSeek-V3: one
block against 61 layers). At batch 64 the CPU does real work for every position (v ≈ 1.2 in the batch-64 pass-cost
rows); besides, module 1 first runs over the whole prompt (its own prefill, which plain decoding does not have),
and the batch decodes from its slowest sequence (see minimoe/speculative.py), so as the sequences drift apart a
verification covers three to five positions: speculation loses there. Times are the fastest of the rounds, timed
in turns, in CPU seconds on the CPU and wall-clock seconds on a GPU (see _clock). The `minimoe` column holds the
figures; PyTorch has no counterpart here.
"""

from dataclasses import replace
from pathlib import Path

import numpy

import minimoe
from minimoe.autograd import no_grad
from minimoe.checkpoint import load_checkpoint
from minimoe.generate import generate
from minimoe.model import Transformer
from minimoe.rewards import BOS
from minimoe.tasks import AdditionTask, Tokenizer

from .common import Entry, time_in_turns

__all__ = ["run", "pass_costs", "CHECKPOINT"]

CHECKPOINT = Path(__file__).resolve().parents[1] / "lessons" / "data" / "mtp_addition3"
MAX_NEW_TOKENS = 40
BATCH_SIZES = (1, 64)
SINGLE_PROMPTS = 16  # batch 1: this many prompts, one after the other
DEEPER = (6, 12)  # layers of the untrained models whose pass costs are timed too
POSITION = 16  # where the passes are timed: about the middle of a worked answer


def prompts(kind, count, backend, seed=0):
    """`count` held-out addition prompts (B, P) on `backend`; "worked" ones end with <think>."""
    problems = AdditionTask().sample(numpy.random.default_rng(seed), count, "test")
    suffix = "<think>" if kind == "worked" else ""
    ids, _ = Tokenizer().encode_batch([BOS + problem.prompt + suffix for problem in problems])
    return backend.asarray(ids)


def run(device, repeats, checkpoint=CHECKPOINT, deeper=DEEPER):
    """The rows for the model in `checkpoint` (any model with MTP modules; default: the committed demo model), then
    the pass costs of untrained models like it with `deeper` layers."""
    tokenizer = Tokenizer()
    previous = minimoe.set_default_dtype("float32")
    try:
        with minimoe.use_backend(device.backend) as backend:
            model = load_checkpoint(str(checkpoint), restore_random_state=False)[0]
            costs = pass_costs(model, backend, device, repeats)
            entries = _cost_entries(f"{model.config.n_layers} layers (this model), batch 1", costs)
            entries += _cost_entries(f"{model.config.n_layers} layers (this model), batch 64",
                                     pass_costs(model, backend, device, max(1, repeats // 5), batch_size=64))
            for kind in ("direct", "worked"):
                entries += _measure(model, kind, backend, tokenizer, device, repeats, costs)
            for layers in deeper:
                untrained = Transformer(replace(model.config, n_layers=layers))
                costs = pass_costs(untrained, backend, device, repeats)
                entries += _cost_entries(f"{layers} layers (untrained), batch 1", costs)
    finally:
        minimoe.set_default_dtype(previous)
    return entries


def pass_costs(model, backend, device, repeats, position=POSITION, batch_size=1):
    """What the passes of one greedy decoding step cost, for `batch_size` sequences at `position` with the caches
    holding the positions before it; the fastest of `repeats` rounds, timed in turns:

        main  seconds of a main pass over one position: the layers, the head, the argmax (a plain step)
        v     a main pass over two positions (a verification: the last token and the draft) / main
        c1    the draft after a refused draft: module 1 over one position, its norm, the shared head, the argmax
              / main
        c2    the draft after a kept one: module 1 also feeds the position it drafted from last time (its input,
              the drafted token, was not yet confirmed then) / main
    """
    shape = (batch_size, position + 2)
    ids = backend.asarray(numpy.random.default_rng(0).integers(0, model.config.vocab_size, shape))
    module, was_training = model.mtp[0], model.training
    model.eval()
    with no_grad():
        caches, mtp_cache = model.new_caches(*shape), model.new_mtp_caches(*shape)[0]
        hidden = model.hidden_states(ids[:, :position + 1], 0, caches)  # (B, position + 1, dim)

        # a write at `position` rewinds a cache there: every call of these does the same work
        def main_pass(width):
            return lambda: model.output(model.hidden_states(ids[:, position:position + width], position,
                                                            caches)).data.argmax(axis=-1)

        def draft(width):
            def call():
                h = module(hidden[:, position - width:position], model.embed(ids[:, position - width + 1:position + 1]),
                           position - width, mtp_cache)  # (B, width, dim)
                return model.head(module.norm(h[:, -1:])).data.argmax(axis=-1)
            return call

        module(hidden[:, :position - 1], model.embed(ids[:, 1:position]), 0, mtp_cache)  # positions 0 … position - 2
        times = time_in_turns({"main": main_pass(1), "verify": main_pass(2), "c1": draft(1), "c2": draft(2)},
                              20 * repeats, device, warmup=3)
        times = {name: value[_clock(device)] for name, value in times.items()}
    model.train(was_training)
    main = times["main"]
    return {"main": main, "clock": _clock(device),
            **{name: times[key] / main for name, key in (("v", "verify"), ("c1", "c1"), ("c2", "c2"))}}


def _clock(device):
    """Which minimum to use: CPU time on the CPU (one BLAS thread: an idle machine's wall-clock time, and on a
    shared one it leaves out the time other programs held the cores), wall-clock time on a GPU."""
    return "best" if device.is_gpu else "best_cpu"


def _draft_cost(costs, kept):
    """c for a share `kept` of drafts kept: the draft runs over two positions after a kept draft, one otherwise."""
    return (1 - kept) * costs["c1"] + kept * costs["c2"]


def _cost_entries(label, costs):
    v, c = costs["v"], costs["c2"]
    label = f"speculative pass costs, {label}"
    unit = "ms" if costs["clock"] == "best" else "CPU ms"
    return [Entry(f"{label}: main pass over 1 position (a plain step)", unit, costs["main"] * 1e3),
            Entry(f"{label}: main pass over 2 positions / over 1 (v)", "ratio", v),
            Entry(f"{label}: draft after a refused draft / main pass (c1)", "ratio", costs["c1"]),
            Entry(f"{label}: draft after a kept draft / main pass (c2)", "ratio", c),
            Entry(f"{label}: ceiling with every draft kept, 2 / (v + c2)", "ratio (higher is better)", 2 / (v + c))]


def _measure(model, kind, backend, tokenizer, device, repeats, costs):
    def decode(ids, speculative, new_tokens=MAX_NEW_TOKENS):
        return generate(model, ids, new_tokens, tokenizer.eos_id, tokenizer.pad_id, greedy=True,
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
        steps = sum(run.steps for run in fast)  # main-model passes, the prefill included
        calls = {"plain": lambda: [decode(batch, False) for batch in batches],
                 "speculative": lambda: [decode(batch, True) for batch in batches]}
        if batch_size == 1:  # what each call costs before its second token: the prefill, switching to eval mode
            calls.update({"plain, first token": lambda: [decode(batch, False, 1) for batch in batches],
                          "speculative, first token": lambda: [decode(batch, True, 1) for batch in batches]})
        rounds = 3 * repeats if batch_size == 1 else repeats  # short calls: more rounds for a good fastest one
        times = {name: value[_clock(device)] for name, value in time_in_turns(calls, rounds, device).items()}
        plain_rate, fast_rate = tokens / times["plain"], tokens / times["speculative"]
        label = f"speculative, {kind} answers, batch {batch_size}"
        if batch_size == 1:
            kept = accepted / drafted
            entries.append(Entry(f"{label}: drafts kept, a ({drafted} drafted, D = {model.config.n_mtp_modules})",
                                 "share", kept))
        unit = "tokens/s (higher is better)" if device.is_gpu else "tokens per CPU second (higher is better)"
        entries += [Entry(f"{label}: plain greedy", unit, plain_rate),
                    Entry(f"{label}: speculative greedy", unit, fast_rate),
                    Entry(f"{label}: speculative / plain", "ratio (higher is better)", fast_rate / plain_rate),
                    Entry(f"{label}: main-model passes per token", "passes", steps / (tokens / batch_size))]
        if batch_size == 1:
            # after the first token: plain makes tokens − 1 steps, speculation steps − 1, over the same tokens
            later = len(batches)
            plain_step = (times["plain"] - times["plain, first token"]) / (tokens - later)
            step = (times["speculative"] - times["speculative, first token"]) / (steps - later) / plain_step
            per_step, c = (tokens - later) / (steps - later), _draft_cost(costs, kept)
            entries += [Entry(f"{label}: cost-model ceiling (1 + a) / (v + c)", "ratio (higher is better)",
                              (1 + kept) / (costs["v"] + c)),
                        Entry(f"{label}: after the first token, speculative / plain", "ratio (higher is better)",
                              per_step / step),
                        Entry(f"{label}: after the first token, a speculative step in plain steps", "plain steps",
                              step),
                        Entry(f"{label}: of which bookkeeping and module 1's prefill, step - v - c", "plain steps",
                              step - costs["v"] - c)]
    return entries
