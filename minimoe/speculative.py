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
    rows = get_array_module(array).arange(array.shape[0])  # (B,)
    return array[rows, index] if index.ndim == 1 else array[rows[:, None], index]


def _rewind(caches, length):
    """Roll caches back to their first `length` positions: the next write starts there and overwrites the rest."""
    for cache in caches:
        cache.length = length


class _Speculation:
    """One batched speculative decoding run: its state, and the steps of the algorithm as methods, called in order
    by `speculative_generate` (B sequences, D draft modules, V tokens in the vocabulary, n drafts this step: 0 on
    the first pass, then D).

    tokens     -- (B, total + D) prompt, committed tokens, then this step's drafts (room for drafts past the end)
    committed  -- (B,) tokens each sequence has for sure
    finished   -- (B,) True once the sequence emitted EOS
    cached     -- positions the main model's caches hold (a host int: one length for the whole batch)
    hidden     -- D arrays (B, total, dim): h⁰ … h^{D−1}, what module k reads, kept for the positions still needed
    draft_q    -- (B, D, V) the distributions the drafts were drawn from (sampling; None when greedy)
    """

    def __init__(self, model, prompt_ids, total, eos_id, pad_id, temperature, top_k, top_p, greedy, generator):
        xp, batch, prompt_length = get_array_module(prompt_ids), prompt_ids.shape[0], prompt_ids.shape[1]
        self.model, self.xp, self.backend, self.depth = model, xp, backend_of(prompt_ids), model.config.n_mtp_modules
        self.total, self.eos_id, self.greedy = total, eos_id, greedy
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = generator or device_rng(self.backend)
        self.tokens = xp.full((batch, total + self.depth), pad_id, dtype=prompt_ids.dtype)
        self.tokens[:, :prompt_length] = prompt_ids
        self.rows = xp.arange(batch)
        self.committed = xp.full(batch, prompt_length, dtype="int64")
        self.finished = xp.zeros(batch, dtype=bool)
        self.main_caches, self.mtp_caches = model.new_caches(batch, total), model.new_mtp_caches(batch, total)
        self.hidden = None  # allocated at the first pass, in the dtype of the model's hidden states
        self.mtp_cached = [0] * self.depth  # how many positions module k's cache holds
        self.drafted, self.accepted = xp.zeros(batch, dtype="int64"), xp.zeros(batch, dtype="int64")
        self.drafted_by_depth, self.accepted_by_depth = xp.zeros(self.depth, "int64"), xp.zeros(self.depth, "int64")
        self.n_drafts, self.cached, self.lowest, self.highest, self.steps = 0, 0, prompt_length, prompt_length, 0
        self.draft_q = None

    def target(self, logits):
        """What acceptance compares against: logits when greedy (only their argmax matters), else the sampling
        distribution softmax(filter(logits / T)), exactly as `sample_next` draws from it. logits: (..., V)."""
        if self.greedy:
            return logits
        rows_of_logits = logits.reshape(-1, logits.shape[-1])  # (·, V): the filters work on rows
        filtered = filter_logits(rows_of_logits / self.temperature, self.top_k, self.top_p)
        return _softmax(filtered).reshape(logits.shape)

    def verify(self):
        """ONE pass of the main model over positions cached … end − 1 (the first pass is the prefill) gives its
        distribution p at every sequence's positions committed − 1 … committed − 1 + n: position j judges the token
        at j + 1, so p[:, i] judges draft i + 1 and p[:, n] is the bonus position after the last draft.
        Returns p (B, n + 1, V), those positions judged_at (B, n + 1), and end (a host int)."""
        xp, end = self.xp, min(self.highest + self.n_drafts, self.total)
        h = self.model.hidden_states(self.tokens[:, self.cached:end], start_pos=self.cached,
                                     caches=self.main_caches).data  # (B, L, dim), L = end − cached
        if self.hidden is None:
            self.hidden = [xp.zeros((len(self.rows), self.total, self.model.config.dim), dtype=h.dtype)
                           for _ in range(self.depth)]
        self.hidden[0][:, self.cached:end] = h
        self.steps += 1
        judged_at = self.committed[:, None] - 1 + xp.arange(self.n_drafts + 1)  # (B, n + 1)
        # the head only where a judgement is needed, not over the whole prompt or re-fed positions
        judging = Tensor(_gather(h, xp.minimum(judged_at, end - 1) - self.cached))  # (B, n + 1, dim)
        p = self.target(self.model.output(judging).data)  # (B, n + 1, V)
        return p, judged_at, end

    def accept(self, p, judged_at, end):
        """Keep each sequence's drafts up to its first refusal. Greedy: draft x is kept when x = argmax p. Sampling
        (x was drawn from q): kept with probability min(1, p(x)/q(x)), i.e. when u·q(x) < p(x), u ~ U[0, 1).
        A draft counts only if this pass fed it (it lies before end) and its sequence has not finished.
        Returns accepted (B,), the drafts kept, and verifiable (B, n) (None before the first drafts)."""
        xp = self.xp
        if not self.n_drafts:
            return xp.zeros(len(self.rows), dtype="int64"), None
        proposed = self.tokens[self.rows[:, None], judged_at[:, :-1] + 1]  # (B, n)
        verifiable = (judged_at[:, :-1] + 1 < end) & ~self.finished[:, None]  # (B, n)
        if self.greedy:
            keep = proposed == p[:, :-1].argmax(axis=-1)
        else:
            p_x = xp.take_along_axis(p[:, :-1], proposed[..., None], axis=-1)[..., 0]  # (B, n)
            q_x = xp.take_along_axis(self.draft_q, proposed[..., None], axis=-1)[..., 0]  # (B, n)
            keep = self.generator.random(p_x.shape, dtype=p_x.dtype) * q_x < p_x  # probability min(1, p/q)
        kept = xp.cumprod(keep & verifiable, axis=1)  # (B, n): 1 up to the first miss
        accepted = kept.sum(axis=1)  # (B,)
        self.drafted, self.accepted = self.drafted + verifiable.sum(axis=1), self.accepted + accepted
        self.drafted_by_depth = self.drafted_by_depth + verifiable.sum(axis=0)
        self.accepted_by_depth = self.accepted_by_depth + kept.sum(axis=0)
        return accepted, verifiable

    def main_token(self, p, accepted, verifiable):
        """The main model's own token after the kept drafts, from p_next = p at position committed − 1 + accepted:
        greedy, argmax p_next; sampling, a draw from p_next, or from norm(max(0, p_next − q)) where a draft was
        refused there — the correction that makes every token distributed as in plain decoding. Returns (B,)."""
        xp, n = self.xp, self.n_drafts
        p_next = _gather(p, accepted)  # (B, V)
        if self.greedy:
            return p_next.argmax(axis=-1)
        if n:
            first_miss = xp.minimum(accepted, n - 1)  # (B,)
            rejected = (accepted < n) & _gather(verifiable, first_miss)  # (B,) a draft was refused there
            residual = xp.maximum(p_next - _gather(self.draft_q, first_miss), 0)  # (B, V) norm(max(0, p − q))
            p_next = xp.where(rejected[:, None], residual, p_next)
        return _draw(p_next, self.generator)

    def append(self, own, accepted):
        """Commit the kept drafts and the main model's token (1 … n + 1 tokens per sequence), note who emitted EOS,
        and read the batch's lowest and highest committed counts to the host (the one host read per step).
        Returns True when decoding is over: every sequence full or finished."""
        xp, total, committed = self.xp, self.total, self.committed
        offsets = xp.arange(self.n_drafts + 1)
        new_at = committed[:, None] + offsets  # (B, n + 1): where this step's tokens go
        self.tokens[self.rows, committed + accepted] = own
        is_new = (offsets < (accepted + 1)[:, None]) & (new_at < total)  # (B, n + 1)
        news = self.tokens[self.rows[:, None], xp.minimum(new_at, total - 1)]  # (B, n + 1)
        self.finished = self.finished | ((news == self.eos_id) & is_new).any(axis=1)
        committed = xp.minimum(committed + accepted + 1, total)
        # a finished sequence's tokens are discarded: let it run level with the leader, not hold the batch back
        self.committed = xp.where(self.finished, committed.max(), committed)
        bounds = self.backend.to_numpy(xp.stack([self.committed.min(), self.committed.max(),
                                                 self.finished.all().astype("int64")]))
        self.lowest, self.highest, all_finished = (int(value) for value in bounds)
        return self.lowest >= total or bool(all_finished)

    def roll_back(self):
        """The main model's caches forget what lies past position lowest − 2 (lowest: the slowest sequence's
        committed count): every sequence has fed its committed tokens before position lowest − 1, so the next
        pass starts there and overwrites the rejected drafts (faster sequences re-feed their tokens past it)."""
        self.cached = self.lowest - 1
        _rewind(self.main_caches, self.cached)

    def draft(self):
        """Module k (k = 1 … D) reads h^{k−1} and the embedding of the token k positions ahead, up to the furthest
        sequence's drafting position; at each sequence's position committed − 2 its logits propose draft k (argmax,
        or a draw from q_k = target(logits)), written at committed − 1 + k. Module k's cache then rolls back to the
        positions whose inputs are all committed (position i reads token i + k)."""
        xp, stop, drafting_at, qs = self.xp, self.highest - 1, self.committed - 2, []  # drafting_at: (B,)
        for k, module in enumerate(self.model.mtp, start=1):
            start = self.mtp_cached[k - 1]
            h = module(Tensor(self.hidden[k - 1][:, start:stop]), self.model.embed(self.tokens[:, start + k:stop + k]),
                       start_pos=start, cache=self.mtp_caches[k - 1])  # (B, L, dim)
            if k < self.depth:
                self.hidden[k][:, start:stop] = h.data
            logits = self.model.head(module.norm(Tensor(_gather(h.data, drafting_at - start)))).data  # (B, V)
            if self.greedy:
                draft = logits.argmax(axis=-1)
            else:
                qs.append(self.target(logits))
                draft = _draw(qs[-1], self.generator)
            self.tokens[self.rows, self.committed - 1 + k] = draft
            self.mtp_cached[k - 1] = max(self.lowest - k, 0)
            _rewind([self.mtp_caches[k - 1]], self.mtp_cached[k - 1])
        self.draft_q = None if self.greedy else xp.stack(qs, axis=1)  # (B, D, V)
        self.n_drafts = self.depth

    def result(self, prompt_ids, max_new_tokens, pad_id):
        """The committed tokens as a `SpeculativeGeneration`: responses cut after each sequence's first EOS."""
        xp, prompt_length = self.xp, prompt_ids.shape[1]
        responses = self.tokens[:, prompt_length:self.total]  # (B, N)
        step = xp.arange(max_new_tokens)
        is_eos = responses == self.eos_id
        stopped = is_eos.any(axis=1)
        lengths = ((xp.cumsum(is_eos, axis=1) - is_eos) == 0).sum(axis=1).astype(prompt_ids.dtype)  # to the 1st EOS
        responses = xp.where(step[None] < lengths[:, None], responses, pad_id).astype(prompt_ids.dtype)
        tokens = xp.concatenate([prompt_ids, responses], axis=1)
        return SpeculativeGeneration(tokens, responses, lengths, stopped, self.drafted, self.accepted,
                                     self.drafted_by_depth, self.accepted_by_depth, self.steps)


