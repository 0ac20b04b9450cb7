"""Where a NumPy engine's time goes: the fixed cost of one op on tiny tensors, and the share of a training step
spent inside BLAS matrix products, the part no Python engine can make faster.

Per-op overhead: 8×8 tensors, so that the arithmetic is nothing and what is timed is the framework — creating the
output, recording the graph node, and in backward visiting it.

Matrix products of a step: one training step of the demo model runs on the `fakegpu` backend, whose arrays send
every NumPy call through Python, so each matrix product can be seen; the shape, memory layout (strides) and
dtype of both operands (and of `out=` where given) are recorded. Those products are then replayed alone on
plain NumPy arrays laid out the same way, and timed in turns with a real step on the NumPy backend: their sum
is the time the step spends in BLAS, and its share of the step is the most any rewrite of the rest could save.
The same products replayed with torch.matmul compare the two BLAS libraries on exactly these shapes.
"""

import itertools

import numpy
import torch
from numpy.lib.stride_tricks import as_strided

import minimoe
from minimoe import backend as minimoe_backend
from minimoe.model import Transformer
from minimoe.train import lm_batch
from minimoe.tasks import AdditionTask, Tokenizer, build_corpus

from . import training
from .common import Entry, time_in_turns
from .workload import DEMO, addition_batches, build_model

__all__ = ["run", "op_overhead", "matmul_census"]

SIZE, CHAIN = 8, 10


def op_overhead(device, repeats):
    """µs per op for an add without a graph, a multiply that records one, and forward + backward per op of a
    chain of CHAIN (multiply, tanh) pairs."""
    rng = numpy.random.default_rng(0)
    a_host, b_host = (rng.normal(size=(SIZE, SIZE)).astype("float32") for _ in range(2))
    with minimoe.use_backend(device.backend):
        a, b = minimoe.tensor(a_host), minimoe.tensor(b_host)
        w = minimoe.tensor(a_host, requires_grad=True)
    ta, tb = (torch.tensor(x, device=device.torch_device) for x in (a_host, b_host))
    tw = torch.tensor(a_host, device=device.torch_device, requires_grad=True)
    inner = 100

    def repeat(op):
        def call():
            for _ in range(inner):
                op()
        return call

    def chain(x, w):
        def call():
            y = x
            for _ in range(CHAIN):
                y = (y * w).tanh()
            y.sum().backward()
        return call

    calls = {("add", "minimoe"): repeat(lambda: a + b), ("add", "torch"): repeat(lambda: ta + tb),
             ("mul", "minimoe"): repeat(lambda: w * b), ("mul", "torch"): repeat(lambda: tw * tb),
             ("chain", "minimoe"): chain(a, w), ("chain", "torch"): chain(ta, tw)}
    times = time_in_turns(calls, repeats, device, warmup=3)
    ops = {"add": inner, "mul": inner, "chain": 2 * CHAIN + 1}  # the chain's sum is an op too
    per_op = {key: 1e6 * value["wall"] / ops[key[0]] for key, value in times.items()}
    label = f"{SIZE}x{SIZE} float32"
    return [Entry(f"per-op overhead: a + b, {label}, no graph", "us/op", per_op["add", "minimoe"],
                  per_op["add", "torch"]),
            Entry(f"per-op overhead: w * b, {label}, recording the graph", "us/op", per_op["mul", "minimoe"],
                  per_op["mul", "torch"]),
            Entry(f"per-op overhead: forward + backward of {2 * CHAIN} ops (mul, tanh), {label}", "us/op",
                  per_op["chain", "minimoe"], per_op["chain", "torch"])]


def _layout(array):
    raw = array._array if type(array) is minimoe_backend.FakeGpuArray else array
    return raw.shape, raw.strides, raw.dtype


