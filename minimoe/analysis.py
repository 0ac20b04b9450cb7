"""Do the experts specialise? Which experts each token goes to, by kind of token, measured against a null.

The slogan says a Mixture-of-Experts is "a collection of specialised sub-models, each adept at one type of
information". DeepSeekMoE's claim is narrower: fine-grained experts plus a shared expert make each routed expert
more specialised and less redundant. Both can be measured on our small model:

1. Label every token with a category (`token_categories`): what it is (a digit, `+`, `=`, a tag…), where it is
   (prompt, inside <think>, inside <answer>), what a digit does in the column walk (an operand, a column's addend,
   the carry "+1", a column sum, an answer digit) and its place value (units, tens, hundreds).
2. Record the router's choice for every token and MoE layer (`route`): the K experts and their combine weights.
3. Tabulate (`contingency`): counts[c, e] = how many of the (token, chosen expert) assignments of category c
   went to expert e. Each token contributes its K assignments, so the table's total is K × tokens.
4. Summarise it with one number, the uncertainty coefficient of the category given the expert:

       U(C|E) = I(C; E) / H(C),     I(C; E) = Σ_{c,e} p(c,e) log₂ p(c,e) / (p(c) p(e)),     p = counts / Σ counts

   "The share of the category's uncertainty that knowing the expert removes": 0 when the experts receive every
   category in the same proportions, 1 when each expert only ever sees one category. We pick it over the
   symmetric NMI 2I/(H(C)+H(E)) and over I/H(E) because (a) it asks the specialisation question directly
   (does an expert's traffic tell you what kind of token it is?), (b) it can reach 1 under top-K routing, where a
   category served by its own K experts still has H(E|C) = log₂ K > 0, so I/H(E) cannot, and (c) its denominator
   H(C) depends only on the tokens, not on the model: models with 8 or 16 experts, balanced or not, analysed on
   the same tokens share it, so their U differ exactly as their I(C;E) do.
5. Compare with a null (`shuffled_null`): the same tokens, the same loads, the same K-sets, but each token's set
   of experts handed to a random other token (a permutation). Category sizes and expert loads are kept exactly;
   any link between them is broken. The plug-in estimate of I is biased upwards (by about (|C|−1)(|E|−1) /
   (2 N ln 2) bits for N assignments), and the null measures that bias for this very table. "Specialised"
   then means: U well above the null's mean, in units of the null's spread (z). A second null shuffles only
   among tokens with the same id: what is left above it is what the category says beyond the token's identity.
6. Two cautions when comparing models. Pooling the K slots lets a token's weaker choices dilute U, so models with
   different K are compared on their top-1 choice (`routes._replace(experts=[e[..., :1] for e in routes.experts])`).
   And more experts make a finer partition, which can carry more information about the category by construction;
   the null removes the estimation bias, not that.

Also here: `experts_disabled` (ablate experts by making the router never pick them), `token_losses` (per-token
next-token loss, to see who suffers from an ablation), `expert_output_similarity` (how redundant the experts are:
the cosine similarity of their outputs on the same inputs) and `routing_explorer` (an ipywidgets view of each
token's experts, drawn as static figures when no widget front end is available).

All of this is analysis: it copies routing decisions to the host (NumPy) on purpose, once per call.
"""

import contextlib
from collections import namedtuple

import numpy as np

from .autograd import Tensor, no_grad
from .backend import backend_of, get_array_module, get_backend
from .rewards import ANSWER, ANSWER_END, BOS, EOS, THINK, THINK_END
from .rl import token_logprobs
from .tasks import Tokenizer

__all__ = ["Labelling", "Routes", "LABELLINGS", "token_categories", "route", "contingency", "entropy_bits",
           "mutual_information_bits", "uncertainty_coefficient", "shuffled_null", "specialisation", "specialists",
           "gate_bias", "experts_disabled", "token_losses", "expert_output_similarity", "routing_figure",
           "routing_explorer"]

Labelling = namedtuple("Labelling", ["names", "labels"])
Labelling.__doc__ = """One way of putting tokens into categories:
    names  -- tuple of category names
    labels -- (B, T) int array: the category index of each token, −1 for tokens outside this labelling"""

