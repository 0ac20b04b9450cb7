"""Multi-token prediction (DeepSeek-V3 §2.2) against its PyTorch twin (tests/reference/mtp.py) in float64: the
logits of every depth, the combined loss and the gradient of every parameter, for D = 1 and 2, MHA and MLA, dense
and MoE blocks. Then the configuration, the parameter counts, the state dict and the training hook."""

import dataclasses

import re

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the MTP twin is written in PyTorch")
import torch.nn.functional as TF  # noqa: E402

import minimoe
import minimoe.functional as F
from minimoe.model import ModelConfig, Transformer
from minimoe.mtp import MTP_SWITCH_FRACTION
from minimoe.testing import check_close, to_numpy
from minimoe.train import IGNORE, lm_loss
from reference import mtp as twin

RTOL, ATOL = 1e-8, 1e-12
SMALL = dict(vocab_size=11, dim=16, n_layers=1, n_heads=2, max_seq_len=16, kv_lora_rank=8, qk_nope_head_dim=4,
             qk_rope_head_dim=4, v_head_dim=4, inter_dim=24, n_routed_experts=4, n_shared_experts=1,
             n_activated_experts=2, moe_inter_dim=8, bias_update_speed=0.0, mtp_loss_weight=0.3)

CONFIGS = {f"D{d}_{attention}_{ffn}": dict(n_mtp_modules=d, attention=attention, ffn=ffn)
           for d in (1, 2) for attention in ("mha", "mla") for ffn in ("dense", "moe")}
CONFIGS["D2_mla_absorbed_moe_aux_loss"] = dict(n_mtp_modules=2, attention="mla", mla_absorb=True, q_lora_rank=6,
                                               aux_loss_alpha=0.01)


def build(overrides, seed=0):
    """A minimoe model whose parameters (norm weights included, so that swapping two norms would show) are all
    random, and its float64 twin loaded from the same state."""
    minimoe.manual_seed(seed)
    config = ModelConfig(**{**SMALL, **overrides})
    model = Transformer(config)
    rng = np.random.default_rng(seed)
    state = {name: to_numpy(value) for name, value in model.state_dict().items()}
    for name, value in state.items():
        if name.endswith("norm.weight"):
            state[name] = 1 + rng.normal(0, 0.2, value.shape)
    model.load_state_dict(state)
    return config, model, twin.from_minimoe(config, state)


def random_tokens(config, shape, seed=1):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_mtp_matches_twin(float64, overrides):
    config, model, reference = build(overrides)
    ids = random_tokens(config, (3, 11))
    inputs, targets = ids[:, :-1], ids[:, 1:].copy()
    targets[0, :3] = IGNORE  # a prompt: its positions are skipped by every depth

    loss, lm = lm_loss(model, minimoe.tensor(inputs), minimoe.tensor(targets))
    logits, depth_logits = reference.forward_mtp(torch.tensor(inputs))
    assert len(model.mtp_logits) == len(depth_logits) == config.n_mtp_modules
    for k, (ours, theirs) in enumerate(zip(model.mtp_logits, depth_logits), start=1):
        assert ours.shape == (3, 10 - k, config.vocab_size)
        check_close(ours, theirs, ATOL, RTOL, name=f"P^{k}", quiet=True)
    expected_lm = TF.cross_entropy(logits.reshape(-1, config.vocab_size), torch.tensor(targets).reshape(-1),
                                   ignore_index=IGNORE)
    check_close(lm, expected_lm, ATOL, RTOL, name="main loss", quiet=True)
    expected = expected_lm + reference.mtp_loss(depth_logits, torch.tensor(targets), config.mtp_loss_weight, IGNORE)
    if reference.balance_loss() is not None:
        expected = expected + reference.balance_loss()
    check_close(loss, expected, ATOL, RTOL, name="main + balance + MTP loss", quiet=True)

    loss.backward()
    expected.backward()
    theirs = dict(reference.named_parameters())
    assert set(theirs) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        reference_grad = theirs[name].grad if theirs[name].grad is not None else torch.zeros_like(theirs[name])
        assert p.grad is not None or not reference_grad.any(), f"{name}: no gradient"
        check_close(p.grad if p.grad is not None else np.zeros(p.shape), reference_grad, ATOL, RTOL,
                    name=f"grad {name}", quiet=True)
    assert any(name.startswith("mtp.") and theirs[name].grad.abs().sum() > 0 for name in theirs)


