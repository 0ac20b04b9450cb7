"""Speculative decoding with the multi-token prediction modules as the draft (DeepSeek-V3 report §5.4.3;
the acceptance rule of Leviathan et al. 2023 and Chen et al. 2023).

One step, for every sequence of the batch at once:

    draft      module k reads h^{k−1} at the position before the last committed token and the embedding of the
               token after it (the last committed token for k = 1, then draft k−1): its logits propose draft k.
    verify     ONE forward pass of the main model over [last token, draft 1 … draft D] gives its own distribution
               p at every drafted position (and one position further).
    accept     greedy: keep the drafts while each is the main model's argmax. Sampling: keep draft x (drawn from
               the draft's q) with probability min(1, p(x)/q(x)); at the first rejection draw the replacement from
               norm(max(0, p − q)). Either way the main model adds one token of its own (the correction, or a bonus
               after all D drafts were kept): 1 … D+1 tokens per step, and every token is distributed exactly as
               in plain decoding — greedy output is plain greedy output, token for token.
    roll back  the key/value (or MLA latent) caches forget the rejected positions: a cache's `length` goes back,
               and the next write overwrites what lay beyond it.

Batched, each sequence keeps its own number of tokens, but the caches hold one length for the whole batch. So the
batch decodes from the slowest sequence's position: a verification block starts there, and a sequence that is
further ahead re-feeds its tokens past that point (recomputing keys and values it had already cached) before its
drafts. Within a row, positions past its own drafts are computed and ignored (causal attention keeps them from
changing anything before them), then rolled back. This costs compute when sequences drift apart: the price of
keeping every array rectangular.

Module k's cache keeps the positions whose inputs are all committed tokens (position i reads token i + k); later
ones depend on this step's drafts and are recomputed at the next draft.
"""

from dataclasses import dataclass

from .autograd import Tensor, no_grad
from .backend import backend_of, device_rng, get_array_module
from .generate import Generation, _softmax, check_sampling, filter_logits, prompt_shape

__all__ = ["SpeculativeGeneration", "speculative_generate"]


@dataclass
class SpeculativeGeneration(Generation):
    """What `speculative_generate` returns: `Generation`'s fields, and how the drafts fared (backend arrays):

    drafted           -- (B,) drafts that were verified, per sequence, up to its EOS
    accepted          -- (B,) of those, the ones kept
    drafted_by_depth  -- (D,) verified drafts made by module k (index k − 1)
    accepted_by_depth -- (D,) of those, the ones kept
    steps             -- verification passes of the main model (a Python int; plain decoding makes one per token)
    """

    drafted: object = None
    accepted: object = None
    drafted_by_depth: object = None
    accepted_by_depth: object = None
    steps: int = 0

    @property
    def acceptance_rate(self):
        """Share of the verified drafts that were kept (a host float)."""
        backend = backend_of(self.accepted)
        return float(backend.to_numpy(self.accepted.sum())) / max(float(backend.to_numpy(self.drafted.sum())), 1.0)


def _draw(probabilities, generator):
    """One index per row of probabilities (B, V) (rows need not be normalised): inverse-CDF sampling."""
    xp = get_array_module(probabilities)
    cdf = xp.cumsum(probabilities, axis=-1)  # (B, V)
    u = generator.random((probabilities.shape[0], 1), dtype=cdf.dtype) * cdf[:, -1:]
    return xp.minimum((cdf < u).sum(axis=-1), probabilities.shape[-1] - 1)


def _gather(array, index):
    """array (B, L, ...) at one or several positions per row: index (B,) -> (B, ...), (B, J) -> (B, J, ...)."""
    xp = get_array_module(array)
    single = index.ndim == 1
    index = index[:, None] if single else index
    picked = xp.take_along_axis(array, index.reshape(index.shape + (1,) * (array.ndim - 2)), axis=1)
    return picked[:, 0] if single else picked


def _rewind(caches, length):
    """Roll caches back to their first `length` positions: the next write starts there and overwrites the rest."""
    for cache in caches:
        cache.length = length


