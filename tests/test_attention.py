"""RoPE, MHA and MLA against their PyTorch twins (tests/reference/attention.py) in float64: outputs and the gradient
of every parameter and of the input under a random upstream gradient; cached decoding against a full pass; the
properties RoPE and causality promise; the errors; the cache sizes."""

import numpy as np
import pytest

import minimoe
import minimoe.functional as F
from minimoe.nn import MHA, MLA, KVCache, LatentCache, RotaryEmbedding, compare_cache_sizes
from minimoe.testing import check_close, to_numpy
from parity import torch, twin as load_twin

twin = load_twin("attention")

RTOL, ATOL = 1e-8, 1e-12
DIM, MAX_SEQ_LEN, BATCH, TOKENS = 16, 12, 2, 7
MLA_SIZES = dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5)  # all different on purpose

LAYERS = {
    "mha": (MHA, dict(dim=DIM, n_heads=4, max_seq_len=MAX_SEQ_LEN)),
    "mla": (MLA, dict(dim=DIM, n_heads=3, max_seq_len=MAX_SEQ_LEN, **MLA_SIZES)),
    "mla_absorbed": (MLA, dict(dim=DIM, n_heads=3, max_seq_len=MAX_SEQ_LEN, absorb=True, **MLA_SIZES)),
    "mla_q_lora": (MLA, dict(dim=DIM, n_heads=3, max_seq_len=MAX_SEQ_LEN, q_lora_rank=6, **MLA_SIZES)),
    "mla_q_lora_absorbed": (MLA, dict(dim=DIM, n_heads=3, max_seq_len=MAX_SEQ_LEN, q_lora_rank=6, absorb=True,
                                      **MLA_SIZES)),
}


