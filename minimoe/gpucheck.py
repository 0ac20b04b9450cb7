"""One command for whoever has an NVIDIA GPU:  python -m minimoe.gpucheck

It checks the CuPy path end to end and prints a summary to paste into an issue:
  1. the op suite on CuPy (pytest on the tests parametrized over backends, CuPy's cases only);
  2. both demo models (the default v3 preset: MLA and a sigmoid gate; the classic one: MHA and a softmax gate) on
     CuPy against NumPy: one training step (loss, every gradient, the parameters after AdamW) and greedy
     generation, within float32 tolerances;
  3. the benchmark suite, `python -m benchmarks --backend cupy --quick` (minimoe on CuPy against PyTorch on CUDA).
On a machine without a usable GPU it says why and exits with status 2. `--backend fakegpu` rehearses steps 1-2 on
the CPU stand-in.

Tolerances (float32 on both sides; sums on a GPU run in another order, and atomic adds in no fixed order):
loss and parameters after the step to a relative 1e-4, gradients to 1e-3 of their largest entry, prefill logits to
1e-3, and at least 90% of greedily generated tokens identical (a near-tie between two tokens may flip).
"""

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np

from . import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_SUITE = ["test_ops.py", "test_autograd.py", "test_backend.py", "test_moe.py", "test_attention.py",
            "test_model.py", "test_generate.py"]


class Check:
    """One line of the summary: a name, whether it passed, and what was measured."""

    def __init__(self, name, ok, detail):
        self.name, self.ok, self.detail = name, ok, detail

    def __str__(self):
        return f"- [{'PASS' if self.ok else 'FAIL'}] {self.name}: {self.detail}"


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def compare_with_numpy(device_backend, batch=16, length=41, new_tokens=10, presets=("v3", "classic")):
    """Each preset's demo model on `device_backend` against the same model on NumPy: a training step and greedy
    generation. Five checks per preset."""
    return [check for preset in presets
            for check in _compare_model(device_backend, preset, batch, length, new_tokens)]


def _compare_model(device_backend, preset, batch, length, new_tokens):
    from .generate import generate
    from .model import ModelConfig, Transformer
    from .optim import AdamW
    from .preset import load_preset
    from .train import lm_loss

    config = ModelConfig(**load_preset(preset)["model"])
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length))
    results = {}
    for name in ("numpy", device_backend):
        with backend.use_backend(name) as chosen:
            backend.manual_seed(0)
            model = Transformer(config)
            optimizer = AdamW(model.parameters(), lr=1e-3)
            device_ids = chosen.asarray(ids)
            loss, _ = lm_loss(model, device_ids[:, :-1], device_ids[:, 1:])
            loss.backward()
            grads = {n: backend.to_host(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            after = {n: backend.to_host(p.data) for n, p in model.named_parameters()}
            logits = backend.to_host(model(device_ids[:, :5]).data)
            tokens = backend.to_host(generate(model, device_ids[:, :5], new_tokens, eos_id=-1, pad_id=0,
                                              greedy=True).responses)
            results[name] = dict(loss=loss.item(), grads=grads, after=after, logits=logits, tokens=tokens)
    cpu, dev = results["numpy"], results[device_backend]
    loss_error = abs(dev["loss"] - cpu["loss"]) / abs(cpu["loss"])
    grad_error = max(_relative(dev["grads"][n], g) for n, g in cpu["grads"].items())
    same_grads = dev["grads"].keys() == cpu["grads"].keys()
    after_error = max(_relative(dev["after"][n], p) for n, p in cpu["after"].items())
    logit_error = _relative(dev["logits"], cpu["logits"])
    agreement = float((dev["tokens"] == cpu["tokens"]).mean())
    where = f"{preset} model, {device_backend} vs numpy"
    return [
        Check(f"training step loss ({where})", loss_error <= 1e-4,
              f"{dev['loss']:.6f} vs {cpu['loss']:.6f} (relative difference {loss_error:.1e}, tolerance 1e-4)"),
        Check(f"gradients ({where})", same_grads and grad_error <= 1e-3,
              f"largest difference {grad_error:.1e} of the largest entry, {len(cpu['grads'])} parameters "
              "(tolerance 1e-3)" + ("" if same_grads else "; different parameters got gradients")),
        Check(f"parameters after AdamW ({where})", after_error <= 1e-4, f"{after_error:.1e} (tolerance 1e-4)"),
        Check(f"prefill logits ({where})", logit_error <= 1e-3, f"{logit_error:.1e} (tolerance 1e-3)"),
        Check(f"greedy generation ({where})", agreement >= 0.9,
              f"{agreement:.1%} of {dev['tokens'].size} tokens identical (at least 90%)"),
    ]


def _tail(text, lines=1):
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


def run_op_suite(device_backend):
    """pytest on the backend-parametrized tests, the cases of `device_backend` only."""
    tests = [os.path.join(ROOT, "tests", name) for name in OP_SUITE]
    if not all(os.path.exists(path) for path in tests):
        return Check("op suite", False, "tests/ not found: run from a source checkout of minimoe")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", device_backend,
                             *tests], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "MINIMOE_BACKEND": "numpy", "PYTHONPATH": ROOT})
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    detail = f"{_tail(result.stdout)} in {time.perf_counter() - started:.0f} s"
    if failed:
        detail += "; " + "; ".join(failed[:10])
    return Check(f"op suite on {device_backend} (pytest -k {device_backend})", result.returncode == 0, detail)


def run_benchmarks():
    if not os.path.exists(os.path.join(ROOT, "benchmarks", "__main__.py")):
        return Check("benchmarks", False, "benchmarks/ not found: run from a source checkout of minimoe"), ""
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--backend", "cupy", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    return Check("python -m benchmarks --backend cupy --quick", result.returncode == 0,
                 "table below" if result.returncode == 0 else _tail(result.stderr or result.stdout, 3)), result.stdout


def describe(device_backend):
    """Versions and the device, for the summary."""
    lines = [f"python {platform.python_version()}, numpy {np.__version__}, {platform.platform()}"]
    if device_backend == "cupy":
        import cupy

        properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = properties["name"].decode() if isinstance(properties["name"], bytes) else properties["name"]
        lines.append(f"cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
                     f"driver {cupy.cuda.runtime.driverGetVersion()}, device {name}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minimoe.gpucheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cupy", choices=["cupy", "fakegpu"],
                        help="cupy (default): the real GPU; fakegpu: rehearse the checks on the CPU stand-in")
    parser.add_argument("--skip-tests", action="store_true", help="skip the op suite")
    parser.add_argument("--skip-benchmarks", action="store_true", help="skip the benchmark suite")
    args = parser.parse_args(argv)
    try:
        backend.backend_named(args.backend)
    except backend.BackendUnavailableError as error:
        print(f"minimoe.gpucheck: no usable GPU here, nothing was checked.\n{error}", file=sys.stderr)
        return 2
    checks, tables = [], ""
    if not args.skip_tests:
        checks.append(run_op_suite(args.backend))
    checks += compare_with_numpy(args.backend)
    if args.backend == "cupy" and not args.skip_benchmarks:
        check, tables = run_benchmarks()
        checks.append(check)
    print(f"### minimoe.gpucheck ({args.backend}): {sum(c.ok for c in checks)}/{len(checks)} checks passed")
    for line in describe(args.backend):
        print(line)
    print("\n".join(str(check) for check in checks))
    if tables:
        print("\n```\n" + tables.strip() + "\n```")
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
