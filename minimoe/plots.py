"""The demo's pictures: the pretraining loss, R1-Zero's curves in miniature, and where the tokens went; and
`draw_diagram`, the block diagrams of the lessons (a pre-norm block, MoE dispatch and combine, the GRPO loop).

Each function takes a history (as `pretrain` and `train_grpo` return it), draws a matplotlib Figure, saves it
as PNG when given a path, and returns the Figure (a notebook displays it). The Figure API is used directly, not
pyplot, so nothing here needs a display.
"""

from matplotlib.figure import Figure

import numpy as np

__all__ = ["plot_pretraining", "plot_rl", "plot_expert_load", "draw_diagram"]


def _finish(figure, path):
    figure.tight_layout()
    if path:
        figure.savefig(path, dpi=110)
    return figure


def plot_pretraining(history, path=None):
    """Training loss per step (completion tokens), held-out loss at each evaluation, learning rate."""
    figure = Figure(figsize=(9, 3.6))
    loss_axes, lr_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    loss_axes.plot(history["step"], history["lm_loss"], lw=0.8, alpha=0.8, label="training batch")
    if history["eval"]:
        loss_axes.plot([e["step"] for e in history["eval"]], [e["heldout_loss"] for e in history["eval"]], "o-",
                       label="held-out")
    loss_axes.set(xlabel="step", ylabel="next-token loss (nats)", title="Pretraining", yscale="log")
    loss_axes.legend()
    lr_axes.plot(history["step"], history["lr"])
    lr_axes.set(xlabel="step", title="learning rate")
    return _finish(figure, path)


def _series(steps, key):
    return np.array([np.nan if s[key] is None else s[key] for s in steps], dtype=float)


def plot_rl(history, path=None):
    """Per GRPO step: reward and accuracy, response length (correct vs wrong), share of responses that think
    first, KL to the reference policy, and the share of groups that carry no signal."""
    steps = history["steps"]
    x = [s["step"] for s in steps]
    figure = Figure(figsize=(12, 6.4))
    axes = figure.subplots(2, 3).ravel()
    axes[0].plot(x, _series(steps, "reward_mean"), label="reward")
    axes[0].plot(x, _series(steps, "accuracy"), label="accuracy")
    axes[0].plot(x, _series(steps, "format_rate"), label="format", alpha=0.7)
    axes[0].set(title="Reward (sampled, T=1)", ylim=(-0.02, 1.15))
    axes[1].plot(x, _series(steps, "mean_length"), label="all")
    axes[1].plot(x, _series(steps, "length_correct"), label="correct", alpha=0.7)
    axes[1].plot(x, _series(steps, "length_wrong"), label="wrong", alpha=0.7)
    axes[1].set(title="Response length (tokens)")
    axes[2].plot(x, _series(steps, "thinking_share"), color="C3")
    axes[2].set(title="Share of responses that think first", ylim=(-0.02, 1.02))
    axes[3].plot(x, _series(steps, "kl"), color="C4")
    axes[3].set(title="KL to the reference policy (per token)")
    axes[4].plot(x, _series(steps, "all_equal_share"), color="C5", label="groups with equal rewards")
    axes[4].plot(x, _series(steps, "truncated_share"), color="C6", label="truncated responses")
    axes[4].set(title="No-signal groups, truncation", ylim=(-0.02, 1.02))
    axes[5].plot(x, _series(steps, "entropy"), color="C7")
    axes[5].set(title="Policy entropy (nats per token)")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _finish(figure, path)


def plot_expert_load(phases, path=None):
    """Heat maps of each MoE layer's load (share of routed tokens per expert) over training.
    phases: {"pretraining": history, "GRPO": history, ...}, each with per-step "expert_load" lists
    (pretraining history: history["expert_load"]; GRPO: history["steps"][i]["expert_load"])."""
    loads = {name: _loads(h) for name, h in phases.items()}
    loads = {name: l for name, l in loads.items() if l is not None and len(l)}
    if not loads:
        return None
    n_layers = next(iter(loads.values())).shape[1]
    n_experts = next(iter(loads.values())).shape[2]
    vmax = max(2.0 / n_experts, max(float(load.max()) for load in loads.values()))  # one scale for every phase
    figure = Figure(figsize=(5 * len(loads), 2.4 * n_layers + 0.6))
    axes = np.array(figure.subplots(n_layers, len(loads), squeeze=False))
    for column, (name, load) in enumerate(loads.items()):  # load: (steps, layers, experts)
        for layer in range(n_layers):
            ax = axes[layer, column]
            image = ax.imshow(load[:, layer].T, aspect="auto", interpolation="nearest", cmap="viridis",
                              vmin=0, vmax=vmax)
            ax.set(title=f"{name}: MoE layer {layer}", xlabel="step", ylabel="expert")
            figure.colorbar(image, ax=ax, label="share of tokens")
    return _finish(figure, path)


def _loads(history):
    if "steps" in history:
        rows = [s["expert_load"] for s in history["steps"]]
    else:
        rows = history.get("expert_load", [])
    rows = [r for r in rows if r]
    return np.array(rows, dtype=float) if rows else None


def draw_diagram(ax, boxes, arrows, title=None):
    """Draw a block diagram on the Axes `ax`, in axes fractions (0..1 both ways), and hide the axes.

    boxes:  {name: (x, y, label)} or (x, y, label, colour): a rounded box centred at (x, y);
    arrows: [(start, end)], (start, end, label) or (start, end, label, bend): an arrow from box to box, clipped at
            the boxes' edges, its label at the middle, bent by `bend` (0 straight; ±0.3 a gentle arc)."""
    patches, centres = {}, {}
    for name, (x, y, label, *colour) in boxes.items():
        text = ax.text(x, y, label, ha="center", va="center", fontsize=9, transform=ax.transAxes, zorder=3,
                       bbox=dict(boxstyle="round,pad=0.45", fc=colour[0] if colour else "#e6eef8", ec="#3a4a5a"))
        patches[name], centres[name] = text.get_bbox_patch(), (x, y)
    for start, end, *rest in arrows:
        label = rest[0] if rest else ""
        bend = rest[1] if len(rest) > 1 else 0.0
        ax.annotate("", xy=centres[end], xytext=centres[start], xycoords="axes fraction", zorder=4,
                    arrowprops=dict(arrowstyle="-|>", color="#3a4a5a", lw=1.2, mutation_scale=14, shrinkA=0, shrinkB=0,
                                    patchA=patches[start], patchB=patches[end],
                                    connectionstyle=f"arc3,rad={bend}"))
        if label:  # at the middle of the arrow; an arc's middle is half its bend off the chord, as matplotlib draws it
            (x0, y0), (x1, y1) = ax.transAxes.transform([centres[start], centres[end]])
            middle = ((x0 + x1) / 2 + bend * (y1 - y0) / 2, (y0 + y1) / 2 - bend * (x1 - x0) / 2)
            ax.text(*ax.transAxes.inverted().transform(middle), label, ha="center", va="center", fontsize=8,
                    style="italic", transform=ax.transAxes, zorder=5,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none"))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return ax