def host(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def make_layer(name):
    """A minimoe layer (current backend). Norm weights are randomised: at their initial ones a mistake in them
    would go unseen."""
    cls, kwargs = LAYERS[name]
    layer = cls(**kwargs)
    state = {k: v + minimoe.tensor(host(*v.shape, seed=7)).data * 0.3 if k.endswith("norm.weight") else v
             for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    return layer


def make(name):
    """A minimoe layer and its twin holding the same weights."""
    layer = make_layer(name)
    cls, kwargs = LAYERS[name]
    reference = {MHA: twin.MHA, MLA: twin.MLA}[cls](**kwargs)
    reference.load_state_dict({k: torch.tensor(to_numpy(v)) for k, v in layer.state_dict().items()})
    return layer, reference


def decode(layer, x, chunks):
    """Run x (B, T, dim) through the layer piece by piece with a cache: chunks are the pieces' lengths."""
    is_twin = not isinstance(layer, minimoe.nn.Module)
    context = torch.no_grad() if is_twin else minimoe.no_grad()
    pieces, start = [], 0
    with context:
        cache = layer.new_cache(x.shape[0], MAX_SEQ_LEN)
        for length in chunks:
            piece = x[:, start:start + length]
            pieces.append(layer(piece, start, use_cache=True) if is_twin else layer(piece, start, cache))
            start += length
    return np.concatenate([to_numpy(p) for p in pieces], axis=1)


# ------------------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 5, 3, 6), (2, 5, 6)], ids=["heads", "shared"])
def test_rope_matches_twin(backend, float64, shape):
    rope = RotaryEmbedding(6, MAX_SEQ_LEN, theta=500.0)
    x_host, upstream = host(*shape), host(*shape, seed=2)
    x = minimoe.tensor(x_host, requires_grad=True)
    y = rope(x, start_pos=4)
    y.backward(minimoe.tensor(upstream))
    x_torch = torch.tensor(x_host, requires_grad=True)
    y_torch = twin.apply_rotary_emb(x_torch, twin.precompute_freqs_cis(6, MAX_SEQ_LEN, 500.0)[4:9])
    y_torch.backward(torch.tensor(upstream))
    check_close(y, y_torch, ATOL, RTOL, name="rope")
    check_close(x.grad, x_torch.grad, ATOL, RTOL, name="rope gradient (the rotation by -θ)")


def test_rope_is_a_rotation(backend, float64):
    """Every pair keeps its length (so the whole vector does), and position 0 is the identity."""
    rope = RotaryEmbedding(8, MAX_SEQ_LEN)
    x = minimoe.tensor(host(2, 6, 3, 8))
    y = rope(x, start_pos=3)
    pair_norms = lambda a: np.linalg.norm(to_numpy(a).reshape(2, 6, 3, 4, 2), axis=-1)  # noqa: E731
    check_close(pair_norms(y), pair_norms(x), name="pair lengths")
    check_close(rope(x[:, :1])[:, 0], x[:, 0], name="position 0")
    assert not np.allclose(to_numpy(y), to_numpy(x))


def test_rope_scores_depend_only_on_relative_position(backend, float64):
    """R(mθ)q · R(nθ)k = q · R((n-m)θ)k: shifting both positions by the same amount leaves the score."""
    rope = RotaryEmbedding(8, 20)
    q, k = minimoe.tensor(host(1, 1, 8)), minimoe.tensor(host(1, 1, 8, seed=2))
    score = lambda m, n: (rope(q, m) * rope(k, n)).sum().item()  # noqa: E731
    for shift in (1, 5, 13):
        assert abs(score(2 + shift, 6 + shift) - score(2, 6)) < 1e-12
    assert abs(score(2, 6) - score(2, 7)) > 1e-3  # but the distance matters


def test_rope_rotate_half_convention_is_a_permutation(float64):
    """The docstring's recipe: rope_rotate_half(x[perm]) = rope_interleaved(x)[perm], perm = evens then odds."""
    rope = RotaryEmbedding(8, MAX_SEQ_LEN)
    perm = [0, 2, 4, 6, 1, 3, 5, 7]
    x = host(2, 5, 3, 8)
    ours = to_numpy(rope(minimoe.tensor(x), start_pos=2))
    freqs_cis = twin.precompute_freqs_cis(8, MAX_SEQ_LEN)[2:7]
    rotate_half = twin.apply_rotary_emb_rotate_half(torch.tensor(x[..., perm]), freqs_cis)
    check_close(rotate_half, ours[..., perm], ATOL, RTOL, name="rotate-half of permuted x")


def test_rotate_half_checkpoint_runs_after_reordering_q_and_k_rows(float64):
    """The docstring's weight recipe: an MHA of ours equals a rotate-half MHA whose wq and wk rows are reordered
    by perm within each head (and wv, wo unchanged)."""
    layer = MHA(DIM, 4, MAX_SEQ_LEN)
    perm = [0, 2, 1, 3]  # head_dim 4: evens, then odds
    state = {k: torch.tensor(to_numpy(v)) for k, v in layer.state_dict().items()}
    for name in ("wq.weight", "wk.weight"):
        state[name] = state[name].view(4, 4, DIM)[:, perm].reshape(DIM, DIM)
    hugging_face_style = twin.MHA(DIM, 4, MAX_SEQ_LEN, rotate_half=True)
    hugging_face_style.load_state_dict(state)
    x = host(BATCH, TOKENS, DIM)
    check_close(hugging_face_style(torch.tensor(x)), layer(minimoe.tensor(x)), ATOL, RTOL, name="rotate-half twin")


def test_rope_tables_stay_out_of_the_state_dict_and_follow_the_backend(float64):
    layer = MHA(DIM, 4, MAX_SEQ_LEN)
    assert not any("rope" in name for name in layer.state_dict())
    x = host(1, 3, DIM)
    expected = to_numpy(layer(minimoe.tensor(x)))
    layer.to("fakegpu")
    with minimoe.use_backend("fakegpu"):
        check_close(layer(minimoe.tensor(x)), expected, name="after .to('fakegpu')")


# ------------------------------------------------------------------------------------------------------------
# the layers against their twins
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("start_pos", [0, 3])
def test_layer_matches_twin_forward_and_gradients(backend, float64, name, start_pos):
    layer, reference = make(name)
    x_host, upstream = host(BATCH, TOKENS - start_pos, DIM), host(BATCH, TOKENS - start_pos, DIM, seed=3)
    x = minimoe.tensor(x_host, requires_grad=True)
    y = layer(x, start_pos=start_pos)
    y.backward(minimoe.tensor(upstream))
    x_torch = torch.tensor(x_host, requires_grad=True)
    y_torch = reference(x_torch, start_pos=start_pos)
    y_torch.backward(torch.tensor(upstream))
    check_close(y, y_torch, ATOL, RTOL, name=f"{name} output")
    check_close(x.grad, x_torch.grad, ATOL, RTOL, name=f"{name} input gradient")
    theirs = dict(reference.named_parameters())
    assert set(theirs) == {n for n, _ in layer.named_parameters()}
    for parameter_name, parameter in layer.named_parameters():
        assert parameter.grad is not None, f"{parameter_name}: no gradient"
        check_close(parameter.grad, theirs[parameter_name].grad, ATOL, RTOL, name=f"{name} {parameter_name}.grad")


@pytest.mark.parametrize("q_lora_rank", [0, 6])
def test_mla_absorbed_equals_plain_in_training(backend, float64, q_lora_rank):
    """The same weights through both paths: the same output and the same gradients."""
    layer = MLA(DIM, 3, MAX_SEQ_LEN, q_lora_rank=q_lora_rank, **MLA_SIZES)
    x_host, upstream = host(BATCH, TOKENS, DIM), minimoe.tensor(host(BATCH, TOKENS, DIM, seed=3))
    results = []
    for absorb in (False, True):
        layer.absorb = absorb
        layer.zero_grad()
        x = minimoe.tensor(x_host, requires_grad=True)
        y = layer(x)
        y.backward(upstream)
        results.append((to_numpy(y), to_numpy(x.grad), {n: to_numpy(p.grad) for n, p in layer.named_parameters()}))
    (y_plain, gx_plain, grads_plain), (y_absorbed, gx_absorbed, grads_absorbed) = results
    check_close(y_absorbed, y_plain, ATOL, RTOL, name="output")
    check_close(gx_absorbed, gx_plain, ATOL, RTOL, name="input gradient")
    for parameter_name in grads_plain:
        check_close(grads_absorbed[parameter_name], grads_plain[parameter_name], ATOL, RTOL,
                    name=f"{parameter_name}.grad")


def test_layer_depends_only_on_relative_positions(backend, float64):
    """Without a cache, moving every token by the same number of positions changes nothing."""
    for name in ("mha", "mla_absorbed"):
        layer = make_layer(name)
        x = minimoe.tensor(host(BATCH, 4, DIM))
        check_close(layer(x, start_pos=5), layer(x), ATOL, RTOL, name=f"{name} shifted by 5")


@pytest.mark.parametrize("name", ["mha", "mla", "mla_absorbed"])
def test_causality(backend, float64, name):
    """Changing token 4 never changes the outputs of tokens 0..3, and does change token 4's."""
    layer = make_layer(name)
    x_host = host(BATCH, TOKENS, DIM)
    changed = x_host.copy()
    changed[:, 4] += 1.0
    with minimoe.no_grad():
        y, y_changed = to_numpy(layer(minimoe.tensor(x_host))), to_numpy(layer(minimoe.tensor(changed)))
    check_close(y_changed[:, :4], y[:, :4], atol=1e-14, rtol=0, name="earlier tokens")
    assert not np.allclose(y_changed[:, 4], y[:, 4])


# ------------------------------------------------------------------------------------------------------------
# decoding with a cache
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mha", "mla", "mla_absorbed", "mla_q_lora_absorbed"])
def test_cached_decoding_matches_full_forward_and_twin(backend, float64, name):
    """Prefill 3 tokens, then 2 at once at start_pos=3, then one at a time: the same as one full pass, and as the
    twin decoding with its own cache."""
    layer, reference = make(name)
    x_host = host(BATCH, TOKENS, DIM)
    with minimoe.no_grad():
        full = to_numpy(layer(minimoe.tensor(x_host)))
    chunks = [3, 2, 1, 1]
    check_close(decode(layer, minimoe.tensor(x_host), chunks), full, ATOL, RTOL, name=f"{name} decoded")
    check_close(decode(reference, torch.tensor(x_host), chunks), full, ATOL, RTOL, name=f"{name} twin decoded")


@pytest.mark.parametrize("q_lora_rank", [0, 6])
def test_mla_absorbed_equals_plain_in_decoding(backend, float64, q_lora_rank):
    layer = MLA(DIM, 3, MAX_SEQ_LEN, q_lora_rank=q_lora_rank, **MLA_SIZES)
    x = minimoe.tensor(host(BATCH, TOKENS, DIM))
    plain = decode(layer, x, [4, 1, 1, 1])
    layer.absorb = True
    check_close(decode(layer, x, [4, 1, 1, 1]), plain, ATOL, RTOL, name="absorbed decoding")


def test_caches_hold_what_they_promise(backend, float64):
    mha, mla, absorbed = make_layer("mha"), make_layer("mla"), make_layer("mla_absorbed")
    cache = mha.new_cache(BATCH, 10)
    assert isinstance(cache, KVCache) and cache.keys.shape == cache.values.shape == (BATCH, 4, 10, 4)
    cache = mla.new_cache(BATCH)
    assert isinstance(cache, KVCache) and cache.keys.shape == (BATCH, 3, MAX_SEQ_LEN, 10)
    assert cache.values.shape == (BATCH, 3, MAX_SEQ_LEN, 5)
    cache = absorbed.new_cache(BATCH, 10)
    assert isinstance(cache, LatentCache) and cache.kv.shape == (BATCH, 10, 8 + 6)
    assert cache.latent.shape == (BATCH, 10, 8) and cache.k_pe.shape == (BATCH, 10, 6)
    # what the absorbed cache holds is kv_norm(c_kv) and the rotated k_pe, nothing per head
    x = minimoe.tensor(host(BATCH, 3, DIM))
    with minimoe.no_grad():
        absorbed(x, 0, cache)
        c_kv, k_pe = F.split(absorbed.wkv_a(x), [8, 6], axis=-1)
        check_close(cache.latent[:, :3], absorbed.kv_norm(c_kv), name="cached latent")
        check_close(cache.k_pe[:, :3], absorbed.rope(k_pe), name="cached k_pe")
    assert cache.length == 3 and not to_numpy(cache.kv[:, 3:]).any()


def test_cache_bytes_per_token(backend, float64):
    for name, numbers in (("mha", 2 * DIM), ("mla", 3 * (4 + 6 + 5)), ("mla_absorbed", 8 + 6)):
        layer = make_layer(name)
        assert layer.cache_bytes_per_token() == numbers * 8
        assert layer.cache_bytes_per_token("float32") == numbers * 4
        assert layer.new_cache(1, 5).bytes_per_token == numbers * 8
        assert layer.new_cache(1, 5, dtype="float32").bytes_per_token == numbers * 4


def test_deepseek_v3_cache_sizes():
    """DeepSeek-V3's shapes (arXiv 2412.19437, §4.2: 128 heads, d_c = 512, d_h^R = 64, head size 128) give 576
    numbers per token per layer for MLA against 40,960 for per-head k and v."""
    v3 = dict(n_heads=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512)
    sizes = compare_cache_sizes(**v3, dtype="float16")
    assert (sizes["mla_numbers"], sizes["mha_numbers"]) == (576, 40_960)
    assert (sizes["mla_bytes"], sizes["mha_bytes"]) == (1_152, 81_920)
    assert sizes["ratio"] == pytest.approx(40_960 / 576)
    layer = MLA(64, max_seq_len=4, **v3)  # the real head shapes on a tiny model width
    assert layer.cache_bytes_per_token("float16") == 81_920
    layer.absorb = True
    assert layer.cache_bytes_per_token("float16") == 1_152


# ------------------------------------------------------------------------------------------------------------
# errors, state dict, dtypes
# ------------------------------------------------------------------------------------------------------------

def test_clear_errors(backend, float64):
    with pytest.raises(ValueError, match=r"MHA: n_heads=3 must divide dim=16"):
        MHA(16, 3, 8)
    with pytest.raises(ValueError, match=r"MLA: qk_rope_head_dim must be even"):
        MLA(16, 2, 8, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=3, v_head_dim=4)
    with pytest.raises(ValueError, match=r"MLA: sizes must be positive integers.*kv_lora_rank"):
        MLA(16, 2, 8, kv_lora_rank=0, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    mha, mla = make_layer("mha"), make_layer("mla_absorbed")
    with pytest.raises(ValueError, match=r"MHA: positions 10\.\.12 do not fit max_seq_len=12 "
                                         r"\(start_pos=10 \+ 3 tokens = 13 > 12\)"):
        mha(minimoe.tensor(host(1, 3, DIM)), start_pos=10)
    with pytest.raises(ValueError, match=r"MLA: positions 0\.\.12 do not fit max_seq_len=12"):
        mla(minimoe.tensor(host(1, 13, DIM)))
    with pytest.raises(minimoe.ShapeError, match=r"MHA: expected input \(batch, tokens, dim=16\), got shape "
                                                 r"\(1, 3, 8\)"):
        mha(minimoe.tensor(host(1, 3, 8)))
    with pytest.raises(minimoe.ShapeError, match=r"MLA: expected input"):
        mla(minimoe.tensor(host(3, DIM)))
    with pytest.raises(ValueError, match=r"start_pos must be a non-negative"):
        mha(minimoe.tensor(host(1, 3, DIM)), start_pos=-1)


def test_clear_cache_errors(backend, float64):
    mha, mla = make_layer("mha"), make_layer("mla_absorbed")
    x = minimoe.tensor(host(BATCH, 2, DIM))
    with pytest.raises(RuntimeError, match=r"MHA: a key/value cache .*no_grad"):
        mha(x, 0, mha.new_cache(BATCH))
    with minimoe.no_grad():
        cache = mha.new_cache(BATCH, 4)
        with pytest.raises(ValueError, match=r"MLA: this layer needs a LatentCache"):
            mla(x, 0, cache)
        with pytest.raises(ValueError, match=r"MHA: start_pos=3, but the cache holds only 0 positions"):
            mha(x, 3, cache)
        mha(x, 0, cache)
        with pytest.raises(ValueError, match=r"MHA: positions up to 4 do not fit the cache's max_len=4"):
            mha(minimoe.tensor(host(BATCH, 3, DIM)), 2, cache)
        with pytest.raises(ValueError, match=r"MHA: the cache holds 2 sequences but the input has 1"):
            mha(x[:1], 2, cache)
    with pytest.raises(ValueError, match=r"max_len=20 must be in 1\.\.max_seq_len=12"):
        mha.new_cache(1, 20)


def test_sdpa_error_names_the_op_and_positions(backend, float64):
    q, k = minimoe.tensor(host(1, 3, 4)), minimoe.tensor(host(1, 4, 4))
    with pytest.raises(minimoe.ShapeError, match=r"scaled_dot_product_attention: causal queries at positions 2\.\.4"):
        F.scaled_dot_product_attention(q, k, k, start_pos=2)
    with pytest.raises(minimoe.ShapeError, match=r"scaled_dot_product_attention: q .* must agree"):
        F.scaled_dot_product_attention(q, minimoe.tensor(host(1, 4, 5)), k)


@pytest.mark.parametrize("name", ["mha", "mla_q_lora_absorbed"])
def test_state_dict_round_trip(backend, float64, name):
    layer = make_layer(name)
    expected_names = {
        "mha": {"wq.weight", "wk.weight", "wv.weight", "wo.weight"},
        "mla_q_lora_absorbed": {"wq_a.weight", "q_norm.weight", "wq_b.weight", "wkv_a.weight", "kv_norm.weight",
                                "wkv_b.weight", "wo.weight"},
    }[name]
    assert set(layer.state_dict()) == expected_names
    cls, kwargs = LAYERS[name]
    minimoe.manual_seed(123)
    copy = cls(**kwargs)
    copy.load_state_dict({k: to_numpy(v) for k, v in layer.state_dict().items()})
    x = minimoe.tensor(host(BATCH, 4, DIM))
    check_close(copy(x), layer(x), atol=0, rtol=0, name="reloaded layer")


@pytest.mark.parametrize("name", ["mha", "mla_absorbed"])
def test_float32_stays_float32(backend, name):
    cls, kwargs = LAYERS[name]
    layer = cls(**kwargs)
    x = minimoe.tensor(host(BATCH, 3, DIM), dtype="float32", requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in layer.parameters())
    with minimoe.no_grad():
        cache = layer.new_cache(BATCH)
        assert cache.dtype == np.float32 and layer(x, 0, cache).dtype == np.float32
