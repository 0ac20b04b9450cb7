"""The command line of the benchmark suite: see benchmarks/__init__.py."""

import argparse
import json
import sys
import time

from minimoe.backend import keep_freed_host_memory

from . import distributed, generation, memory, moe_scaling, overhead, speculative, training
from .common import GpuUnavailable, device_for, limit_threads, machine_description

SUITES = ("training", "generation", "moe", "overhead", "memory", "speculative", "distributed")


def _number(value):
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def print_table(entries, file=sys.stdout):
    """The entries as a table: name, unit, minimoe, torch, minimoe / torch."""
    width = max([len(entry.name) for entry in entries] + [9])
    unit_width = max([len(entry.unit) for entry in entries] + [4])
    print(f"{'benchmark':<{width}}  {'unit':<{unit_width}}  {'minimoe':>10}  {'torch':>10}  {'minimoe/torch':>13}",
          file=file)
    for entry in entries:
        ratio = "-" if entry.ratio is None else f"{entry.ratio:.2f}x"
        print(f"{entry.name:<{width}}  {entry.unit:<{unit_width}}  {_number(entry.minimoe):>10}  "
              f"{_number(entry.torch):>10}  {ratio:>13}", file=file)
    file.flush()


def run_suite(names, device, threads, quick, keep_freed_memory=False):
    repeats = 5 if quick else 15
    runs = {"training": lambda: training.run(device, repeats),
            "generation": lambda: generation.run(device, max(3, repeats // 3)),
            "moe": lambda: moe_scaling.run(device, repeats, expert_counts=(8, 64) if quick else (8, 16, 32, 64)),
            "overhead": lambda: overhead.run(device, repeats),
            "memory": lambda: memory.run(50 if quick else 200, threads, device.backend, keep_freed_memory),
            "speculative": lambda: speculative.run(device, max(3, repeats // 3)),
            "distributed": lambda: distributed.run(quick)}
    entries = []
    with limit_threads(threads):
        for name in names:
            started = time.perf_counter()
            section = runs[name]()
            print(f"\n[{name}: {time.perf_counter() - started:.0f} s]")
            print_table(section)
            entries += section
    return entries


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="minimoe timed against PyTorch.")
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON list of "
                                                       "{name, unit, minimoe, torch, ratio}")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                        help="numpy: both on the CPU; cupy: minimoe on CuPy against PyTorch on CUDA")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS / intra-op threads for both frameworks (default 1; see the README)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps: a rough picture in minutes")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call minimoe.backend.keep_freed_host_memory() first (glibc keeps freed blocks for "
                             "reuse; it applies to both frameworks, which share the process)")
    parser.add_argument("--only", default=",".join(SUITES),
                        help=f"comma-separated benchmarks to run, from {','.join(SUITES)} (default: all)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(SUITES)}")
    try:
        device = device_for(args.backend)
    except GpuUnavailable as error:
        print(f"benchmarks: skipped. {error}", file=sys.stderr)
        return 0
    if args.keep_freed_memory and not keep_freed_host_memory():
        print("benchmarks: --keep-freed-memory has no effect here (not glibc)", file=sys.stderr)
    print("\n".join(machine_description(args.threads, device, args.keep_freed_memory)))
    entries = run_suite(names, device, args.threads, args.quick, args.keep_freed_memory)
    print("\nall results (ratios are minimoe / torch: below 1 minimoe is faster or smaller, except for tokens/s)")
    print_table(entries)
    if args.json:
        with open(args.json, "w") as out:
            json.dump([entry.to_dict() for entry in entries], out, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