@no_grad()
def speculative_generate(model, prompt_ids, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None,
                         top_p=None, greedy=False, generator=None):
    """`generate` with the model's MTP modules drafting D tokens per step and one forward pass of the main model
    checking them (see the module docstring). Same arguments and output as `generate`, plus the draft statistics;
    greedy output equals plain greedy decoding's, sampled output follows the main model's distribution."""
    if model.config.n_mtp_modules < 1:
        raise ValueError("speculative decoding drafts with the multi-token prediction modules, and this model has "
                         "none (n_mtp_modules=0; a checkpoint trained without MTP has no draft weights): train with "
                         "ModelConfig(n_mtp_modules=1) or decode without speculative=True")
    check_sampling("generate", temperature, top_k, top_p, greedy, max_new_tokens)
    prompt_ids, _, _, total = prompt_shape(model, prompt_ids, max_new_tokens)
    run = _Speculation(model, prompt_ids, total, eos_id, pad_id, temperature, top_k, top_p, greedy, generator)
    was_training = model.training
    model.eval()
    while True:
        p, judged_at, end = run.verify()  # the main model scores all n drafts (and one position past them)
        accepted, verifiable = run.accept(p, judged_at, end)  # (B,) drafts kept, up to each first refusal
        own = run.main_token(p, accepted, verifiable)  # (B,) the correction, or the bonus after all n
        done = run.append(own, accepted)
        run.roll_back()
        if done:
            break
        run.draft()  # D new drafts per sequence for the next verification
    model.train(was_training)
    return run.result(prompt_ids, max_new_tokens, pad_id)
