"""Generation throughput with the key/value cache: 64 addition prompts continued greedily to the model's
max_seq_len, one new token per step for all 64 sequences, with multi-head attention (its KVCache) and with
Multi-head Latent Attention in its absorbed inference form (its LatentCache). EOS is switched off (eos_id=-1) so
that both frameworks generate exactly the same number of tokens; the prefill is included."""

import dataclasses

from minimoe.generate import generate
from minimoe.tasks import Tokenizer

from . import torch_model
from .common import Entry, time_in_turns
from .workload import DEMO, addition_prompts, build_pair

__all__ = ["run"]

BATCH_SIZE = 64


def run(device, repeats):
    entries = []
    pad_id = Tokenizer().pad_id
    for label, config in (("MHA", DEMO), ("MLA absorbed", dataclasses.replace(DEMO, attention="mla", mla_absorb=True))):
        model, twin = build_pair(config, device)
        prompts, torch_prompts = addition_prompts(BATCH_SIZE, device)
        new_tokens = config.max_seq_len - prompts.shape[1]
        calls = {"minimoe": lambda: generate(model, prompts, new_tokens, eos_id=-1, pad_id=pad_id, greedy=True),
                 "torch": lambda: torch_model.generate(twin, torch_prompts, new_tokens)}
        times = time_in_turns(calls, repeats, device)
        generated = BATCH_SIZE * new_tokens
        name = f"generation with cache, {label} (batch {BATCH_SIZE}, prompt {prompts.shape[1]} + {new_tokens} tokens)"
        entries.append(Entry(name, "tokens/s (higher is better)", generated / times["minimoe"]["wall"],
                             generated / times["torch"]["wall"]))
    return entries
