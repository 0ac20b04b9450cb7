"""Does an MoE layer cost what it activates, not what it owns?

At equal tokens and equal expert size, time forward + backward of an MoE layer with 8, 16, 32 and 64 routed
experts (top-2). Total parameters grow 8×; the work per token (2 experts) does not, so the time should barely
move (target: 64 experts ≤ 1.3 × 8 experts). A dense SwiGLU MLP with the same *activated* parameters
(inter_dim = top_k · moe_inter_dim) shows the price of routing itself. The same layers in PyTorch (the twin in
tests/reference/moe.py, a plain loop over experts) give a yardstick.

    python benchmarks/moe_scaling.py [--tokens 4096] [--dim 64] [--inter 128] [--repeats 9] [--no-torch]

BLAS and torch run on one thread unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say otherwise (set before NumPy
loads, so only when this file is the script): on a small shared machine a multithreaded BLAS spin-waits for
busy cores and one matmul can take 50× longer. The layers are timed in turns, one run each per round, so a
disturbance hits all of them alike; each figure is the median over the rounds.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402  (host data for the inputs)

import minimoe  # noqa: E402
from minimoe.nn import MLP, MoE  # noqa: E402
from minimoe.testing import to_numpy  # noqa: E402


def median_times(steps, repeats):
    """{name: median wall time of steps[name]()}, timing the steps in turns for `repeats` rounds after one
    warm-up run each."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def minimoe_step(layer, x_host, upstream_host):
    """One forward + backward of a minimoe layer (float tensors made once, outside the timing)."""
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


def torch_step(layer, x_host, upstream_host):
    import torch

    x = torch.tensor(x_host, requires_grad=True)
    upstream = torch.tensor(upstream_host)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(upstream)
    return step


def torch_twin_of(layer, top_k, moe_inter_dim):
    """The PyTorch twin of a minimoe MoE or MLP, with the same weights (so the same routing)."""
    from reference import moe as twin

    state = {name: to_numpy(value) for name, value in layer.state_dict().items()}
    if isinstance(layer, MoE):
        module = twin.MoE(layer.dim, layer.n_routed_experts, top_k, moe_inter_dim)
    else:
        module = twin.MLP(layer.dim, layer.inter_dim)
    return twin.load_minimoe_state(module, state)


def run(n_tokens=4096, dim=64, moe_inter_dim=128, top_k=2, expert_counts=(8, 16, 32, 64), repeats=9,
        seq_len=256, with_torch=True, backend="numpy", dtype="float32", seed=0):
    """Time forward+backward of each layer. Returns {"moe": {E: seconds}, "dense": seconds,
    "imbalance": {E: max/mean load of the timed batch}, and with_torch: "torch_moe": {E: s}, "torch_dense": s}."""
    rng = np.random.default_rng(seed)
    x_host = rng.normal(size=(n_tokens // seq_len, seq_len, dim)).astype(dtype)
    upstream_host = rng.normal(size=x_host.shape).astype(dtype)
    previous_dtype = minimoe.set_default_dtype(dtype)
    try:
        with minimoe.use_backend(backend):
            minimoe.manual_seed(seed)
            layers = {n_experts: MoE(dim, n_experts, top_k, moe_inter_dim) for n_experts in expert_counts}
            layers["dense"] = MLP(dim, top_k * moe_inter_dim)
            steps = {("minimoe", name): minimoe_step(layer, x_host, upstream_host) for name, layer in layers.items()}
            if with_torch:
                import torch

                torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
                steps.update({("torch", name): torch_step(torch_twin_of(layer, top_k, moe_inter_dim), x_host,
                                                          upstream_host) for name, layer in layers.items()})
            times = median_times(steps, repeats)
    finally:
        minimoe.set_default_dtype(previous_dtype)
    results = {"moe": {e: times["minimoe", e] for e in expert_counts}, "dense": times["minimoe", "dense"],
               "imbalance": {e: float(to_numpy(layers[e].stats["imbalance"])) for e in expert_counts}}
    if with_torch:
        results["torch_moe"] = {e: times["torch", e] for e in expert_counts}
        results["torch_dense"] = times["torch", "dense"]
    return results


def report(results):
    """Print the table: time per layer, ratio to the fewest experts, load balance, and against PyTorch."""
    fewest, most = min(results["moe"]), max(results["moe"])
    base = results["moe"][fewest]
    with_torch = "torch_moe" in results
    print(f"{'experts':>8} {'minimoe ms':>11} {f'vs {fewest}':>6} {'load max/mean':>14}"
          + (f" {'torch ms':>9} {'minimoe/torch':>14}" if with_torch else ""))
    rows = [(n_experts, seconds, f"{results['imbalance'][n_experts]:.2f}",
             results["torch_moe"][n_experts] if with_torch else None)
            for n_experts, seconds in results["moe"].items()]
    rows.append(("dense", results["dense"], "", results.get("torch_dense")))
    for name, seconds, balance, theirs in rows:
        line = f"{name:>8} {1e3 * seconds:>11.1f} {seconds / base:>5.2f}× {balance:>14}"
        if theirs is not None:
            line += f" {1e3 * theirs:>9.1f} {seconds / theirs:>13.2f}×"
        print(line)
    print(f"{most} vs {fewest} experts: {results['moe'][most] / base:.2f}× (target ≤ 1.3×: the cost follows the "
          f"activated parameters); {fewest}-expert MoE vs the dense MLP with equal activated parameters: "
          f"{base / results['dense']:.2f}×")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--inter", type=int, default=128, help="moe_inter_dim, the width of one expert")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    print(f"forward+backward, {args.tokens} tokens, dim {args.dim}, experts of width {args.inter}, "
          f"top-{args.top_k}, float32, backend {args.backend}, median of {args.repeats}, "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'default')} BLAS thread(s)")
    report(run(args.tokens, args.dim, args.inter, args.top_k, repeats=args.repeats, with_torch=not args.no_torch,
               backend=args.backend))


if __name__ == "__main__":
    main()