Routes = namedtuple("Routes", ["experts", "weights", "scores", "mask", "inputs"])
Routes.__doc__ = """The router's decisions for a batch of sequences, one entry per MoE layer (host arrays):
    experts -- list of (B, T, K) int: the chosen experts, best first
    weights -- list of (B, T, K) float: their combine weights g
    scores  -- list of (B, T, E) float: the router's scores s
    mask    -- (B, T) bool: the real tokens (not padding)
    inputs  -- list of (B, T, dim) backend arrays: each MoE layer's (normalised) input, for running experts"""

TOKEN_KINDS = ("<bos>", "digit", "operator", "=", "space", THINK, THINK_END, ANSWER, ANSWER_END, EOS)
REGIONS = ("prompt", "think", "answer", "end")
DIGIT_ROLES = ("operand_a", "operand_b", "column_x", "column_y", "carry", "column_sum", "answer")
PLACES = ("units", "tens", "hundreds", "thousands", "10^4", "10^5", "10^6", "10^7", "10^8", "10^9")
LABELLINGS = {"token": TOKEN_KINDS, "region": REGIONS, "digit_role": DIGIT_ROLES, "place": PLACES}


# ==============================================================================================================
# categories of tokens
# ==============================================================================================================

def _kind_table(tokenizer):
    """(V,) int: the TOKEN_KINDS index of every vocabulary entry (−1 for padding)."""
    kind = {BOS: "<bos>", "=": "=", " ": "space", THINK: THINK, THINK_END: THINK_END, ANSWER: ANSWER,
            ANSWER_END: ANSWER_END, EOS: EOS, **{d: "digit" for d in "0123456789"},
            **{op: "operator" for op in "+-*()>:"}}
    return np.array([TOKEN_KINDS.index(kind[t]) if t in kind else -1 for t in tokenizer.tokens])


def _last_true_index(flags):
    """(B, T) bool -> (B, T) int: the index of the most recent True at or before each position (0 if none)."""
    positions = np.arange(flags.shape[1])
    return np.maximum.accumulate(np.where(flags, positions, 0), axis=1)


def _inclusive_block(opens, closes):
    """True from an opening tag through its closing tag, both included (blocks may repeat, never nest)."""
    return np.cumsum(opens, axis=1) > np.cumsum(closes, axis=1) - closes


def token_categories(ids, tokenizer=None):
    """{name: Labelling} for a (B, T) array of token ids in the addition task's formats (minimoe.tasks):

        "<bos>347+589=<think>7+9=16 4+8+1=13 3+5+1=9</think><answer>936</answer><eos>"

    token      -- what the token is: <bos>, digit, operator (+ - * ( ) > :), =, space, and each tag
    region     -- where it is: prompt (up to the first tag), think (<think> … </think>, tags included),
                  answer (<answer> … </answer>), end (<eos> and after); text between blocks gets −1
    digit_role -- digits only: operand_a / operand_b in the prompt; in the think block's column "x+y+1=s" the
                  addends column_x and column_y, the carry (the "1" of "+1") and the column_sum digits; answer
    place      -- digits only: the place value of a prompt or answer digit (units = the last digit of its
                  number), and for a think digit the column it belongs to (units = the first column walked)
    Padding is −1 everywhere. Vectorised over the whole batch: cumulative sums, no loop over tokens."""
    tokenizer = tokenizer or Tokenizer()
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"token_categories: expected token ids of shape (batch, time), got {ids.shape}")
    token_id = tokenizer.token_to_id
    kind = _kind_table(tokenizer)[ids]  # (B, T)
    real = ids != tokenizer.pad_id
    is_ = {t: ids == token_id[t] for t in (THINK, THINK_END, ANSWER, ANSWER_END, EOS, "+", "=", " ")}
    digit = kind == TOKEN_KINDS.index("digit")

    think = _inclusive_block(is_[THINK], is_[THINK_END])
    answer = _inclusive_block(is_[ANSWER], is_[ANSWER_END])
    end = np.cumsum(is_[EOS], axis=1) > 0
    prompt = np.cumsum(is_[THINK] | is_[ANSWER] | is_[EOS], axis=1) == 0
    region = np.select([prompt, think & ~end, answer & ~end, end], list(range(len(REGIONS))), -1)

    # The think block's columns are separated by spaces; within a column, count the '+' and '=' seen so far.
    column_start = _last_true_index(is_[" "] | is_[THINK])
    column = np.cumsum(is_[" "] & think, axis=1)
    pluses, equals = np.cumsum(is_["+"], axis=1), np.cumsum(is_["="], axis=1)
    plus_in_column = pluses - np.take_along_axis(pluses, column_start, axis=1)
    after_equals = equals - np.take_along_axis(equals, column_start, axis=1) > 0
    think_role = np.select([after_equals, plus_in_column == 0, plus_in_column == 1, plus_in_column == 2],
                           [DIGIT_ROLES.index(r) for r in ("column_sum", "column_x", "column_y", "carry")], -1)
    prompt_role = np.where(pluses == 0, DIGIT_ROLES.index("operand_a"), DIGIT_ROLES.index("operand_b"))
    digit_role = np.select([digit & prompt, digit & think, digit & answer],
                           [prompt_role, think_role, DIGIT_ROLES.index("answer")], -1)

    # Place value: how many digits follow in the same run (the index of the next non-digit, found from the right).
    positions = np.arange(ids.shape[1])
    next_non_digit = np.minimum.accumulate(np.where(digit, ids.shape[1], positions)[:, ::-1], axis=1)[:, ::-1]
    run_place = next_non_digit - positions - 1
    place = np.select([digit & think, digit & (prompt | answer)], [column, run_place], -1)
    place = np.where(place < len(PLACES), place, -1)

    return {name: Labelling(names, np.where(real, labels, -1)) for name, names, labels in
            [("token", TOKEN_KINDS, kind), ("region", REGIONS, region), ("digit_role", DIGIT_ROLES, digit_role),
             ("place", PLACES, place)]}


