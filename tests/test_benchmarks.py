"""The benchmark suite's PyTorch twin (benchmarks/torch_model.py) computes what minimoe computes — logits, every
parameter's gradient and greedy generations, in float64 — so that its timings compare like with like. And the
suite's GPU path says why it skips on a machine without a GPU. The suite times minimoe against PyTorch, so
without torch the whole file skips."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import minimoe
import minimoe.functional as F
from minimoe.generate import generate
from minimoe.model import ModelConfig, Transformer
from minimoe.testing import check_close, to_numpy
from parity import require_torch

torch = require_torch()
import torch.nn.functional as TF  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import torch_model  # noqa: E402
from benchmarks.__main__ import main as benchmarks_main  # noqa: E402

SMALL = dict(vocab_size=11, dim=16, n_layers=2, n_heads=2, max_seq_len=16, kv_lora_rank=8, qk_nope_head_dim=4,
             qk_rope_head_dim=4, v_head_dim=4, inter_dim=24, n_routed_experts=4, n_shared_experts=1,
             n_activated_experts=2, moe_inter_dim=8)
CONFIGS = {"mha_moe": {}, "mla_plain": dict(attention="mla"),
           "mla_absorbed_q_lora": dict(attention="mla", mla_absorb=True, q_lora_rank=6),
           "sigmoid_no_shared": dict(score_func="sigmoid", route_scale=2.0, n_shared_experts=0),
           "dense": dict(ffn="dense")}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_torch_twin_matches_minimoe(float64, overrides):
    config = ModelConfig(**{**SMALL, **overrides})
    model = Transformer(config)
    for moe in model.moe_layers():  # a non-zero routing bias, so that it is really used
        moe.gate.bias = np.random.default_rng(0).normal(0, 0.05, moe.gate.bias.shape)
    twin = torch_model.from_minimoe(config, {name: to_numpy(value) for name, value in model.state_dict().items()})
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (3, 10))
    logits, expected = model(ids), twin(torch.tensor(ids))
    check_close(logits, expected, atol=1e-12, rtol=1e-10, name="logits")
    F.cross_entropy(logits, ids).backward()
    TF.cross_entropy(expected.flatten(0, 1), torch.tensor(ids).flatten()).backward()
    theirs = dict(twin.named_parameters())
    assert sorted(theirs) == sorted(name for name, _ in model.named_parameters())
    for name, p in model.named_parameters():
        check_close(p.grad, theirs[name].grad, atol=1e-12, rtol=1e-9, name=f"grad of {name}")
    ours = generate(model, ids[:, :4], 8, eos_id=-1, pad_id=0, greedy=True).tokens
    np.testing.assert_array_equal(to_numpy(ours), torch_model.generate(twin, torch.tensor(ids[:, :4]), 8).numpy())


def test_torch_twin_refuses_what_it_leaves_out():
    with pytest.raises(ValueError, match="capacity_factor"):
        torch_model.check_supported(dataclasses.replace(ModelConfig(**SMALL), capacity_factor=1.0))


@pytest.mark.skipif(torch.cuda.is_available() and "cupy" in minimoe.available_backends(), reason="a GPU is here")
def test_gpu_comparison_skips_with_a_reason(capsys):
    assert benchmarks_main(["--backend", "cupy"]) == 0
    assert "skipped" in capsys.readouterr().err
