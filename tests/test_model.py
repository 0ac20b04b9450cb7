"""The whole model against its PyTorch twin (tests/reference/model.py) in float64: logits, the loss with each
balance method, and the gradient of every parameter, for MHA and MLA, dense and MoE, softmax and sigmoid
gating, with and without shared experts, with group-limited routing and with capacity dropping. Then cached
decoding, configuration errors, the state dict and the parameter counts."""

import dataclasses

import numpy as np
import pytest

import minimoe
import minimoe.functional as F
from minimoe.model import ModelConfig, Transformer
from minimoe.testing import check_close, to_numpy
from parity import TF, torch, twin as load_twin

twin = load_twin("model")

RTOL, ATOL = 1e-8, 1e-12
SMALL = dict(vocab_size=11, dim=16, n_layers=2, n_heads=2, max_seq_len=16, kv_lora_rank=8, qk_nope_head_dim=4,
             qk_rope_head_dim=4, v_head_dim=4, inter_dim=24, n_routed_experts=4, n_shared_experts=1,
             n_activated_experts=2, moe_inter_dim=8, bias_update_speed=0.0)

CONFIGS = {
    "mha_dense": dict(attention="mha", ffn="dense"),
    "mla_dense_q_lora": dict(attention="mla", ffn="dense", q_lora_rank=6),
    "mha_moe_softmax_shared": dict(attention="mha"),
    "mla_moe_sigmoid_no_shared": dict(attention="mla", score_func="sigmoid", route_scale=2.5, n_shared_experts=0),
    "mla_absorbed_moe_first_layer_dense": dict(attention="mla", mla_absorb=True, n_dense_layers=1),
    "moe_group_limited_sigmoid_bias": dict(score_func="sigmoid", n_routed_experts=8, n_expert_groups=4,
                                           n_limited_groups=2, bias_update_speed=1e-3),
    "moe_switch_aux_loss": dict(aux_loss_alpha=0.01),
    "moe_sequence_aux_loss": dict(score_func="sigmoid", seq_aux_alpha=0.001),
    "moe_z_loss": dict(z_loss_coef=0.001),
    "moe_all_balance_terms": dict(aux_loss_alpha=0.01, seq_aux_alpha=0.001, z_loss_coef=0.001,
                                  bias_update_speed=1e-3),
    "moe_capacity_dropping": dict(capacity_factor=0.75),
}


def build(float64_overrides, seed=0):
    minimoe.manual_seed(seed)
    config = ModelConfig(**{**SMALL, **float64_overrides})
    model = Transformer(config)
    for moe in model.moe_layers():  # a non-zero routing bias, so that it is really exercised
        if getattr(moe.gate, "bias", None) is not None:
            values = np.random.default_rng(seed).normal(0, 0.05, moe.gate.bias.shape)
            moe.gate.bias = minimoe.get_backend().asarray(values, dtype=moe.gate.bias.dtype)
    reference = twin.from_minimoe(config, {k: to_numpy(v) for k, v in model.state_dict().items()})
    return config, model, reference


def random_tokens(config, shape, seed=1):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_model_matches_twin(backend, float64, overrides):
    config, model, reference = build(overrides)
    ids = random_tokens(config, (3, 10))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    logits = model(minimoe.tensor(inputs))
    expected = reference(torch.tensor(inputs))
    check_close(logits, expected, ATOL, RTOL, name="logits", quiet=True)

    loss = F.cross_entropy(logits, minimoe.tensor(targets))
    expected_loss = TF.cross_entropy(expected.reshape(-1, config.vocab_size), torch.tensor(targets).reshape(-1))
    balance, expected_balance = model.balance_loss(), reference.balance_loss()
    assert (balance is None) == (expected_balance is None)
    if balance is not None:
        check_close(balance, expected_balance, ATOL, RTOL, name="balance loss", quiet=True)
        loss, expected_loss = loss + balance, expected_loss + expected_balance
    check_close(loss, expected_loss, ATOL, RTOL, name="loss", quiet=True)

    loss.backward()
    expected_loss.backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        reference_grad = theirs[name].grad if theirs[name].grad is not None else torch.zeros_like(theirs[name])
        assert p.grad is not None or not reference_grad.any(), f"{name}: no gradient"
        check_close(p.grad if p.grad is not None else np.zeros(p.shape), reference_grad, ATOL, RTOL,
                    name=f"grad {name}", quiet=True)
    if overrides.get("capacity_factor"):
        dropped = sum(int(to_numpy(moe.stats["dropped"])) for moe in model.moe_layers())
        assert dropped == sum(layer.ffn.dropped for layer in reference.layers if isinstance(layer.ffn, twin.MoE))
        assert dropped > 0, "this configuration should drop tokens"