# ==============================================================================================================
# recording the router
# ==============================================================================================================

def _host(array):
    return array.numpy() if isinstance(array, Tensor) else backend_of(array).to_numpy(array)


@contextlib.contextmanager
def _recording_gates(model):
    """Within the block, every MoE layer's gate appends (its input, its Routing) to the yielded list. The wrapper
    is an attribute of the gate instance, removed on exit: the library's classes are not touched."""
    records = []

    def recording(gate):
        forward = gate.forward

        def forward_and_record(x):
            routing = forward(x)
            records.append((x, routing))
            return routing
        return forward_and_record

    gates = [moe.gate for moe in model.moe_layers()]
    for gate in gates:
        gate.forward = recording(gate)
    try:
        yield records
    finally:
        for gate in gates:
            del gate.forward


@no_grad()
def route(model, ids, pad_id=None):
    """Routes (host arrays) of a forward pass of `model` over token ids (B, T) in eval mode (deterministic
    routing: no noise, no capacity drop). The model's train/eval mode is restored afterwards."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"route: expected token ids of shape (batch, time), got {ids.shape}")
    if not model.moe_layers():
        raise ValueError("route: the model has no MoE layer (ffn='dense'?): there is no routing to analyse")
    pad_id = Tokenizer().pad_id if pad_id is None else pad_id
    was_training = model.training
    model.eval()
    try:
        with _recording_gates(model) as records:
            model(get_backend().asarray(ids))
    finally:
        model.train(was_training)
    batch, length = ids.shape
    experts = [_host(r.indices).reshape(batch, length, -1) for _, r in records]
    weights = [_host(r.weights).reshape(batch, length, -1) for _, r in records]
    scores = [_host(r.scores).reshape(batch, length, -1) for _, r in records]
    inputs = [x.data.reshape(batch, length, -1) for x, _ in records]
    return Routes(experts, weights, scores, ids != pad_id, inputs)


# ==============================================================================================================
# tables and information
# ==============================================================================================================

def contingency(labels, experts, n_categories, n_experts, weights=None):
    """counts (C, E): counts[c, e] = Σ over tokens t with labels[t] = c and slots k of [experts[t, k] = e],
    each term multiplied by weights[t, k] when weights are given. Tokens labelled −1 are left out.
    labels (...,) int, experts and weights (..., K)."""
    labels, experts = np.asarray(labels), np.asarray(experts)
    if experts.shape[:-1] != labels.shape:
        raise ValueError(f"contingency: experts {experts.shape} must be labels {labels.shape} + (K,)")
    keep = labels >= 0
    cells = labels[keep][:, None] * n_experts + experts[keep]  # (N, K) flat (category, expert) index
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[keep].reshape(-1)
    return np.bincount(cells.reshape(-1), w, minlength=n_categories * n_experts).reshape(n_categories, n_experts)


def _plogp(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0)


def entropy_bits(p, axis=-1):
    """H = −Σ p log₂ p along `axis` (p need not be normalised: it is divided by its sum)."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum(axis=axis, keepdims=True)
    return -_plogp(p).sum(axis=axis)


