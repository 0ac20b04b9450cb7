"""What every benchmark shares: the thread limits, the timing protocol, the two devices, and the results.

Timing protocol. The two frameworks run *in turns* inside one process: after a warm-up call each, every round
times one call of each, so a disturbance from the rest of the machine hits both alike; the figure reported is the
median over the rounds. Wall-clock time is what a user waits for; CPU time (time.process_time, all threads of
the process) is also recorded, because on a shared machine it moves much less when other programs compete for
the cores. On a GPU only wall-clock time means something, measured after synchronising the device.
"""

import contextlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy

__all__ = ["Entry", "Device", "device_for", "limit_threads", "time_in_turns", "machine_description", "GpuUnavailable"]


@dataclass
class Entry:
    """One line of the results: a measurement of both frameworks and their ratio minimoe / torch. The ratio is
    None where a figure exists for one framework only, or where a ratio means nothing (compare=False, e.g. two
    growths that are both about zero)."""

    name: str
    unit: str
    minimoe: float
    torch: float = None
    compare: bool = True
    ratio: float = field(init=False, default=None)

    def __post_init__(self):
        if self.compare and self.torch not in (None, 0) and self.minimoe is not None:
            self.ratio = self.minimoe / self.torch

    def to_dict(self):
        return {key: value for key, value in asdict(self).items() if key != "compare"}


class GpuUnavailable(RuntimeError):
    """--backend cupy was asked for on a machine where CuPy or PyTorch cannot use a CUDA GPU."""


@dataclass
class Device:
    """Where both frameworks run: minimoe's backend name and torch's device, and how to wait for them."""

    backend: str  # "numpy" or "cupy"
    torch_device: str  # "cpu" or "cuda"

    @property
    def is_gpu(self):
        return self.backend == "cupy"

    def synchronize(self):
        """Wait until both frameworks have finished the work they queued (a no-op on the CPU)."""
        if self.is_gpu:
            import cupy
            import torch

            cupy.cuda.Device().synchronize()
            torch.cuda.synchronize()


def device_for(backend):
    """The Device for --backend numpy|cupy; raises GpuUnavailable, saying why, when cupy cannot run here."""
    if backend == "numpy":
        return Device("numpy", "cpu")
    if backend != "cupy":
        raise ValueError(f"--backend must be numpy or cupy, got {backend!r}")
    import torch

    import minimoe

    problems = []
    try:
        minimoe.backend.backend_named("cupy")
    except minimoe.BackendUnavailableError as error:
        problems.append(f"minimoe: {error}")
    if not torch.cuda.is_available():
        problems.append(f"PyTorch {torch.__version__}: torch.cuda.is_available() is False (a CPU-only build, or "
                        "no GPU)")
    if problems:
        raise GpuUnavailable("--backend cupy compares minimoe on CuPy with PyTorch on CUDA, and needs a CUDA GPU "
                             "usable by both. " + " ".join(problems))
    return Device("cupy", "cuda")


@contextlib.contextmanager
def limit_threads(threads, with_torch=True):
    """Run NumPy's BLAS (through threadpoolctl) and, with_torch, PyTorch's intra-op pool with `threads` threads."""
    from threadpoolctl import threadpool_limits

    if with_torch:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        if with_torch:
            torch.set_num_threads(previous)


def time_in_turns(calls, repeats, device, warmup=1):
    """{name: {"wall": median seconds, "cpu": median CPU seconds, "best": the fastest round's seconds, "best_cpu":
    the fewest CPU seconds of a round}} for each zero-argument callable in `calls`, called in turns for `repeats`
    rounds after `warmup` untimed calls each. (The minima suit ratios of short calls on a shared machine: other
    programs only ever add time.)"""
    for call in calls.values():
        for _ in range(warmup):
            call()
    device.synchronize()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            call()
            device.synchronize()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name]), "best": min(wall[name]),
                   "best_cpu": min(cpu[name])} for name in calls}


def machine_description(threads, device, keep_freed_memory=False):
    """A few lines naming the machine, the libraries and the settings the figures were measured with."""
    import torch
    from threadpoolctl import threadpool_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = ", ".join(sorted({f"{pool['internal_api']} {pool.get('version') or ''}".strip()
                             for pool in threadpool_info() if pool["user_api"] == "blas"})) or "unknown"
    lines = [f"machine: {cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}",
             f"python {platform.python_version()}, numpy {numpy.__version__} (BLAS: {blas}), torch {torch.__version__}",
             f"threads: {threads} (NumPy's BLAS via threadpoolctl, torch.set_num_threads), dtype float32, "
             f"backend {device.backend} vs torch on {device.torch_device}",
             "host allocator: " + ("freed memory kept for reuse (minimoe.backend.keep_freed_host_memory)"
                                   if keep_freed_memory else "the C library's defaults")]
    if device.is_gpu:
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    try:
        lines.append(f"load average when starting: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    return lines
