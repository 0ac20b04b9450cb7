"""Peak memory of a training run of the demo model (200 steps), minimoe against PyTorch, each in a process of its own.

What is measured, on the CPU: the resident set size (RSS), the memory the operating system really holds for the
process. Its baseline is taken after the imports, the model and the optimizer exist, just before the first step (a
fresh batch is made for every step, as in pretraining); the high-water mark is then reset (Linux:
`/proc/self/clear_refs`; elsewhere getrusage's ru_maxrss, which cannot be reset, is used) and read after the steps.
Peak minus baseline is the memory training itself needs —
activations kept for backward, gradients, the optimizer's moments, temporaries — without the libraries' own footprint
(PyTorch's alone is a few hundred MB, which would flatter minimoe). Both whole-process peaks are reported too.
Flat across steps: the peak reached by step 20 against the peak after the last step.

On a GPU: the bytes each framework's memory pool holds at its fullest (CuPy's default pool, which keeps what it
once allocated; torch.cuda.max_memory_reserved), above the same baseline.

    python -m benchmarks.memory --framework minimoe|torch [--steps 200] [--threads 1] [--backend numpy]
                                [--keep-freed-memory]
prints one JSON line; `run` starts both and compares them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy

__all__ = ["run", "measure"]

CHECKPOINTS = (1, 20, 50, 100, 150, 200)


def _current_rss():
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak():
    """Make the high-water mark start again from the current RSS; False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss():
    try:
        with open("/proc/self/status") as status:
            return 1024 * next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else 1024 * peak  # bytes on macOS, KiB on Linux


def measure(framework, steps, threads, backend, keep_freed_memory=False):
    """Train the demo model for `steps` steps with one framework, a fresh batch per step as in pretraining;
    returns the figures as a dict (bytes)."""
    from minimoe.backend import backend_named
    from minimoe.tasks import AdditionTask, Tokenizer, build_corpus
    from minimoe.train import lm_batch

    from . import training
    from .common import device_for, limit_threads
    from .workload import DEMO, build_model, build_pair, to_torch

    device = device_for(backend)
    if keep_freed_memory:
        from minimoe.backend import keep_freed_host_memory

        keep_freed_host_memory()
    rng, tokenizer = numpy.random.default_rng(0), Tokenizer()

    def next_batch():
        inputs, targets = lm_batch(build_corpus(AdditionTask(), training.BATCH_SIZE, rng), tokenizer,
                                   backend_named(device.backend))
        if framework == "minimoe":
            return (inputs, targets), None
        return None, (to_torch(inputs, device), to_torch(targets, device))

    with limit_threads(threads, with_torch=framework == "torch"):  # minimoe's process never loads torch
        if framework == "minimoe":
            step = training.minimoe_step(build_model(DEMO, device), next_batch)
        else:
            step = training.torch_step(build_pair(DEMO, device)[1], next_batch)
        pool = _gpu_pool_bytes(framework) if device.is_gpu else None
        baseline = pool() if pool else _current_rss()
        resettable = pool is not None or _reset_peak()
        peaks, current, started = {}, {}, time.perf_counter()
        for i in range(1, steps + 1):
            step()
            if i in CHECKPOINTS or i == steps:
                peaks[i] = pool() if pool else _peak_rss()
                current[i] = pool() if pool else _current_rss()
    return {"framework": framework, "steps": steps, "baseline": baseline, "peaks": peaks, "current": current,
            "peak_resettable": resettable, "process_peak": pool() if pool else _peak_rss(),
            "seconds": time.perf_counter() - started}


def _gpu_pool_bytes(framework):
    """A function giving the bytes the framework's GPU memory pool holds at its fullest so far."""
    if framework == "minimoe":
        import cupy

        return cupy.get_default_memory_pool().total_bytes
    import torch

    return torch.cuda.max_memory_reserved


def run(steps, threads, backend, keep_freed_memory=False):
    """Measure both frameworks, one subprocess each, and compare them (MB)."""
    from .common import Entry

    results = {}
    for framework in ("minimoe", "torch"):
        command = [sys.executable, "-m", "benchmarks.memory", "--framework", framework, "--steps", str(steps),
                   "--threads", str(threads), "--backend", backend]
        if keep_freed_memory:
            command.append("--keep-freed-memory")
        done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        if done.returncode:
            raise RuntimeError(f"memory benchmark for {framework} failed:\n{done.stderr[-3000:]}")
        results[framework] = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 2 ** 20
    training_peak = {f: (r["peaks"][str(steps)] - r["baseline"]) / mb for f, r in results.items()}
    early = min(20, steps)
    growth = {f: (r["peaks"][str(steps)] - r["peaks"][str(early)]) / mb for f, r in results.items()}
    process = {f: r["process_peak"] / mb for f, r in results.items()}
    what = "GPU memory pool" if backend == "cupy" else "RSS"
    return [Entry(f"peak memory of a {steps}-step demo training run, above the baseline ({what})", "MB",
                  training_peak["minimoe"], training_peak["torch"]),
            Entry(f"growth of that peak from step {early} to step {steps} (flat: ~0)", "MB",
                  growth["minimoe"], growth["torch"], compare=False),
            Entry(f"whole-process peak {what}, libraries included", "MB", process["minimoe"], process["torch"])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=["minimoe", "torch"], required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.framework, args.steps, args.threads, args.backend, args.keep_freed_memory)))


if __name__ == "__main__":
    main()