def mutual_information_bits(counts):
    """I(C; E) = H(C) + H(E) − H(C, E) in bits, of a table counts (..., C, E) (stacks allowed)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / counts.sum(axis=(-2, -1), keepdims=True)
    joint = -_plogp(p).sum(axis=(-2, -1))
    return entropy_bits(p.sum(axis=-1)) + entropy_bits(p.sum(axis=-2)) - joint


def uncertainty_coefficient(counts):
    """U(C|E) = I(C; E) / H(C) of a table counts (..., C, E): the module docstring says why this one.
    0 where the table has a single category (H(C) = 0: there is nothing to explain)."""
    counts = np.asarray(counts, dtype=np.float64)
    h_c = entropy_bits(counts.sum(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(h_c > 0, mutual_information_bits(counts) / np.where(h_c > 0, h_c, 1), 0.0)


def shuffled_null(labels, experts, n_categories, n_experts, n_shuffles=20, seed=0, strata=None):
    """U(C|E) of `n_shuffles` tables in which each labelled token's set of K experts was handed to a random other
    labelled token (one permutation per shuffle): category sizes, expert loads and the K-sets are kept exactly,
    any link between category and expert is gone. Returns (n_shuffles,) floats.

    strata (same shape as labels, ints): shuffle only among tokens of the same stratum. With the token ids as
    strata, the link between a token's *identity* and its experts survives, and only what the category says
    beyond the identity is broken: is "a digit that is a carry" routed differently from the same digit elsewhere?"""
    labels, experts = np.asarray(labels), np.asarray(experts)
    keep = labels >= 0
    categories, chosen = labels[keep], experts[keep]  # (N,), (N, K)
    n = categories.shape[0]
    group = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata)[keep]
    rng = np.random.default_rng(seed)
    by_group = np.argsort(group, kind="stable")  # (N,) the tokens grouped by stratum
    # Per shuffle, the same grouping with a random order inside each group: token by_group[i] takes the experts
    # of token shuffled[s, i], which is in the same stratum.
    shuffled = np.lexsort((rng.random((n_shuffles, n)), np.broadcast_to(group, (n_shuffles, n))), axis=-1)  # (S, N)
    order = np.empty_like(shuffled)
    order[:, by_group] = shuffled
    shuffle = np.arange(n_shuffles)[:, None, None]
    cells = (shuffle * n_categories + categories[None, :, None]) * n_experts + chosen[order]  # (S, N, K)
    counts = np.bincount(cells.reshape(-1), minlength=n_shuffles * n_categories * n_experts)
    return uncertainty_coefficient(counts.reshape(n_shuffles, n_categories, n_experts))


def specialisation(routes, categories, ids=None, n_shuffles=20, seed=0):
    """{labelling: [per MoE layer: {"U", "mi_bits", "H_C", "null_mean", "null_std", "excess", "z", "tokens"}]}.

    null_mean, null_std: the shuffled null (`shuffled_null`); excess = U − null_mean, z = excess / null_std.
    With the token ids given, also "same_token_null_mean", "same_token_null_std" and "same_token_excess": the
    null that shuffles only among tokens with the same id, so the excess is what the category tells about the
    expert beyond the token's identity."""
    report = {}
    for name, labelling in categories.items():
        labels, n_categories = labelling.labels, len(labelling.names)
        layers = []
        for layer, experts in enumerate(routes.experts):
            n_experts = routes.scores[layer].shape[-1]
            counts = contingency(labels, experts, n_categories, n_experts)
            u = float(uncertainty_coefficient(counts))
            null = shuffled_null(labels, experts, n_categories, n_experts, n_shuffles, seed + layer)
            mean, spread = float(null.mean()), float(null.std(ddof=1)) if n_shuffles > 1 else float("nan")
            row = {"U": u, "mi_bits": float(mutual_information_bits(counts)),
                   "H_C": float(entropy_bits(counts.sum(axis=-1))), "null_mean": mean, "null_std": spread,
                   "excess": u - mean, "z": (u - mean) / spread if spread > 0 else float("inf"),
                   "tokens": int((labels >= 0).sum())}
            if ids is not None:
                same = shuffled_null(labels, experts, n_categories, n_experts, n_shuffles, seed + layer, strata=ids)
                row.update(same_token_null_mean=float(same.mean()),
                           same_token_null_std=float(same.std(ddof=1)) if n_shuffles > 1 else float("nan"),
                           same_token_excess=u - float(same.mean()))
            layers.append(row)
        report[name] = layers
    return report