@no_grad()
def speculative_generate(model, prompt_ids, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None,
                         top_p=None, greedy=False, generator=None):
    """`generate` with the model's MTP modules drafting D tokens per step and one forward pass of the main model
    checking them (see the module docstring). Same arguments and output as `generate`, plus the draft statistics;
    greedy output equals plain greedy decoding's, sampled output follows the main model's distribution."""
    depth = model.config.n_mtp_modules
    if depth < 1:
        raise ValueError("speculative decoding drafts with the multi-token prediction modules, and this model has "
                         "none (n_mtp_modules=0; a checkpoint trained without MTP has no draft weights): train with "
                         "ModelConfig(n_mtp_modules=1) or decode without speculative=True")
    check_sampling("generate", temperature, top_k, top_p, greedy, max_new_tokens)
    prompt_ids, batch, prompt_length, total = prompt_shape(model, prompt_ids, max_new_tokens)
    xp = get_array_module(prompt_ids)
    backend = backend_of(prompt_ids)
    generator = generator or device_rng(backend)
    was_training = model.training
    model.eval()

    def target(logits):
        """What acceptance compares against: logits when greedy (only their argmax matters), else the sampling
        distribution softmax(filter(logits / T)), exactly as `sample_next` draws from it. logits: (..., V)."""
        if greedy:
            return logits
        rows_of_logits = logits.reshape(-1, logits.shape[-1])  # (·, V): the filters work on rows
        return _softmax(filter_logits(rows_of_logits / temperature, top_k, top_p)).reshape(logits.shape)

    tokens = xp.full((batch, total + depth), pad_id, dtype=prompt_ids.dtype)  # room for drafts past the end
    tokens[:, :prompt_length] = prompt_ids
    rows = xp.arange(batch)
    committed = xp.full(batch, prompt_length, dtype="int64")  # tokens each sequence has for sure
    finished = xp.zeros(batch, dtype=bool)
    main_caches, mtp_caches = model.new_caches(batch, total), model.new_mtp_caches(batch, total)
    hidden = None  # h⁰ … h^{D−1} (B, total, dim): what module k reads, kept for the positions still needed
    mtp_cached = [0] * depth  # how many positions module k's cache holds
    drafted, accepted_total = xp.zeros(batch, dtype="int64"), xp.zeros(batch, dtype="int64")
    drafted_by_depth, accepted_by_depth = xp.zeros(depth, dtype="int64"), xp.zeros(depth, dtype="int64")
    n_drafts, cached, lowest, highest, steps = 0, 0, prompt_length, prompt_length, 0
    draft_q = None  # (B, D, V) the draft distributions (sampling)
    while True:
        # ---- verify: one pass over positions cached .. end−1 (the first pass is the prefill) -----------------
        end = min(highest + n_drafts, total)
        h = model.hidden_states(tokens[:, cached:end], start_pos=cached, caches=main_caches)  # (B, L, dim)
        logits = model.output(h).data  # (B, L, V)
        if hidden is None:
            hidden = [xp.zeros((batch, total, model.config.dim), dtype=h.dtype) for _ in range(depth)]
        hidden[0][:, cached:end] = h.data
        steps += 1
        offsets = xp.arange(n_drafts + 1)
        judged_at = committed[:, None] - 1 + offsets  # (B, n_drafts + 1): position j judges the token at j + 1
        p = target(_gather(logits, xp.minimum(judged_at, end - 1) - cached))  # (B, n_drafts + 1, V)
        accepted = xp.zeros(batch, dtype="int64")
        if n_drafts:
            proposed = tokens[rows[:, None], judged_at[:, :-1] + 1]  # (B, n_drafts)
            verifiable = (judged_at[:, :-1] + 1 < end) & ~finished[:, None]  # fed in this block, and still wanted
            if greedy:
                keep = proposed == p[:, :-1].argmax(axis=-1)
            else:
                p_x = xp.take_along_axis(p[:, :-1], proposed[..., None], axis=-1)[..., 0]  # (B, n_drafts)
                q_x = xp.take_along_axis(draft_q, proposed[..., None], axis=-1)[..., 0]
                keep = generator.random(p_x.shape, dtype=p_x.dtype) * q_x < p_x  # probability min(1, p/q)
            kept = xp.cumprod(keep & verifiable, axis=1)  # (B, n_drafts): 1 up to the first miss
            accepted = kept.sum(axis=1)
            drafted, accepted_total = drafted + verifiable.sum(axis=1), accepted_total + accepted
            drafted_by_depth = drafted_by_depth + verifiable.sum(axis=0)
            accepted_by_depth = accepted_by_depth + kept.sum(axis=0)
        # ---- the main model's own token after the kept drafts -----------------------------------------------
        p_next = _gather(p, accepted)  # (B, V)
        if greedy:
            own = p_next.argmax(axis=-1)
        elif n_drafts:
            first_miss = xp.minimum(accepted, n_drafts - 1)
            rejected = (accepted < n_drafts) & _gather(verifiable, first_miss)  # a draft was refused there
            residual = xp.maximum(p_next - _gather(draft_q, first_miss), 0)  # norm(max(0, p − q))
            own = _draw(xp.where(rejected[:, None], residual, p_next), generator)
        else:
            own = _draw(p_next, generator)
        new_at = committed[:, None] + offsets  # (B, n_drafts + 1): where this step's tokens go
        tokens[rows, committed + accepted] = own
        is_new = (offsets < (accepted + 1)[:, None]) & (new_at < total)
        news = tokens[rows[:, None], xp.minimum(new_at, total - 1)]  # (B, n_drafts + 1)
        finished = finished | ((news == eos_id) & is_new).any(axis=1)
        committed = xp.minimum(committed + accepted + 1, total)
        # a finished sequence's tokens are discarded: let it run level with the leader, not hold the batch back
        committed = xp.where(finished, committed.max(), committed)
        bounds = backend.to_numpy(xp.stack([committed.min(), committed.max(), finished.all().astype("int64")]))
        lowest, highest, all_finished = (int(value) for value in bounds)  # the one host read per step
        cached = lowest - 1  # every sequence has fed its committed tokens before this position
        _rewind(main_caches, cached)
        if lowest >= total or all_finished:
            break
        # ---- draft: module k at each sequence's position committed − 2 ----------------------------------------
        stop = highest - 1  # the block runs to the furthest sequence's drafting position
        drafting_at = committed - 2  # (B,)
        qs = []
        for k, module in enumerate(model.mtp, start=1):
            start = mtp_cached[k - 1]
            h = module(Tensor(hidden[k - 1][:, start:stop]), model.embed(tokens[:, start + k:stop + k]),
                       start_pos=start, cache=mtp_caches[k - 1])  # (B, L, dim)
            if k < depth:
                hidden[k][:, start:stop] = h.data
            draft_logits = model.head(module.norm(Tensor(_gather(h.data, drafting_at - start)))).data  # (B, V)
            if greedy:
                draft = draft_logits.argmax(axis=-1)
            else:
                qs.append(target(draft_logits))
                draft = _draw(qs[-1], generator)
            tokens[rows, committed - 1 + k] = draft
            mtp_cached[k - 1] = max(lowest - k, 0)  # position i reads token i + k: committed for every sequence
            _rewind([mtp_caches[k - 1]], mtp_cached[k - 1])
        draft_q = None if greedy else xp.stack(qs, axis=1)  # (B, D, V)
        n_drafts = depth
    model.train(was_training)

    responses = tokens[:, prompt_length:total]  # (B, N)
    step = xp.arange(max_new_tokens)
    is_eos = responses == eos_id
    stopped = is_eos.any(axis=1)
    lengths = ((xp.cumsum(is_eos, axis=1) - is_eos) == 0).sum(axis=1).astype(prompt_ids.dtype)  # up to the 1st EOS
    responses = xp.where(step[None] < lengths[:, None], responses, pad_id).astype(prompt_ids.dtype)
    tokens = xp.concatenate([prompt_ids, responses], axis=1)
    return SpeculativeGeneration(tokens, responses, lengths, stopped, drafted, accepted_total, drafted_by_depth,
                                 accepted_by_depth, steps)
