"""Look inside a trained model on the worked solutions of 3-digit addition: which tokens it gets wrong, and where
its heads look when a digit must be copied. Lesson 08 (section 8) uses it to compare a good and a slow MLA base;
`python -m benchmarks.mla_probe` runs it over many checkpoints and adds a GRPO measurement.

1. roles    next-token loss per token *role*. Every completion token of a worked solution gets a role from the
            task's own rendering (`AdditionTask._columns`, then the text `AdditionTask._write` makes of them):
                <think>7+9=16 4+8+1=13 3+5+1=9</think><answer>936</answer><eos>
            "a digit"/"b digit" (the column's operand digits, copied from the prompt), "+", "carry? (+ or =)"
            (the token after b: "+" when a carry comes in, "=" when not), "carry 1" and "= after +1" (the rest of
            "+1="), "sum digit 1"/"sum digit 2" (the column sum), "space"/"</think>" (after a column), and in the
            answer "answer digit", each by the column whose sum it is read from; the operand and answer digits
            are also split by column (col 0 = units). For the answer digits also: does the answer follow an
            edit of the sum digit in <think> (edited_source), and how far off are its wrong digits (misses).
2. lookup   attention mass on the one token a digit must be copied from: for an operand digit, its place in the
            prompt; for an answer digit, the matching sum digit in <think>. Per layer and head, at the query that
            predicts the digit (the token before it). For MLA, each score q·k/√d is the sum of a content part
            q_nope·k_nope/√d and a position part q_pe·k_pe/√d (the decoupled RoPE key); at the head that looks
            up most, the spread of each part across the visible keys, its share of the source's lead over the
            other keys, and the role's loss when that head attends by one part alone (the other made the same
            for every key).

The measurements run on the held-out worked solutions behind the "loss: worked" of lesson 08's table
(minimoe.train.heldout_loss with `mix={"worked": 1}`: 256 test problems, seed 12345). This is analysis: it copies
the model's activations to the host (NumPy) on purpose, and runs the attention layers' pieces itself.
"""

import numpy as np

from minimoe import functional as F
from minimoe.autograd import Tensor, no_grad
from minimoe.backend import to_host
from minimoe.nn.attention import MHA
from minimoe.rewards import ANSWER, ANSWER_END, EOS, THINK, THINK_END
from minimoe.tasks import build_corpus
from minimoe.train import IGNORE, lm_batch

HELDOUT_SEED, HELDOUT_PROBLEMS = 12345, 256  # minimoe.train.heldout_loss's batch, worked solutions only
COLUMN_ROLES = ("a digit", "b digit", "carry? (+ or =)", "sum digit 1", "answer digit")  # also split by column
OFFSETS = (0, 1, 2, 3)  # keys at and after the source through which a head may read it (lookup_mass)
ROLES = ("<think>", "a digit", "+", "b digit", "carry? (+ or =)", "carry 1", "= after +1", "sum digit 1",
         "sum digit 2", "space", "</think>", "<answer>", "answer digit", "</answer>", "<eos>")


# ---------------------------------------------------------------------------------------------------------
# 1. Roles of the tokens of a worked solution


def label_worked(task, problem, tokenizer):
    """The completion of `problem`'s worked solution, token by token: (tokens, roles, columns, sources).

    roles   -- the role of each completion token (one of ROLES)
    columns -- the column (0 = units) a column token belongs to or an answer digit is read from; -1 if none
    sources -- for a copied digit, the position in the whole sequence "<bos>" + prompt + completion of the token
               it is copied from (operand digit: the prompt; answer digit: the sum digit in <think>); -1 if none
    The pieces follow AdditionTask._write exactly, and the joined text is checked against task.solution."""
    digits = task.digits
    prompt_length = len(tokenizer.encode("<bos>" + problem.prompt))  # "<bos>" a_(D-1)…a_0 "+" b_(D-1)…b_0 "="
    pieces = [(THINK, "<think>", -1, -1)]  # (text, role, column, source)
    columns = task._columns(problem)  # (x, y, carry_in, sum) per column, units first
    sum_positions = []  # per column: the sequence positions of its sum digits
    for column, (x, y, carry, total) in enumerate(columns):
        if column:
            pieces.append((" ", "space", -1, -1))
        pieces += [(x, "a digit", column, digits - column), ("+", "+", -1, -1),
                   (y, "b digit", column, 2 * digits + 1 - column)]
        pieces += [("+", "carry? (+ or =)", column, -1), ("1", "carry 1", -1, -1), ("=", "= after +1", -1, -1)] \
            if carry else [("=", "carry? (+ or =)", column, -1)]
        start = prompt_length + len(pieces)  # every piece so far is one token
        sum_positions.append([start + i for i in range(len(str(total)))])
        pieces += [(digit, f"sum digit {i + 1}", column, -1) for i, digit in enumerate(str(total))]
    pieces += [(THINK_END, "</think>", -1, -1), (ANSWER, "<answer>", -1, -1)]
    last = len(columns) - 1  # the answer: the last column's whole sum, then the other columns' units digits
    pieces += [(digit, "answer digit", last, sum_positions[last][i]) for i, digit in enumerate(str(columns[-1][3]))]
    pieces += [(str(columns[c][3] % 10), "answer digit", c, sum_positions[c][-1]) for c in reversed(range(last))]
    pieces += [(ANSWER_END, "</answer>", -1, -1), (EOS, "<eos>", -1, -1)]
    text = "".join(p[0] for p in pieces)
    if text != task.solution(problem, "worked") + EOS:
        raise AssertionError(f"label_worked: the pieces {text!r} differ from the task's {task.solution(problem)!r}")
    tokens = tokenizer.encode(text)
    if len(tokens) != len(pieces):
        raise AssertionError(f"label_worked: {len(pieces)} pieces but {len(tokens)} tokens in {text!r}")
    return tokens, [p[1] for p in pieces], [p[2] for p in pieces], [p[3] for p in pieces]