def specialists(counts, names):
    """Per category with tokens: the expert it is sent to most often, relative to that expert's share of all
    traffic. A list of {"category", "expert", "share" p(e|c), "lift" p(e|c)/p(e), "purity" p(c|e), "tokens"},
    most lifted first. counts (C, E) from `contingency`."""
    counts = np.asarray(counts, dtype=np.float64)
    p_e = counts.sum(axis=0) / counts.sum()  # (E,)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-300)  # (C, E) p(e|c)
    purity = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1e-300)  # (C, E) p(c|e)
    lift = np.divide(share, p_e, out=np.zeros_like(share), where=p_e > 0)
    best = lift.argmax(axis=1)
    rows = [{"category": names[c], "expert": int(best[c]), "share": float(share[c, best[c]]),
             "lift": float(lift[c, best[c]]), "purity": float(purity[c, best[c]]), "tokens": float(counts[c].sum())}
            for c in np.flatnonzero(counts.sum(axis=1) > 0)]
    return sorted(rows, key=lambda row: -row["lift"])


# ==============================================================================================================
# interventions: the balancing bias, ablation
# ==============================================================================================================

@contextlib.contextmanager
def gate_bias(model, biases):
    """Within the block, MoE layer i's gate selects with the bias biases[i] ((E,) host or backend array, or None
    for no bias at all) instead of its own; layers not in `biases` keep theirs. The bias changes which experts
    are chosen, never their weights (see Gate). The gates' own bias arrays are restored untouched on exit."""
    gates = [moe.gate for moe in model.moe_layers()]
    for i in biases:
        if not 0 <= i < len(gates):
            raise ValueError(f"gate_bias: MoE layer {i} does not exist (the model has {len(gates)} MoE layers)")
    saved = {i: gates[i].bias for i in biases}
    try:
        for i, bias in biases.items():
            if bias is not None:
                xp = get_array_module(gates[i].weight.data)
                bias = xp.asarray(bias, dtype=gates[i].weight.dtype)
                if bias.shape != (gates[i].n_routed_experts,):
                    raise ValueError(f"gate_bias: layer {i} needs a bias of shape ({gates[i].n_routed_experts},), "
                                     f"got {bias.shape}")
            gates[i].bias = bias
        yield
    finally:
        for i, bias in saved.items():
            gates[i].bias = bias


@contextlib.contextmanager
def experts_disabled(model, disabled):
    """Within the block the router never picks the experts disabled[i] (a list of expert indices) of MoE layer
    i: their selection bias is −∞, so each token takes its next-best expert instead. Nothing else changes."""
    biases = {}
    for i, experts in disabled.items():
        gate = model.moe_layers()[i].gate
        bias = np.zeros(gate.n_routed_experts) if gate.bias is None else _host(gate.bias).astype(np.float64)
        bias[list(experts)] = -np.inf
        if np.isinf(bias).sum() > gate.n_routed_experts - gate.top_k:
            raise ValueError(f"experts_disabled: layer {i} must keep at least top_k={gate.top_k} experts")
        biases[i] = bias
    with gate_bias(model, biases):
        yield