def test_mtp_loss_is_the_mean_of_depth_losses_times_lambda(float64):
    config, model, _ = build(dict(n_mtp_modules=2, mtp_loss_weight=0.5))
    ids = minimoe.tensor(random_tokens(config, (2, 9)))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    logits = model(inputs, mtp=True)
    depth = [F.cross_entropy(p, targets[:, k:]).item() for k, p in enumerate(model.mtp_logits, start=1)]
    assert model.mtp_loss(targets).item() == pytest.approx(0.5 * (depth[0] + depth[1]) / 2, rel=1e-12)
    assert model.last_mtp_loss.item() == pytest.approx((depth[0] + depth[1]) / 2, rel=1e-12)
    check_close(logits, model(inputs), 0, 0, name="main logits do not depend on the MTP modules")


def test_config_defaults_keep_old_configs_and_checkpoints_loading(float64):
    old = {f.name: getattr(ModelConfig(), f.name) for f in dataclasses.fields(ModelConfig)
           if not f.name.startswith(("n_mtp", "mtp_"))}
    config = ModelConfig.from_dict(old)
    assert config.n_mtp_modules == 0 and config.mtp_loss_weight == 0.3 and config.mtp_loss_weight_final is None
    model = Transformer(config)
    assert model.mtp is None and not any(name.startswith("mtp") for name in model.state_dict())
    assert model.mtp_loss(minimoe.tensor([[1, 2]])) is None


def test_config_errors():
    with pytest.raises(ValueError, match="n_mtp_modules=-1 must be ≥ 0"):
        ModelConfig(n_mtp_modules=-1)
    with pytest.raises(ValueError, match="mtp_loss_weight=-0.1 must be ≥ 0"):
        ModelConfig(mtp_loss_weight=-0.1)
    with pytest.raises(ValueError, match="mtp_loss_weight_final=-1 must be ≥ 0"):
        ModelConfig(mtp_loss_weight_final=-1)
    model = Transformer(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="no MTP modules"):
        model(minimoe.tensor([[1, 2, 3]]), mtp=True)
    with pytest.raises(ValueError, match="nothing for MTP depth 2"):
        Transformer(ModelConfig(**{**SMALL, "n_mtp_modules": 2}))(minimoe.tensor([[1, 2]]), mtp=True)


def test_lambda_schedule():
    model = Transformer(ModelConfig(**{**SMALL, "n_mtp_modules": 1, "mtp_loss_weight_final": 0.1}))
    model.set_training_progress(0.0)
    assert model.mtp_weight == 0.3
    model.set_training_progress(MTP_SWITCH_FRACTION - 1e-9)
    assert model.mtp_weight == 0.3
    model.set_training_progress(MTP_SWITCH_FRACTION)
    assert model.mtp_weight == 0.1


def test_parameter_counts_and_state_dict(float64):
    config, model, _ = build(dict(n_mtp_modules=2, ffn="moe"))
    counts = model.parameter_counts()
    plain = Transformer(ModelConfig(**SMALL)).parameter_counts()
    mtp_names = [name for name, _ in model.named_parameters() if name.startswith("mtp.")]
    assert counts["mtp"] == sum(p.size for name, p in model.named_parameters() if name.startswith("mtp."))
    assert counts["total"] == plain["total"] + counts["mtp"]
    assert counts["activated"] == plain["activated"], "inference drops the MTP modules"
    d = config.dim
    per_module = counts["mtp"] // 2
    assert "mtp.0.eh_proj.weight" in mtp_names and model.state_dict()["mtp.1.eh_proj.weight"].shape == (d, 2 * d)
    assert per_module == 2 * d * d + 3 * d + Transformer(ModelConfig(**SMALL)).layers[0].num_parameters()
    ids = minimoe.tensor(random_tokens(config, (2, 6)))
    _, other, _ = build(dict(n_mtp_modules=2, ffn="moe"), seed=5)
    other.load_state_dict({k: v.copy() for k, v in model.state_dict().items()})
    other(ids, mtp=True)
    model(ids, mtp=True)
    for ours, theirs in zip(model.mtp_logits, other.mtp_logits):
        check_close(theirs, ours, 0, 0, name="MTP logits after load")


# ---- speculative decoding -----------------------------------------------------------------------------------------

from minimoe.generate import generate  # noqa: E402
from minimoe.optim import AdamW  # noqa: E402

TOY = dict(vocab_size=9, dim=16, n_layers=1, n_heads=2, max_seq_len=32, kv_lora_rank=8, qk_nope_head_dim=4,
           qk_rope_head_dim=4, v_head_dim=4, inter_dim=24, n_routed_experts=4, n_activated_experts=2,
           moe_inter_dim=8)
EOS, PAD = 8, 0