def heldout_worked(task, tokenizer, n=HELDOUT_PROBLEMS, seed=HELDOUT_SEED):
    """The held-out worked solutions and their labels, aligned with lm_batch's inputs and targets:
    {"inputs" (N, T-1), "targets" (N, T-1), "ids" (N, T), "problems", "role" (N, T-1) index into ROLES of the
    *target* token (-1: prompt or padding), "column" (N, T-1), "source" (N, T-1) sequence position the target
    is copied from (-1: none)}."""
    corpus = build_corpus(task, n, np.random.default_rng(seed), {"worked": 1.0}, split="test")
    inputs, targets = (to_host(a) for a in lm_batch(corpus, tokenizer))
    ids = np.concatenate([inputs, np.where(targets[:, -1:] == IGNORE, tokenizer.pad_id, targets[:, -1:])], axis=1)
    role, column, source = (np.full(ids.shape, -1, dtype=np.int64) for _ in range(3))
    for row, problem in enumerate(corpus.problems):  # labelling only: a few dozen tokens per problem
        tokens, roles, columns, sources = label_worked(task, problem, tokenizer)
        start = len(tokenizer.encode(corpus.prompts[row]))
        if list(ids[row, start:start + len(tokens)]) != tokens:
            raise AssertionError(f"heldout_worked: row {row}'s tokens differ from the labelled solution")
        role[row, start:start + len(tokens)] = [ROLES.index(r) for r in roles]
        column[row, start:start + len(tokens)] = columns
        source[row, start:start + len(tokens)] = sources
    return {"inputs": inputs, "targets": targets, "ids": ids, "problems": corpus.problems,
            "role": role[:, 1:], "column": column[:, 1:], "source": source[:, 1:]}


def role_keys(data, digits):
    """(name, (N, T-1) bool mask) for every role, then the column roles split by column."""
    keys = [(name, data["role"] == i) for i, name in enumerate(ROLES)]
    for name in COLUMN_ROLES:
        keys += [(f"{name} · col {c}", (data["role"] == ROLES.index(name)) & (data["column"] == c))
                 for c in range(digits)]
    return [(name, mask) for name, mask in keys if mask.any()]


