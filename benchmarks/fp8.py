"""FP8 measured: what DeepSeek-V3's fine-grained quantization buys (its technical report, §3.3), in four tables.

    python -m benchmarks.fp8 quantization   relative error of per-tensor vs 1×128 tile / 128×128 block scaling on
                                             activations with injected outliers (and a bar chart, --plots DIR)
    python -m benchmarks.fp8 gemm           max relative error of the simulated FP8 GEMM as K grows, with and
                                             without promotion to FP32 every 128 elements (the report: ~2% at
                                             K = 4096 without promotion)
    python -m benchmarks.fp8 training       the demo model pretrained with its FFN GEMMs in simulated FP8 against
                                             float32, on the same batches from the same initialisation, per seed:
                                             final held-out loss and its relative error (--steps, --seeds), next to
                                             controls that are not FP8 (initial weights nudged by 1e-6, bf16 GEMM
                                             inputs, float64): how far the loss moves for reasons of its own
    python -m benchmarks.fp8 memory         the bytes FP8 saves at V3's size, computed from its published config
    python -m benchmarks.fp8 all            the four

--json PATH writes the rows; --plots DIR draws the quantization and GEMM charts and the training loss curves.
The training table is slow on a CPU (the simulation rounds every GEMM input, and every 4-product partial sum): a step
takes ~7x float32's CPU time with the 14-bit accumulator, ~2.5x with exact sums (the "exact-sum" variants). Run it
with one BLAS thread (`OPENBLAS_NUM_THREADS=1`) and `nice` on a shared machine.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import ml_dtypes
import numpy as np

import minimoe
from minimoe import fp8
from minimoe.model import ModelConfig, Transformer
from minimoe.tasks import AdditionTask, Tokenizer
from minimoe.train import PretrainConfig, pretrain

__all__ = ["quantization", "gemm", "training", "memory", "main"]


# ==============================================================================================================
# (1) quantization error with outliers
# ==============================================================================================================

def activations(outliers, magnitude=1.0, tokens=512, channels=1024, seed=0):
    """Hidden-state-like activations x (tokens, channels) ~ N(0, 1), with outliers, and the outliers' mask.

    outliers "none"     plain N(0, 1)
             "channels" 8 of 1024 channels `magnitude` × larger in every token (the systematic outlier features
                        of LLM activations, Dettmers et al. 2022, ~100×)
             "massive"  8 values, in 2 channels of 4 tokens, ±`magnitude` (the "massive activations" of Sun et
                        al. 2024: ~10⁴ × the median magnitude)"""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, channels))
    mask = np.zeros(x.shape, bool)
    if outliers == "channels":
        mask[:, rng.choice(channels, 8, replace=False)] = True
        x[mask] *= magnitude
    elif outliers == "massive":
        mask[np.ix_(rng.choice(tokens, 4, replace=False), rng.choice(channels, 2, replace=False))] = True
        x[mask] = rng.choice([-1, 1], 8) * magnitude * rng.uniform(0.5, 1, 8)
    return x.astype(np.float32), mask


SCALINGS = [("per-tensor", "tensor", 128), ("per-token (1×1024)", "tile", 1024), ("tile 1×128", "tile", 128),
            ("block 128×128", "block", 128)]
SCENARIOS = [("no outliers", "none", 1.0), ("outlier channels ×100", "channels", 100.0)] + \
            [(f"massive values ×1e{p}", "massive", 10.0 ** p) for p in (3, 4, 5, 6)]


def quantization():
    """Rows: scenario, scaling, format, and the relative error ‖deq(Q(x)) − x‖ / ‖x‖ over the ordinary values
    (the outliers excluded: they dominate any norm that includes them, and they are quantized well — their own
    group's scale is made for them), over all values, the median of |error / x| over the ordinary values (a
    norm hides what happens to the small ones), and the share of ordinary values flushed to 0."""
    rows = []
    for label, outliers, magnitude in SCENARIOS:
        x, mask = activations(outliers, magnitude)
        ordinary = ~mask
        for fmt in ("e4m3", "e5m2"):
            for scaling, granularity, tile in SCALINGS:
                if fmt == "e5m2" and granularity != "tensor":
                    continue  # E5M2 trades precision for range: shown with one scale only; V3 does not use it
                q = fp8.quantize(x, granularity, fmt, tile)
                error = q.dequantize(np.float64) - x
                rows.append({"activations": label, "magnitude": magnitude, "scaling": scaling, "format": fmt,
                             "error_ordinary": float(np.linalg.norm(error[ordinary]) / np.linalg.norm(x[ordinary])),
                             "error_all": float(np.linalg.norm(error) / np.linalg.norm(x)),
                             "median_value_error": float(np.median(np.abs(error[ordinary] / x[ordinary]))),
                             "flushed_to_zero": float(np.mean(q.values[ordinary] == 0))})
    return rows


def plot_quantization(rows, path):
    """Median |error / x| of the ordinary values against the size of 8 massive outliers, per scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    massive = [r for r in rows if r["activations"].startswith("massive")]
    for (scaling, _, _), marker in zip(SCALINGS + [("per-tensor", None, None)], "osd^x"):
        for fmt in (("e4m3",) if marker != "x" else ("e5m2",)):
            chosen = [r for r in massive if r["scaling"] == scaling and r["format"] == fmt]
            if not chosen:
                continue
            label = f"{scaling} ({fmt.upper()})"
            magnitudes = [r["magnitude"] for r in chosen]
            axes[0].plot(magnitudes, [r["median_value_error"] for r in chosen], marker=marker, label=label)
            axes[1].plot(magnitudes, [max(r["flushed_to_zero"], 1e-6) for r in chosen], marker=marker, label=label)
    for ax, ylabel in zip(axes, ["median |error / x| of ordinary values", "ordinary values flushed to 0 (1e-6: none)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("size of 8 massive outliers among 512×1024 N(0, 1) values")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle("FP8 quantization: one scale per tensor vs DeepSeek-V3's fine-grained scales")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ==============================================================================================================

def gemm(ks=(128, 256, 512, 1024, 2048, 4096), size=64, group_ks=(4,), seed=0):
    """Rows: K, inputs, group_k, and max |C − C_exact| / max |C_exact| without promotion and with promotion every
    128, where C_exact is the float64 GEMM of the same FP8-quantized inputs (so only accumulation is measured).
    Inputs "uniform [0, 1)" add without cancellation (activations after a SwiGLU are mostly of one sign);
    "normal" cancel. The accumulator: 14 significant bits, truncating (V3's recipe, FP8Recipe's defaults)."""
    rng = np.random.default_rng(seed)
    recipe = fp8.RECIPES["v3"]
    rows = []
    for inputs in ("uniform [0, 1)", "normal"):
        for k in ks:
            draw = rng.random if inputs.startswith("uniform") else rng.standard_normal
            a = recipe.quantize_along_k(draw((size, k)).astype(np.float32), "tile")
            b = recipe.quantize_along_k(draw((size, k)).astype(np.float32), "block")
            exact = a @ b.T
            for group_k in group_ks:
                row = {"K": k, "inputs": inputs, "group_k": group_k}
                for name, promote_every in (("no_promotion", None), ("promote_every_128", 128)):
                    c = fp8.simulated_gemm(a, b, recipe.accumulator_bits, promote_every, group_k,
                                           recipe.accumulator_rounding)
                    row[name] = float(np.abs(c - exact).max() / np.abs(exact).max())
                rows.append(row)
    return rows


def plot_gemm(rows, path, group_k=4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for inputs in dict.fromkeys(r["inputs"] for r in rows):
        chosen = [r for r in rows if r["inputs"] == inputs and r["group_k"] == group_k]
        for column, style in (("no_promotion", "o-"), ("promote_every_128", "s--")):
            ax.plot([r["K"] for r in chosen], [r[column] for r in chosen], style,
                    label=f"{inputs}, {column.replace('_', ' ')}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("max |C − C_exact| / max |C_exact|")
    ax.set_title(f"FP8 GEMM, 14-bit truncating accumulator ({group_k} products per add)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ==============================================================================================================
# (3) the demo model pretrained in FP8
# ==============================================================================================================

@dataclasses.dataclass(frozen=True)
class BF16Inputs(fp8.FP8Recipe):
    """Not FP8: the same GEMMs (Fprop, Dgrad, Wgrad of the same layers) with every input rounded to bfloat16,
    no scales, exact sums. BF16 is what V3's FP8 run is measured against; here it is a control: how far a
    rounding 32x finer than E4M3's moves the final loss."""

    def quantize_along_k(self, x, scaling):
        return x.astype(ml_dtypes.bfloat16).astype(np.float64)


EXACT_SUM = {"accumulator_bits": None}
VARIANTS = {
    "float32": None,
    # controls: perturbations that are not FP8, to measure how far the final loss moves for reasons of its own
    "float64": "float64",  # rounding differences of ~1e-7 at every operation
    "float32 init×(1+1e-6ε)": "perturbed",  # each initial weight moved by a relative 1e-6, once
    "bf16 GEMM inputs": BF16Inputs(**EXACT_SUM),
    "fp8 v3": fp8.RECIPES["v3"],  # 1×128 tiles, 128×128 blocks, 14-bit accumulator promoted every 128
    "fp8 per-tensor": fp8.RECIPES["per_tensor"],
    # the same quantization with exact sums: 3-4x faster to simulate
    "fp8 v3 exact-sum": dataclasses.replace(fp8.RECIPES["v3"], **EXACT_SUM),
    "fp8 per-tensor exact-sum": dataclasses.replace(fp8.RECIPES["per_tensor"], **EXACT_SUM),
    "fp8 v3 exact-sum Fprop-only": dataclasses.replace(fp8.RECIPES["v3"], quantize_gradients=False, **EXACT_SUM),
}
CONTROLS = ("float64", "float32 init×(1+1e-6ε)", "bf16 GEMM inputs")


def perturb_weights(model, relative, seed):
    """Multiply every parameter by (1 + relative · ε), ε ~ N(0, 1) from a generator of its own (the batches and
    the model's random state are untouched)."""
    rng = np.random.default_rng([seed, 1])
    for p in model.parameters():
        p.data[...] = p.data * (1 + relative * rng.standard_normal(p.data.shape)).astype(p.data.dtype)


def training(seeds=(0, 1, 2), steps=1000, variants=tuple(VARIANTS), batch_size=128, progress=False):
    """Pretrain the demo model once per (seed, variant), each variant from the same initial weights and on the
    same batches (both follow the seed), evaluating the held-out loss every steps/10. Rows: seed, variant, final
    held-out loss, its errors against float32 of the same seed (compare_with_float32), seconds; each run's
    training loss curve ("curve") and held-out evaluations ("evals", (step, loss) pairs)."""
    tokenizer, task = Tokenizer(), AdditionTask(3)
    config = PretrainConfig(steps=steps, batch_size=batch_size, warmup_steps=min(50, steps // 10),
                            eval_every=max(steps // 10, 1), checkpoint_every=0)
    rows = []
    for seed in seeds:
        for name in variants:
            dtype = minimoe.set_default_dtype("float64" if name == "float64" else "float32")
            minimoe.manual_seed(seed)
            model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size))
            if isinstance(VARIANTS[name], fp8.FP8Recipe):
                fp8.use_fp8(model, VARIANTS[name])
            elif VARIANTS[name] == "perturbed":
                perturb_weights(model, 1e-6, seed)
            history = pretrain(model, task, dataclasses.replace(config, seed=seed), tokenizer, progress=progress)
            minimoe.set_default_dtype(dtype)
            rows.append({"seed": seed, "variant": name, "steps": steps, "batch_size": batch_size,
                         "heldout_loss": history["eval"][-1]["heldout_loss"], "seconds": round(history["seconds"], 1),
                         "curve": history["lm_loss"],
                         "evals": [(e["step"], e["heldout_loss"]) for e in history["eval"]]})
            print(f"  seed {seed} {name:>28}: held-out loss {rows[-1]['heldout_loss']:.4f}  "
                  f"({history['seconds']:.0f} s)", flush=True)
    return compare_with_float32(rows)


def compare_with_float32(rows):
    """Add to each row its differences from the float32 run of the same seed, (x − float32's) / float32's:
    "signed_error" of the final held-out loss ("relative_error" its size), and "late_error": of the mean
    held-out loss over the evaluations of the second half of training (less at the mercy of the step at which
    one run makes a late drop)."""
    reference = {row["seed"]: row for row in rows if row["variant"] == "float32"}
    for row in rows:
        base = reference[row["seed"]]
        row["late_heldout_loss"] = late_mean(row)
        is_reference = row is base
        signed = (row["heldout_loss"] - base["heldout_loss"]) / base["heldout_loss"]
        row["signed_error"] = None if is_reference else signed
        row["relative_error"] = None if is_reference else abs(signed)
        row["late_error"] = None if is_reference else (late_mean(row) - late_mean(base)) / late_mean(base)
    return rows


def late_mean(row):
    """The mean held-out loss over the evaluations at steps > half of the run's."""
    return float(np.mean([loss for step, loss in row["evals"] if step > row["steps"] / 2]))


def summarise(rows):
    """One row per variant: mean and max |final error| over seeds, the mean late error's size, and the error of
    the mean over seeds of the final held-out loss (float32's seed-to-seed spread, as a standard deviation, on
    the float32 row)."""
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    final = {v: np.array([r["heldout_loss"] for r in rows if r["variant"] == v]) for v in variants}
    out = []
    for v in variants:
        chosen = [r for r in rows if r["variant"] == v]
        if v == "float32":
            out.append({"variant": v, "seed_mean": float(final[v].mean()),
                        "seed_std": float(final[v].std(ddof=1)) if len(final[v]) > 1 else None})
            continue
        out.append({"variant": v, "seed_mean": float(final[v].mean()),
                    "mean_abs_final": float(np.mean([r["relative_error"] for r in chosen])),
                    "max_abs_final": float(np.max([r["relative_error"] for r in chosen])),
                    "mean_abs_late": float(np.mean([abs(r["late_error"]) for r in chosen])),
                    "error_of_seed_mean": float(final[v].mean() / final["float32"].mean() - 1)})
    return out


def plot_training(rows, path):
    """Seed 0's loss curves (20-step means), and each FP8 run's relative difference from float32's, step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    seed = rows[0]["seed"]
    runs = {row["variant"]: np.convolve(row["curve"], np.ones(20) / 20, mode="valid") for row in rows
            if row["seed"] == seed}
    steps = np.arange(len(runs["float32"])) + 20
    for i, (name, curve) in enumerate(runs.items()):
        left.plot(steps, curve, label=name, color=f"C{i}")
        if name != "float32":
            right.plot(steps, (curve - runs["float32"]) / runs["float32"], label=name, color=f"C{i}")
    left.set(xlabel="step", ylabel="training loss (20-step mean)", yscale="log",
             title=f"demo model, seed {seed}: float32 vs simulated FP8")
    right.set(xlabel="step", ylabel="(loss − float32's) / float32's", title="relative difference, same batches")
    right.axhline(0, color="gray", linewidth=0.5)
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ==============================================================================================================
# (4) memory at V3's size
# ==============================================================================================================

# DeepSeek-V3's published configuration (config.json of deepseek-ai/DeepSeek-V3; report Table/§4.2)
V3 = dict(vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, inter_dim=18432, moe_inter_dim=2048,
          n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_heads=128, q_lora_rank=1536,
          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


def v3_parameters(c=V3):
    """Parameter counts of V3's main model (MTP module excluded) by what V3 does with them in FP8 training."""
    d, h = c["dim"], c["n_heads"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    attention = (d * c["q_lora_rank"] + c["q_lora_rank"] * h * qk_head  # wq_a, wq_b
                 + d * (c["kv_lora_rank"] + c["qk_rope_head_dim"])  # wkv_a
                 + c["kv_lora_rank"] * h * (c["qk_nope_head_dim"] + c["v_head_dim"])  # wkv_b
                 + h * c["v_head_dim"] * d)  # wo
    norms_per_layer = 2 * d + c["q_lora_rank"] + c["kv_lora_rank"]
    moe_layers = c["n_layers"] - c["n_dense_layers"]
    expert = 3 * d * c["moe_inter_dim"]
    return {
        "embedding + head": 2 * c["vocab_size"] * d,
        "attention projections": c["n_layers"] * attention,
        "dense FFN": c["n_dense_layers"] * 3 * d * c["inter_dim"],
        "experts (routed + shared)": moe_layers * (c["n_routed_experts"] + c["n_shared_experts"]) * expert,
        "gates": moe_layers * c["n_routed_experts"] * (d + 1),  # the weight and the balancing bias
        "norms": c["n_layers"] * norms_per_layer + d,
    }


def memory(sequence=4096):
    """Rows: what is stored, bytes in BF16, bytes in FP8 (1 byte per value + a float32 scale per 128×128 weight
    block or per 1×128 activation tile), and the saving. Weights: the GEMM weights V3 quantizes (everything but
    embedding, head, gates, norms) — the compute copy; FP32 master weights and BF16 moments stay as they are.
    Activations: the FFN GEMM inputs cached for backward of one `sequence`-token sequence, all MoE layers."""
    c, params = V3, v3_parameters()
    total = sum(params.values())
    fp8_weights = params["attention projections"] + params["dense FFN"] + params["experts (routed + shared)"]
    ffn_weights = params["dense FFN"] + params["experts (routed + shared)"]
    per_block, per_tile = 1 + 4 / 128 ** 2, 1 + 4 / 128
    copies = c["n_activated_experts"] + c["n_shared_experts"]
    cached = copies * (c["dim"] + c["moe_inter_dim"]) * (c["n_layers"] - c["n_dense_layers"]) * sequence
    gib = 2 ** 30
    rows = [{"item": f"parameters: {name}", "count": n} for name, n in params.items()]
    rows.append({"item": "parameters: total", "count": total})
    stored = [("weights V3 runs in FP8 (all GEMMs but embedding, head, gates)", fp8_weights, per_block),
              ("weights of the FFNs only (this repository's switch)", ffn_weights, per_block),
              ("all weights, for inference (the rest kept BF16)", total, None),
              (f"FFN inputs cached for backward, {sequence} tokens × 58 MoE layers", cached, per_tile)]
    for item, n, per_value in stored:
        bf16 = 2 * n
        fp8_bytes = n * per_value if per_value else fp8_weights * per_block + 2 * (total - fp8_weights)
        rows.append({"item": item, "count": n, "bf16_GiB": bf16 / gib, "fp8_GiB": fp8_bytes / gib,
                     "saved_GiB": (bf16 - fp8_bytes) / gib})
    return rows


# ==============================================================================================================
# the command line
# ==============================================================================================================

def _print(title, rows, columns):
    print(f"\n{title}")
    print("  ".join(f"{c:>{w}}" for c, w in columns))
    for row in rows:
        cells = []
        for c, w in columns:
            value = row.get(c)
            text = "-" if value is None else (f"{value:.3g}" if isinstance(value, float) else
                                              f"{value:,}" if isinstance(value, int) else str(value))
            cells.append(f"{text:>{w}}")
        print("  ".join(cells), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fp8", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["quantization", "gemm", "training", "memory", "all"])
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps per run (training)")
    parser.add_argument("--batch-size", type=int, default=128, help="problems per step (training)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (training)")
    parser.add_argument("--variants", default="float32,float32 init×(1+1e-6ε),bf16 GEMM inputs,fp8 v3,"
                                              "fp8 per-tensor",
                        help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--json", metavar="PATH", help="write every table's rows as JSON")
    parser.add_argument("--plots", metavar="DIR", help="draw the charts and the loss curves there")
    args = parser.parse_args(argv)
    what = ["quantization", "gemm", "training", "memory"] if args.what == "all" else [args.what]
    results = {}
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
    started = time.perf_counter()
    if "quantization" in what:
        results["quantization"] = rows = quantization()
        _print("(1) quantization: relative error of deq(Q(x)) on 512×1024 activations", rows,
               [("activations", 21), ("scaling", 18), ("format", 6), ("error_ordinary", 14), ("error_all", 9),
                ("median_value_error", 18), ("flushed_to_zero", 15)])
        if args.plots:
            plot_quantization(rows, os.path.join(args.plots, "fp8_quantization.png"))
    if "gemm" in what:
        results["gemm"] = rows = gemm(group_ks=(1, 4, 32))
        _print("(2) GEMM: max |C − C_exact| / max |C_exact|, 64×K by K×64, 14-bit truncating accumulator", rows,
               [("inputs", 15), ("K", 5), ("group_k", 7), ("no_promotion", 12), ("promote_every_128", 17)])
        if args.plots:
            plot_gemm(rows, os.path.join(args.plots, "fp8_gemm.png"))
    if "training" in what:
        variants = [v.strip() for v in args.variants.split(",")]
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        if variants[0] != "float32":
            raise SystemExit("--variants: the first must be float32 (the reference of each seed)")
        print(f"\n(3) training the demo model, {args.steps} steps of {args.batch_size} problems, seeds {args.seeds}",
              flush=True)
        rows = training(args.seeds, args.steps, variants, args.batch_size)
        results["training"] = rows
        table = [{k: v for k, v in r.items() if k not in ("curve", "evals")} for r in rows]
        _print("final held-out loss; its difference from float32's (same seed), and that of the mean held-out loss "
               "over the second half's evaluations", table,
               [("seed", 4), ("variant", 28), ("steps", 5), ("heldout_loss", 12), ("signed_error", 12),
                ("late_heldout_loss", 17), ("late_error", 10), ("seconds", 8)])
        results["training_summary"] = summary = summarise(rows)
        _print("over seeds: |final error| mean and max, |late error| mean, and the error of the seed-mean final "
               "loss (controls first: how far the loss moves without FP8)", summary,
               [("variant", 28), ("seed_mean", 9), ("seed_std", 8), ("mean_abs_final", 14), ("max_abs_final", 13),
                ("mean_abs_late", 13), ("error_of_seed_mean", 18)])
        if args.plots:
            plot_training(rows, os.path.join(args.plots, "fp8_training.png"))
    if "memory" in what:
        results["memory"] = rows = memory()
        _print("(4) memory at DeepSeek-V3's size (671B parameters; GiB = 2^30 bytes)", rows,
               [("item", 72), ("count", 17), ("bf16_GiB", 9), ("fp8_GiB", 9), ("saved_GiB", 9)])
    print(f"\n[{time.perf_counter() - started:.0f} s]")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