@no_grad()
def token_losses(model, ids):
    """(B, T−1) host array: −log p(ids[t+1] | ids[≤ t]) under `model` in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        logprobs, _ = token_logprobs(model, get_backend().asarray(np.asarray(ids)))
    finally:
        model.train(was_training)
    return -_host(logprobs)


# ==============================================================================================================
# redundancy
# ==============================================================================================================

@no_grad()
def expert_output_similarity(model, routes):
    """Per MoE layer, the (E, E) cosine similarity between the experts' outputs when every expert is run on all
    the layer's (real) input tokens: cos(e, f) = ⟨y_e, y_f⟩ / (‖y_e‖ ‖y_f‖), y_e the (N·dim) stack of expert e's
    outputs, computed in float64. Redundant experts compute similar functions and score near 1; specialised ones
    near 0."""
    mask = routes.mask.reshape(-1)
    result = []
    for moe, x in zip(model.moe_layers(), routes.inputs):
        tokens = Tensor(x.reshape(-1, x.shape[-1])[get_backend().asarray(np.flatnonzero(mask))])  # (N, dim)
        outputs = np.stack([_host(expert(tokens).data).reshape(-1) for expert in moe.experts])  # (E, N·dim)
        outputs = outputs.astype(np.float64)
        unit = outputs / np.maximum(np.linalg.norm(outputs, axis=1, keepdims=True), 1e-300)
        result.append(unit @ unit.T)
    return result


# ==============================================================================================================
# pictures and the explorer
# ==============================================================================================================

def routing_figure(model, prompt, layer=0, use_bias=True, tokenizer=None, axes=None):
    """A heatmap of one sequence's routing in one MoE layer: experts (rows) × tokens (columns), each cell the
    combine weight g of that expert for that token (blank where it was not chosen). `use_bias=False` routes
    without the gate's balancing bias. Returns the matplotlib Figure (drawn with the Figure API, no display)."""
    from matplotlib.figure import Figure

    tokenizer = tokenizer or Tokenizer()
    ids = np.array([tokenizer.encode(prompt)])
    n_layers = len(model.moe_layers())
    if not 0 <= layer < n_layers:
        raise ValueError(f"routing_figure: layer {layer} does not exist (the model has {n_layers} MoE layers)")
    with gate_bias(model, {} if use_bias else {layer: None}):
        routes = route(model, ids, tokenizer.pad_id)
    experts, weights = routes.experts[layer][0], routes.weights[layer][0]  # (T, K)
    n_experts = routes.scores[layer].shape[-1]
    grid = np.full((n_experts, ids.shape[1]), np.nan)
    grid[experts, np.arange(ids.shape[1])[:, None]] = weights  # (E, T)
    if axes is None:
        figure = Figure(figsize=(max(6.0, 0.28 * ids.shape[1] + 1.5), 0.28 * n_experts + 1.6))
        axes = figure.subplots()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    labels = [tokenizer.tokens[i].replace("answer", "ans").replace("think", "thk").replace(" ", "␣") for i in ids[0]]
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axes.set_yticks(range(n_experts))
    axes.set(ylabel="expert", title=f"MoE layer {layer}: combine weight of each chosen expert"
                                    f"{'' if use_bias else ' (balancing bias off)'}")
    axes.figure.colorbar(image, ax=axes, fraction=0.03)
    axes.figure.tight_layout()
    return axes.figure


def _in_kernel():
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def routing_explorer(model, prompt="<bos>347+589=<think>7+9=16 4+8+1=13 3+5+1=9</think><answer>936</answer><eos>",
                     tokenizer=None, interactive=None):
    """Type a prompt, pick a layer, switch the balancing bias on and off, and watch each token's experts move.

    interactive=None decides by itself: an ipywidgets view when running in a Jupyter kernel with ipywidgets
    installed (its first picture is drawn at once, so a notebook run without a front end still executes it), and
    otherwise static figures, one per MoE layer with and without the bias. Returns the widget, or the list of
    static Figures."""
    tokenizer = tokenizer or Tokenizer()
    n_layers = len(model.moe_layers())
    if interactive is None:
        try:
            import ipywidgets  # noqa: F401
            interactive = _in_kernel()
        except ImportError:
            interactive = False
    if not interactive:
        return [routing_figure(model, prompt, layer, use_bias, tokenizer)
                for layer in range(n_layers) for use_bias in (True, False)]

    import ipywidgets as widgets
    from IPython.display import display

    text = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="95%"))
    layer = widgets.Dropdown(options=list(range(n_layers)), value=0, description="MoE layer")
    use_bias = widgets.Checkbox(value=True, description="balancing bias")
    output = widgets.Output()

    def redraw(_=None):
        output.clear_output(wait=True)
        with output:
            try:
                display(routing_figure(model, text.value, layer.value, use_bias.value, tokenizer))
            except ValueError as error:  # a character outside the vocabulary, say: show it, keep the view alive
                print(error)

    for control in (text, layer, use_bias):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([text, widgets.HBox([layer, use_bias]), output])