@pytest.mark.parametrize("overrides", [dict(attention="mha"), dict(attention="mla"),
                                       dict(attention="mla", mla_absorb=True, q_lora_rank=6)],
                         ids=["mha", "mla", "mla_absorbed"])
def test_cached_decoding_equals_full_forward(backend, float64, overrides):
    config, model, _ = build(overrides)
    model.eval()
    ids = minimoe.tensor(random_tokens(config, (2, 9)))
    with minimoe.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 9)
        pieces = [model(ids[:, :4].data, start_pos=0, caches=caches)]
        for t in range(4, 9):
            pieces.append(model(ids[:, t:t + 1].data, start_pos=t, caches=caches))
    check_close(F.concatenate(pieces, axis=1), full, 1e-12, 1e-10, name="cached logits")


def test_config_validation_names_every_problem():
    with pytest.raises(ValueError) as error:
        ModelConfig(dim=30, n_heads=4, n_activated_experts=9, n_routed_experts=8, score_func="relu", dropout=1.5)
    message = str(error.value)
    for expected in ("n_heads=4 must divide dim=30", "n_activated_experts=9", "score_func='relu'", "dropout=1.5"):
        assert expected in message
    with pytest.raises(ValueError, match="n_expert_groups=3 must divide n_routed_experts=8"):
        ModelConfig(n_expert_groups=3)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"dim": 64, "n_experts": 8})


def test_clear_errors_for_long_sequences_and_unknown_tokens(float64):
    config, model, _ = build({})
    with pytest.raises(ValueError, match="exceed max_seq_len=16"):
        model(minimoe.tensor(random_tokens(config, (1, 17))))
    with pytest.raises(IndexError, match=r"embedding.*indices range over"):
        model(minimoe.tensor([[1, 2, config.vocab_size]]))
    with pytest.raises(ValueError, match="batch, time"):
        model(minimoe.tensor([1, 2, 3]))


def test_state_dict_round_trip_and_strict_loading(float64):
    config, model, _ = build(dict(bias_update_speed=1e-3))
    ids = minimoe.tensor(random_tokens(config, (2, 6)))
    state = {k: v.copy() for k, v in model.state_dict().items()}
    assert any(k.endswith("gate.bias") for k in state), "the routing bias buffer is part of the state"
    _, other, _ = build(dict(bias_update_speed=1e-3), seed=5)
    other.load_state_dict(state)
    check_close(other(ids), model(ids), 0, 0, name="logits after load")
    state.pop("layers.0.attn.wq.weight")
    state["layers.0.attn.extra"] = np.zeros(3)
    with pytest.raises(ValueError, match="missing: layers.0.attn.wq.weight.*unexpected: layers.0.attn.extra"):
        other.load_state_dict(state)


def test_parameter_counts(float64):
    config, model, _ = build(dict(n_dense_layers=1))
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.size for p in model.parameters())
    expert = 3 * config.dim * config.moe_inter_dim
    idle_experts = config.n_routed_experts - config.n_activated_experts
    assert counts["total"] - counts["activated"] == idle_experts * expert  # one MoE layer (the first is dense)
    assert counts["embedding"] == 2 * config.vocab_size * config.dim


def test_demo_config_has_the_documented_size():
    counts = Transformer(ModelConfig(vocab_size=26)).parameter_counts()
    assert 250_000 < counts["total"] < 270_000  # "~0.26M parameters"
    assert counts["activated"] < counts["total"] / 2


def test_config_json_round_trip():
    config = ModelConfig(attention="mla", capacity_factor=1.25)
    again = ModelConfig.from_dict(__import__("json").loads(config.to_json()))
    assert again == config and dataclasses.asdict(again) == config.to_dict()


def test_repr_shows_parameter_counts_and_collapses_identical_experts():
    model = Transformer(ModelConfig(vocab_size=26))
    text = repr(model)
    assert "(0-7): 8 × Expert(64 -> 64 -> 64)" in text and "(wq): Linear(64 -> 64, bias=False)" in text
    assert f"total: {model.num_parameters():,} parameters" in text.splitlines()[-1]
