"""The models and the data the benchmarks run: the demo models (classic and V3) and a wider classic one, their
PyTorch twins with the same weights, and batches of the addition corpus the demo trains on."""

import dataclasses

import numpy

import minimoe
from minimoe.model import ModelConfig, Transformer
from minimoe.preset import load_preset
from minimoe.rewards import BOS
from minimoe.tasks import AdditionTask, Tokenizer, build_corpus
from minimoe.train import lm_batch

__all__ = ["DEMO", "V3", "WIDE", "describe", "build_model", "build_pair", "addition_batches", "addition_prompts",
           "to_torch"]

VOCAB_SIZE = Tokenizer().vocab_size
DEMO = ModelConfig(vocab_size=VOCAB_SIZE)  # the classic demo model (`--preset classic`), ~0.26M parameters
V3 = ModelConfig(vocab_size=VOCAB_SIZE, **load_preset("v3")["model"])  # the demo's default model, ~0.27M parameters
# Every width 4× the demo's (model, feed-forward, experts, heads, MLA latent); layers, heads and experts unchanged.
WIDE = dataclasses.replace(DEMO, dim=4 * DEMO.dim, inter_dim=4 * DEMO.inter_dim, moe_inter_dim=4 * DEMO.moe_inter_dim,
                           kv_lora_rank=4 * DEMO.kv_lora_rank, qk_nope_head_dim=4 * DEMO.qk_nope_head_dim,
                           qk_rope_head_dim=4 * DEMO.qk_rope_head_dim, v_head_dim=4 * DEMO.v_head_dim)


def describe(config, model):
    """A short name for a configuration: its size and shape."""
    counts = model.parameter_counts()
    return (f"{counts['total'] / 1e6:.2f}M params ({counts['activated'] / 1e6:.2f}M activated), dim {config.dim}, "
            f"{config.attention.upper()}, {config.n_routed_experts} experts top-{config.n_activated_experts}")


def build_model(config, device, seed=0):
    """A minimoe Transformer in float32 on `device.backend`."""
    previous = minimoe.set_default_dtype("float32")
    try:
        with minimoe.use_backend(device.backend):
            minimoe.manual_seed(seed)
            return Transformer(config)
    finally:
        minimoe.set_default_dtype(previous)


def build_pair(config, device, seed=0):
    """A minimoe Transformer in float32 on `device.backend` and its PyTorch twin on `device.torch_device`, loaded
    from the minimoe model's state dict (so both start from the same weights and route the same way)."""
    from .torch_model import from_minimoe

    model = build_model(config, device, seed)
    twin = from_minimoe(config, {name: _host(array) for name, array in model.state_dict().items()},
                        device=device.torch_device)
    return model, twin


def _host(array):
    return minimoe.backend.backend_of(array).to_numpy(array)


def addition_batches(count, batch_size, device, seed=0):
    """`count` (inputs, targets) pairs of 3-digit addition texts in the demo's mix (direct answers and worked
    solutions): minimoe arrays on the device's backend, and the same numbers as torch tensors."""
    rng = numpy.random.default_rng(seed)
    tokenizer = Tokenizer()
    batches = []
    for _ in range(count):
        inputs, targets = lm_batch(build_corpus(AdditionTask(), batch_size, rng), tokenizer,
                                   minimoe.backend.backend_named(device.backend))
        batches.append(((inputs, targets), (to_torch(inputs, device), to_torch(targets, device))))
    return batches


def addition_prompts(batch_size, device, seed=0):
    """(minimoe ids, torch ids) of `batch_size` addition prompts, "<bos>347+589=" (all the same length)."""
    tokenizer = Tokenizer()
    problems = AdditionTask().sample(numpy.random.default_rng(seed), batch_size, "test")
    ids, _ = tokenizer.encode_batch([BOS + problem.prompt for problem in problems])
    ours = minimoe.backend.backend_named(device.backend).asarray(ids)
    return ours, to_torch(ours, device)


def to_torch(array, device):
    import torch

    return torch.as_tensor(_host(array)).to(device.torch_device)