def token_losses(logits, targets):
    """-log p(target) per position (N, T-1), 0 where the target is IGNORE."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (N, T-1, V)
    picked = np.take_along_axis(log_probs, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]  # (N, T-1)
    return np.where(targets == IGNORE, 0.0, -picked)


# ---------------------------------------------------------------------------------------------------------
# 2. Inside the attention layers


def attention_parts(attn, h):
    """The attention weights of one MHA or MLA layer on its input h (B, T, dim) (the attention norm's output),
    computed from the layer's own sublayers the way its forward does: a dict of host arrays
        "weights"  (B, H, T, T)   softmax(score + causal mask), rows are queries
        "values"   (B, H, T, dv)  what the weights average (per head)
        "content"  (B, H, T, T)   MLA only: q_nope·k_nope / √(dn + dr)
        "position" (B, H, T, T)   MLA only: q_pe·k_pe / √(dn + dr) (RoPE key shared by every head)
    so that score = content + position for MLA."""
    batch, tokens, _ = h.shape
    with no_grad():
        if isinstance(attn, MHA):
            heads = (batch, tokens, attn.n_heads, attn.head_dim)
            q = to_host(attn.rope(attn.wq(h).reshape(heads)).transpose(1, 2).data)  # (B, H, T, D)
            k = to_host(attn.rope(attn.wk(h).reshape(heads)).transpose(1, 2).data)
            values = to_host(attn.wv(h).reshape(heads).transpose(1, 2).data)
            parts = {"score": q @ k.swapaxes(-1, -2) * attn.softmax_scale}
        else:
            if attn.q_lora_rank:
                raise NotImplementedError("attention_parts: MLA with a low-rank query (q_lora_rank > 0)")
            q = attn.wq(h).reshape(batch, tokens, attn.n_heads, attn.qk_head_dim)
            q_nope, q_pe = F.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], axis=-1)
            q_pe = attn.rope(q_pe)
            c_kv, k_pe = F.split(attn.wkv_a(h), [attn.kv_lora_rank, attn.qk_rope_head_dim], axis=-1)
            k_pe = to_host(attn.rope(k_pe).data)  # (B, T, dr)
            kv = attn.wkv_b(attn.kv_norm(c_kv)).reshape(batch, tokens, attn.n_heads, -1).transpose(1, 2)
            kv = to_host(kv.data)  # (B, H, T, dn + dv)
            k_nope, values = kv[..., :attn.qk_nope_head_dim], kv[..., attn.qk_nope_head_dim:]
            content = to_host(q_nope.transpose(1, 2).data) @ k_nope.swapaxes(-1, -2) * attn.softmax_scale
            position = to_host(q_pe.transpose(1, 2).data) @ k_pe[:, None].swapaxes(-1, -2) * attn.softmax_scale
            parts = {"content": content, "position": position, "score": content + position}
    parts.update(weights=causal_softmax(parts.pop("score")), values=values)
    return parts


def causal_softmax(score):
    """softmax over the last axis of score (..., T, T) with the keys after each query masked out."""
    tokens = score.shape[-1]
    score = np.where(np.arange(tokens)[None, :] > np.arange(tokens)[:, None], -np.inf, score)
    weights = np.exp(score - score.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def trace(model, inputs, only=None):
    """Run the model layer by layer on token ids (B, T): (logits (B, T, V), [attention_parts of each layer]).

    only=(layer, head, part), part "content" or "position" (MLA): that head attends with softmax(part + mask)
    alone, as if the other part were the same for every key, and the model runs on from there."""
    with no_grad():
        x = model.embed(inputs)
        layers = []
        for index, layer in enumerate(model.layers):
            layers.append(attention_parts(layer.attn, layer.attn_norm(x)))
            if only is None or only[0] != index:
                x = layer(x)
                continue
            _, head, part = only
            weights = layers[-1]["weights"].copy()
            weights[:, head] = causal_softmax(layers[-1][part][:, head])
            batch, heads, tokens, _ = weights.shape
            attended = (weights @ layers[-1]["values"]).transpose(0, 2, 1, 3).reshape(batch, tokens, -1)
            x = x + layer.attn.wo(Tensor(attended.astype(layers[-1]["values"].dtype)))  # Block.forward, by hand
            x = x + layer.ffn(layer.ffn_norm(x))
        return to_host(model.output(x).data), layers


def lookup_mass(layers, data, role_mask):
    """(L, H, len(OFFSETS)) mean attention weight on the key `offset` tokens after the source, over the tokens in
    role_mask (which must have a source), at the query that predicts them (target position t is predicted at
    query position t). Offset 0 is the source itself; a later key can carry the source's digit when a layer-0
    head has copied it forward, which is how several bases read the answer digits. Keys after the query: 0."""
    rows, queries = np.nonzero(role_mask)
    keys = data["source"][rows, queries][:, None] + np.array(OFFSETS)[None, :]  # (M, O)
    visible = keys <= queries[:, None]
    keys = np.minimum(keys, queries[:, None])
    return np.stack([np.where(visible[:, None], parts["weights"][rows[:, None], :, queries[:, None], keys]
                              .swapaxes(1, 2), 0.0).mean(axis=0) for parts in layers])  # (L, H, O)


def best_reader(mass):
    """(layer, head, offset) of the largest entry of lookup_mass: the head that reads the source, and through
    which key."""
    return tuple(int(i) for i in np.unravel_index(mass.argmax(), mass.shape))


def score_split(parts, data, role_mask, head, offset=0):
    """For an MLA layer's head: how the content and RoPE parts of the score shape its lookup, over the queries
    that predict the tokens of role_mask. Over each query's visible keys (≤ the query): the standard deviation
    of each part, the share of the score's variance each explains (Var(part)/Var(score); the two add to 1
    minus twice their covariance's share), and the lead of the key the head reads through (`offset` tokens after
    the source) over the mean of the other visible keys, which splits exactly into the two parts."""
    rows, queries = np.nonzero(role_mask)
    sources = np.minimum(data["source"][rows, queries] + offset, queries)  # the key the head reads through
    tokens = parts["content"].shape[-1]
    visible = np.arange(tokens)[None, :] <= queries[:, None]  # (M, T)
    others = visible & (np.arange(tokens)[None, :] != sources[:, None])
    out = {}
    for name in ("content", "position"):
        score = parts[name][rows, head, queries]  # (M, T)
        mean = (score * visible).sum(-1) / visible.sum(-1)
        out[f"{name} std"] = np.sqrt(((score - mean[:, None]) ** 2 * visible).sum(-1) / visible.sum(-1))
        out[f"{name} lead"] = score[np.arange(len(rows)), sources] - (score * others).sum(-1) / others.sum(-1)
        out[f"{name} centred"] = np.where(visible, score - mean[:, None], 0.0)
    total_var = ((out["content centred"] + out["position centred"]) ** 2).sum(-1)
    summary = {key: float(out[key].mean()) for key in ("content std", "position std", "content lead",
                                                       "position lead")}
    for name in ("content", "position"):
        summary[f"{name} var share"] = float(((out[f"{name} centred"] ** 2).sum(-1) / total_var).mean())
    return summary


def edited_source(model, data, role_mask, tokenizer, shift=5):
    """Does the model copy the source digit? Replace every source digit of role_mask's tokens by (digit + shift)
    mod 10 in the input and read the prediction at the same queries: mean probability of the edited digit (a
    copy follows it), of its two "neighbours" (edited ± 1) mod 10, and of the original digit (a model that
    recomputes the answer from elsewhere keeps it)."""
    rows, queries = np.nonzero(role_mask)
    sources = data["source"][rows, queries]
    zero = tokenizer.token_to_id["0"]
    inputs = data["inputs"].copy()
    original = inputs[rows, sources] - zero
    edited = (original + shift) % 10
    inputs[rows, sources] = edited + zero
    with no_grad():
        logits = to_host(model(inputs).data)[rows, queries]  # (M, V)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = probs / probs.sum(axis=-1, keepdims=True)

    def mean_probability(*digit_sets):
        return float(sum(probs[np.arange(len(rows)), digits + zero] for digits in digit_sets).mean())

    return {"edited": mean_probability(edited), "true": mean_probability(original),
            "neighbours": mean_probability((edited + 1) % 10, (edited - 1) % 10)}


def misses(logits, data, role_mask, tokenizer):
    """How the most likely digit goes wrong on role_mask's tokens: {"wrong": share of tokens whose argmax is not
    the target, "beside": share of those wrong ones that are the target ± 1 (mod 10; 2 in 9 by chance)}."""
    rows, queries = np.nonzero(role_mask)
    zero = tokenizer.token_to_id["0"]
    predicted = logits[rows, queries, zero:zero + 10].argmax(axis=-1)  # the best digit
    target = data["targets"][rows, queries] - zero
    wrong = predicted != target
    beside = np.isin((predicted - target) % 10, (1, 9))
    return {"wrong": float(wrong.mean()), "beside": float(beside[wrong].mean()) if wrong.any() else float("nan")}


def probe(model, data, digits, tokenizer, ablate=False):
    """Measurements 1 and 2 for one model: {"loss": mean over all completion tokens, "roles": {role: mean loss},
    "lookup": {role: (L, H, offsets) attention mass on the source}, "split": {role: score_split at the MLA head
    that puts most mass on the source} (empty for MHA), "edit" and "misses": {answer digit role: edited_source,
    misses}} (the answer digits of every column but the last). ablate: the split also holds the role's loss when the
    reading head attends by one part alone ("loss, content only", "loss, position only"; two more passes a role)."""
    model.eval()
    logits, layers = trace(model, data["inputs"])
    losses = token_losses(logits, data["targets"])
    counted = data["targets"] != IGNORE
    result = {"loss": float(losses[counted].mean()), "roles": {}, "lookup": {}, "split": {}, "edit": {},
              "misses": {}}
    for name, mask in role_keys(data, digits):
        result["roles"][name] = float(losses[mask].mean())
    for name in ("a digit", "b digit", "answer digit"):
        for key, mask in role_keys(data, digits):
            if not key.startswith(name):
                continue
            mass = lookup_mass(layers, data, mask)
            result["lookup"][key] = mass
            if key.startswith("answer digit ·") and not key.endswith(f"col {digits - 1}"):  # (the last column's
                # sum may be two digits, and "1x" edited to "6x" is no sum at all)
                result["edit"][key] = edited_source(model, data, mask, tokenizer)
                result["misses"][key] = misses(logits, data, mask, tokenizer)
            if "content" in layers[0]:
                layer, head, offset = best_reader(mass)
                result["split"][key] = {"layer": layer, "head": head, "offset": OFFSETS[offset],
                                        **score_split(layers[layer], data, mask, head, OFFSETS[offset])}
                for part in ("content", "position") if ablate else ():  # that head keeping one part only
                    ablated = token_losses(trace(model, data["inputs"], (layer, head, part))[0], data["targets"])
                    result["split"][key][f"loss, {part} only"] = float(ablated[mask].mean())
    return result