def matmul_census(step):
    """[(a layout, b layout, out layout or None)] of every matrix product `step()` makes on the fakegpu backend."""
    products = []
    array_type, function_type = minimoe_backend.FakeGpuArray, minimoe_backend._FakeGpuFunction
    original_ufunc, original_call = array_type.__array_ufunc__, function_type.__call__

    def recording_ufunc(self, ufunc, method, *inputs, **kwargs):  # a @ b
        if ufunc is numpy.matmul and method == "__call__":
            products.append((_layout(inputs[0]), _layout(inputs[1]), None))
        return original_ufunc(self, ufunc, method, *inputs, **kwargs)

    def recording_call(self, *args, **kwargs):  # xp.matmul(a, b, out=...)
        if self._function is numpy.matmul:
            out = kwargs.get("out")
            products.append((_layout(args[0]), _layout(args[1]), None if out is None else _layout(out)))
        return original_call(self, *args, **kwargs)

    array_type.__array_ufunc__, function_type.__call__ = recording_ufunc, recording_call
    try:
        step()
    finally:
        array_type.__array_ufunc__, function_type.__call__ = original_ufunc, original_call
    return products


def _buffer_size(shape, strides, itemsize):
    """Elements of the smallest buffer that an array of this shape and these (non-negative) strides addresses."""
    return sum((n - 1) * stride for n, stride in zip(shape, strides)) // itemsize + 1


def _numpy_like(layout, rng):
    shape, strides, dtype = layout
    buffer = rng.normal(size=_buffer_size(shape, strides, dtype.itemsize)).astype(dtype)
    return as_strided(buffer, shape, strides)


def _torch_like(layout, rng):
    shape, strides, dtype = layout
    buffer = torch.from_numpy(rng.normal(size=_buffer_size(shape, strides, dtype.itemsize)).astype(dtype))
    return torch.as_strided(buffer, shape, [stride // dtype.itemsize for stride in strides])


def _replays(products):
    """Two zero-argument callables that make all recorded products: with NumPy (same layouts, `out=` included)
    and with torch.matmul."""
    rng = numpy.random.default_rng(0)
    ours = [(_numpy_like(a, rng), _numpy_like(b, rng), None if out is None else _numpy_like(out, rng))
            for a, b, out in products]
    theirs = [(_torch_like(a, rng), _torch_like(b, rng)) for a, b, _ in products]

    def numpy_products():
        for a, b, out in ours:
            numpy.matmul(a, b, out=out)

    def torch_products():
        for a, b in theirs:
            torch.matmul(a, b)
    return numpy_products, torch_products


def blas_share(device, repeats):
    """The matrix products of one demo training step, replayed alone in NumPy and in torch, and their share of the
    step; in CPU time, which a busy machine disturbs less than wall-clock time (one thread: the two agree)."""
    tokenizer = Tokenizer()
    corpus = build_corpus(AdditionTask(), training.BATCH_SIZE, numpy.random.default_rng(0))
    with minimoe.use_backend("fakegpu"):
        minimoe.manual_seed(0)
        model = Transformer(DEMO)
        batch = lm_batch(corpus, tokenizer, minimoe_backend.backend_named("fakegpu"))
        products = matmul_census(training.minimoe_step(model, lambda: (batch, None)))
    numpy_products, torch_products = _replays(products)
    step = training.minimoe_step(build_model(DEMO, device),
                                 itertools.cycle(addition_batches(4, training.BATCH_SIZE, device)).__next__)
    times = time_in_turns({"step": step, "numpy products": numpy_products, "torch products": torch_products},
                          repeats, device, warmup=2)
    cpu = {name: 1e3 * value["cpu"] for name, value in times.items()}
    return [Entry(f"the {len(products)} matrix products of a demo training step, replayed alone (NumPy's BLAS vs "
                  "torch.matmul)", "ms CPU time", cpu["numpy products"], cpu["torch products"]),
            Entry("share of a demo training step (minimoe) spent in those matrix products", "% of CPU time",
                  100 * cpu["numpy products"] / cpu["step"])]


def run(device, repeats):
    entries = op_overhead(device, repeats)
    if not device.is_gpu:  # the census runs on the CPU stand-in; on a GPU, cuBLAS is another story
        entries += blas_share(device, repeats)
    return entries
