"""Does an MoE layer cost what it activates, not what it owns?

At equal tokens and equal expert size, time forward + backward of an MoE layer with 8, 16, 32 and 64 routed
experts (top-2). Total parameters grow 8×; the work per token (2 experts) does not, so the time should barely
move (target: 64 experts ≤ 1.3 × 8 experts). A dense SwiGLU MLP with the same *activated* parameters
(inter_dim = top_k · moe_inter_dim) shows the price of routing itself. The PyTorch twin (benchmarks/torch_model.py,
the same sort-based dispatch) is the yardstick.

    python -m benchmarks.moe_scaling [--tokens 4096] [--dim 64] [--inter 128] [--repeats 9] [--threads 1]
"""

import argparse

import numpy
import torch

import minimoe
from minimoe.model import ModelConfig
from minimoe.nn import MLP, MoE
from minimoe.testing import to_numpy

from . import torch_model
from .common import Entry, device_for, limit_threads, time_in_turns

__all__ = ["run"]


def _minimoe_step(layer, x_host, upstream_host):
    """One forward + backward of a minimoe layer (input tensors made once, outside the timing)."""
    x = minimoe.tensor(x_host, requires_grad=True)
    upstream = minimoe.tensor(upstream_host)
    parameters = layer.parameters()

    def step():
        for p in parameters:
            p.grad = None
        x.grad = None
        layer(x).backward(upstream)
        if isinstance(layer, MoE):  # a training loop logs this: make sure it was computed in time
            to_numpy(layer.stats["imbalance"])
    return step


def _torch_step(module, x_host, upstream_host, device):
    x = torch.tensor(x_host, requires_grad=True, device=device.torch_device)
    upstream = torch.tensor(upstream_host, device=device.torch_device)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(upstream)
    return step


def _twin(layer, top_k, device):
    """The PyTorch twin of a minimoe MoE or MLP, with the same weights (so the same routing)."""
    if isinstance(layer, MoE):
        config = ModelConfig(dim=layer.dim, n_routed_experts=layer.n_routed_experts, n_activated_experts=top_k,
                             moe_inter_dim=layer.moe_inter_dim, n_shared_experts=0, bias_update_speed=0.0)
        module = torch_model.MoE(config)
    else:
        module = torch_model.Expert(layer.dim, layer.inter_dim)
    module.load_state_dict({name: torch.as_tensor(to_numpy(value)) for name, value in layer.state_dict().items()})
    return module.to(device.torch_device)


def run(device, repeats, tokens=4096, dim=64, moe_inter_dim=128, top_k=2, expert_counts=(8, 16, 32, 64),
        seq_len=256, seed=0):
    rng = numpy.random.default_rng(seed)
    x_host = rng.normal(size=(tokens // seq_len, seq_len, dim)).astype("float32")
    upstream_host = rng.normal(size=x_host.shape).astype("float32")
    previous = minimoe.set_default_dtype("float32")
    try:
        with minimoe.use_backend(device.backend):
            minimoe.manual_seed(seed)
            layers = {n_experts: MoE(dim, n_experts, top_k, moe_inter_dim) for n_experts in expert_counts}
            layers["dense"] = MLP(dim, top_k * moe_inter_dim)
            calls = {}
            for name, layer in layers.items():
                calls["minimoe", name] = _minimoe_step(layer, x_host, upstream_host)
                calls["torch", name] = _torch_step(_twin(layer, top_k, device), x_host, upstream_host, device)
            times = time_in_turns(calls, repeats, device)
    finally:
        minimoe.set_default_dtype(previous)
    wall = {key: 1e3 * value["wall"] for key, value in times.items()}
    shape = f"top-{top_k}, {tokens} tokens, dim {dim}, experts of width {moe_inter_dim}"
    entries = []
    for n_experts in expert_counts:
        imbalance = float(to_numpy(layers[n_experts].stats["imbalance"]))
        entries.append(Entry(f"MoE layer fwd+bwd, {n_experts} routed experts ({shape}; load max/mean {imbalance:.2f})",
                             "ms", wall["minimoe", n_experts], wall["torch", n_experts]))
    entries.append(Entry(f"dense SwiGLU MLP fwd+bwd, width {top_k * moe_inter_dim} (the MoE's activated parameters)",
                         "ms", wall["minimoe", "dense"], wall["torch", "dense"]))
    fewest, most = min(expert_counts), max(expert_counts)
    entries.append(Entry(f"MoE cost growth, {most} vs {fewest} routed experts (target <= 1.3)", "x",
                         wall["minimoe", most] / wall["minimoe", fewest], wall["torch", most] / wall["torch", fewest]))
    return entries


def main():
    from .__main__ import print_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--inter", type=int, default=128, help="moe_inter_dim, the width of one expert")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    args = parser.parse_args()
    device = device_for(args.backend)
    with limit_threads(args.threads):
        print_table(run(device, args.repeats, args.tokens, args.dim, args.inter, args.top_k))


if __name__ == "__main__":
    main()