def progressions(rng, batch, length):
    """Sequences t_i = (a + b·i) mod 8, the last token of some replaced by EOS: a model learns to continue them,
    its MTP modules to guess further ahead — so that drafts are often right and sometimes wrong."""
    a, b = rng.integers(0, 8, (batch, 1)), rng.integers(1, 4, (batch, 1))
    ids = (a + b * np.arange(length)) % 8
    stop = rng.integers(length // 2, length + 4, batch)
    ids[np.arange(length) == stop[:, None]] = EOS
    return ids


def trained_toy(overrides, steps=60, seed=0):
    minimoe.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TOY, **overrides}))
    optimizer = AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = progressions(rng, 32, 16)
        loss, _ = lm_loss(model, minimoe.tensor(ids[:, :-1]), minimoe.tensor(ids[:, 1:]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


SPECULATIVE = {"D1_mha_moe": dict(n_mtp_modules=1), "D2_mla_absorbed_dense": dict(n_mtp_modules=2, attention="mla",
                                                                                    mla_absorb=True, ffn="dense"),
               "D3_mla_moe": dict(n_mtp_modules=3, attention="mla")}


@pytest.mark.parametrize("overrides", SPECULATIVE.values(), ids=SPECULATIVE.keys())
def test_speculative_greedy_equals_plain_greedy(float64, overrides):
    """On 256 prompts of different lengths to go, for a briefly trained model (drafts often kept) and an untrained
    one (drafts mostly refused): the same tokens, lengths and stops as plain greedy decoding, batched."""
    rng = np.random.default_rng(1)
    prompts = progressions(rng, 256, 3)
    prompts[::3] = rng.integers(0, 8, (len(prompts[::3]), 3))  # some prompts off the pattern
    for model, trained in ((trained_toy(overrides), True), (Transformer(ModelConfig(**{**TOY, **overrides})), False)):
        plain = generate(model, prompts, 24, EOS, PAD, greedy=True)
        fast = generate(model, prompts, 24, EOS, PAD, greedy=True, speculative=True)
        assert np.array_equal(to_numpy(fast.tokens), to_numpy(plain.tokens))
        assert np.array_equal(to_numpy(fast.lengths), to_numpy(plain.lengths))
        assert np.array_equal(to_numpy(fast.finished), to_numpy(plain.finished))
        accepted, drafted = to_numpy(fast.accepted), to_numpy(fast.drafted)
        assert (accepted <= drafted).all() and to_numpy(fast.drafted_by_depth).sum() == drafted.sum()
        if trained:  # rows kept different numbers of drafts, and the main model ran fewer passes than tokens
            assert 0.3 < fast.acceptance_rate < 1 and len(set(accepted.tolist())) > 3
            assert fast.steps < 24


def test_speculative_greedy_single_prompts_short_budgets_and_the_whole_context(float64):
    model = trained_toy(dict(n_mtp_modules=2))
    sequence = progressions(np.random.default_rng(3), 1, 4)
    for prompt_length, new_tokens in ((4, 0), (4, 1), (4, 2), (4, 3), (4, 7), (1, 10), (1, 31)):
        prompt = sequence[:, :prompt_length]
        plain = generate(model, prompt, new_tokens, EOS, PAD, greedy=True)
        fast = generate(model, prompt, new_tokens, EOS, PAD, greedy=True, speculative=True)
        for field in ("tokens", "lengths", "finished"):
            assert np.array_equal(to_numpy(getattr(fast, field)), to_numpy(getattr(plain, field))), \
                (field, prompt_length, new_tokens)


def exact_distribution(model, prompt, n_new, temperature, top_k):
    """P(x₁ … x_n | prompt) under plain sampling, by enumerating every continuation (teacher-forced)."""
    import itertools
    V = model.config.vocab_size
    continuations = np.array(list(itertools.product(range(V), repeat=n_new)))
    ids = np.concatenate([np.repeat(prompt[None], len(continuations), 0), continuations], axis=1)
    with minimoe.no_grad():
        logits = to_numpy(model(minimoe.tensor(ids[:, :-1])))[:, len(prompt) - 1:] / temperature  # (N, n, V)
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[..., -top_k][..., None]
        logits = np.where(logits < kth, -np.inf, logits)
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    chosen = np.take_along_axis(log_p, continuations[..., None], axis=-1)[..., 0]
    return continuations, np.exp(chosen.sum(axis=1))


@pytest.mark.parametrize("depth,temperature,top_k", [(1, 1.0, None), (2, 0.7, 3)], ids=["D1_T1", "D2_T0.7_top3"])
def test_speculative_sampling_follows_the_main_model_exactly(float64, depth, temperature, top_k):
    """Leviathan et al. / Chen et al.: accepted with probability min(1, p/q), else redrawn from norm(max(0, p − q)),
    the tokens follow the main model's distribution p whatever the draft q. 20,000 samples of 3 tokens over a
    4-token vocabulary against the exact distribution (every continuation enumerated): a χ² test, fixed seed."""
    from scipy.stats import chisquare
    minimoe.manual_seed(depth)
    config = ModelConfig(**{**TOY, "vocab_size": 4, "n_mtp_modules": depth})
    model = Transformer(config)
    for name, p in model.named_parameters():  # a sharper model than the default initialisation gives
        p.data = p.data * (3.0 if name.endswith("head.weight") else 1.0)
    prompt = np.array([1, 2, 3])
    continuations, expected = exact_distribution(model, prompt, 3, temperature, top_k)
    n = 20_000
    out = generate(model, np.repeat(prompt[None], n, 0), 3, eos_id=99, pad_id=0, temperature=temperature,
                   top_k=top_k, speculative=True, generator=np.random.default_rng(0))
    codes = to_numpy(out.responses) @ (4 ** np.arange(2, -1, -1))
    observed = np.bincount(codes, minlength=64)
    assert np.array_equal(continuations @ (4 ** np.arange(2, -1, -1)), np.arange(64))
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a continuation the main model never samples was produced"
    _, p_value = chisquare(observed[keep], expected[keep] / expected[keep].sum() * n)
    assert p_value > 1e-3
    rate = out.acceptance_rate
    assert 0.1 < rate < 0.95, f"both accept and reject should happen, got acceptance {rate}"


def test_speculative_errors(float64):
    model = Transformer(ModelConfig(**TOY))
    with pytest.raises(ValueError, match="n_mtp_modules=0.*checkpoint trained without MTP"):
        generate(model, np.array([[1, 2]]), 3, EOS, PAD, greedy=True, speculative=True)
    model = Transformer(ModelConfig(**{**TOY, "n_mtp_modules": 1}))
    with pytest.raises(ValueError, match="temperature=0 must be a finite number > 0"):
        generate(model, np.array([[1, 2]]), 3, EOS, PAD, temperature=0, speculative=True)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
        generate(model, np.array([[1, 2]]), 31, EOS, PAD, greedy=True, speculative=True)


def test_cli_speculative_with_a_checkpoint_without_mtp_weights(capsys):
    """The committed demo checkpoint predates MTP: it loads unchanged, and asking it to speculate says why not."""
    from minimoe.cli import main
    with pytest.raises(SystemExit) as stopped:
        main(["generate", "--checkpoint", "lessons/data/base_addition3", "--prompt", "347+589=", "--speculative",
              "--n", "1"])
    assert stopped.value.code == 2  # one line, no traceback
    assert re.search(r"minimoe: error: .*speculative decoding .*\(n_mtp_modules=0", capsys.readouterr().err)


def test_pretrain_trains_the_modules_and_logs_their_loss(tmp_path):
    """pretrain adds λ·L_MTP (with the schedule) to its loss, records the modules' loss apart, and the checkpoint
    carries their weights."""
    from minimoe.checkpoint import load_checkpoint
    from minimoe.tasks import AdditionTask, Tokenizer
    from minimoe.train import PretrainConfig, pretrain
    minimoe.manual_seed(0)
    config = ModelConfig(vocab_size=Tokenizer().vocab_size, dim=16, n_layers=1, n_heads=2, moe_inter_dim=8,
                         n_routed_experts=4, n_mtp_modules=1, mtp_loss_weight_final=0.1)
    model = Transformer(config)
    before = to_numpy(model.mtp[0].eh_proj.weight).copy()
    history = pretrain(model, AdditionTask(3), PretrainConfig(steps=4, batch_size=8, warmup_steps=1, eval_every=0,
                                                              checkpoint_every=4), out_dir=str(tmp_path),
                       progress=False)
    assert len(history["mtp_loss"]) == 4 and all(np.isfinite(history["mtp_loss"]))
    assert all(total > lm for total, lm in zip(history["loss"], history["lm_loss"]))
    assert model.mtp_weight == 0.1, "step 4 of 4 starts at 3/4 of the run, past 10/14.8"
    assert not np.allclose(to_numpy(model.mtp[0].eh_proj.weight), before)
    loaded, _ = load_checkpoint(str(tmp_path / "pretrain_last"), restore_random_state=False)
    check_close(loaded.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight, 0, 0, name="M_1 after load")
