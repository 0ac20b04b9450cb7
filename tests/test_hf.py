"""The Hugging Face export and import (minimoe/hf.py) against transformers' own DeepseekV3ForCausalLM.

Exported models load in transformers with no missing or unexpected key and give our logits: in float64 to ~1e-7
relative (transformers computes RMSNorm, the router and the RoPE angles in float32), in float32 to round-off.
Greedy generation gives the same tokens. A randomly initialised DeepseekV3ForCausalLM saved by transformers
(sharded, rotate-half or interleaved RoPE, fused or per-expert) loads into minimoe with the same logits. What the
format cannot express is refused, in both directions. CPU only; skipped where transformers is not installed."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import minimoe  # noqa: E402
from minimoe.generate import generate  # noqa: E402
from minimoe.hf import HFFormatError, export_hf, load_hf  # noqa: E402
from minimoe.model import ModelConfig, Transformer  # noqa: E402
from minimoe.tasks import AdditionTask, Tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # width-0 shared experts

FLOAT64_RTOL = 1e-6  # of the largest logit: transformers' float32 norms, router and RoPE angles (~1e-7 measured)
FLOAT32_RTOL = 2e-6  # both sides in float32: round-off in different orders of summation (~2.5e-7 measured)

TINY = dict(vocab_size=Tokenizer().vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=48, attention="mla",
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=48, moe_inter_dim=16,
            n_routed_experts=8, n_activated_experts=2, score_func="sigmoid")

CONFIGS = {
    "plain_v3": dict(),
    "q_lora_groups_dense_first": dict(n_layers=3, q_lora_rank=16, n_expert_groups=4, n_limited_groups=2,
                                      n_dense_layers=1, route_scale=2.5),
    "two_shared_top3_rope_theta": dict(n_shared_experts=2, n_activated_experts=3, rope_theta=500.0),
    "no_shared_experts": dict(n_shared_experts=0, n_expert_groups=2, n_limited_groups=1),
    "dense": dict(ffn="dense", q_lora_rank=8),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: a second torch thread only spin-waits (badly, on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(bias_scale=0.0, seed=0, **overrides):
    """A tiny V3-style minimoe model in eval mode; each gate's bias set to N(0, bias_scale²) when it has one."""
    minimoe.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    rng = np.random.default_rng(seed)
    for moe in model.moe_layers():
        if moe.gate.bias is not None:
            moe.gate.bias = minimoe.get_backend().asarray(rng.normal(scale=bias_scale, size=moe.gate.bias.shape),
                                                          dtype=moe.gate.bias.dtype)
    return model


def load_transformers(folder, dtype):
    """from_pretrained with the eager expert loop (its grouped-GEMM path has no float64), checking the keys."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, output_loading_info=True, experts_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    return model.eval()


def their_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids)).logits.numpy()


def assert_logits_close(ours, theirs, rtol):
    scale = np.abs(ours).max()
    error = np.abs(ours - theirs).max()
    assert error <= rtol * scale, f"max |Δ logit| {error:.2e} > {rtol:.0e} × max |logit| {scale:.2f}"


def token_ids(shape, seed=1):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], size=shape)


# ---- export: transformers computes what minimoe computes -----------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, float64, name):
    model = make_model(**CONFIGS[name])
    export_hf(model, tmp_path)
    ids = token_ids((3, 24))
    assert_logits_close(model(ids).data, their_logits(load_transformers(tmp_path, torch.float64), ids),
                        FLOAT64_RTOL)


def test_a_bias_that_changes_routing_is_exported(tmp_path, float64):
    """The aux-loss-free bias decides which experts run: here it changes the choice of many tokens of the first
    MoE layer, and transformers (e_score_correction_bias) follows the biased choice."""
    model = make_model(bias_scale=0.2, n_expert_groups=4, n_limited_groups=2)
    ids = token_ids((2, 24))
    block, gate = model.layers[0], model.moe_layers()[0].gate
    x = model.embed(ids)
    gate_input = block.ffn_norm(x + block.attn(block.attn_norm(x)))  # (B, T, dim)
    biased = gate(gate_input).indices
    bias, gate.bias = gate.bias, np.zeros_like(gate.bias)
    unbiased = gate(gate_input).indices
    gate.bias = bias
    assert (np.sort(biased, axis=-1) != np.sort(unbiased, axis=-1)).any(axis=-1).mean() > 0.2
    export_hf(model, tmp_path)
    assert_logits_close(model(ids).data, their_logits(load_transformers(tmp_path, torch.float64), ids),
                        FLOAT64_RTOL)


def test_float32_export_matches_transformers_default_path(tmp_path):
    """A model as minimoe trains it (float32), loaded as a transformers user would (the default expert kernels)."""
    model = make_model(bias_scale=0.05, q_lora_rank=16, n_expert_groups=2, n_limited_groups=1)
    export_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_model.dtype == torch.float32
    ids = token_ids((2, 20))
    assert_logits_close(model(ids).data, their_logits(hf_model, ids), FLOAT32_RTOL)


def test_greedy_generation_gives_the_same_tokens(tmp_path, float64):
    """Held-out addition prompts, encoded by the exported tokenizer as by minimoe's, continued greedily by both."""
    model = make_model(bias_scale=0.05, q_lora_rank=16, n_expert_groups=2, n_limited_groups=1, n_dense_layers=1,
                       n_layers=3)
    export_hf(model, tmp_path)
    tokenizer = Tokenizer()
    problems = AdditionTask(3).sample(np.random.default_rng(0), 6, split="test")
    prompts = [p.prompt for p in problems]
    ours = np.array([tokenizer.encode("<bos>" + p) for p in prompts])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    theirs = hf_tokenizer(prompts, return_tensors="pt")["input_ids"]
    np.testing.assert_array_equal(theirs.numpy(), ours)
    new = 30
    mine = generate(model, ours, new, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, greedy=True).responses
    with torch.no_grad():
        out = load_transformers(tmp_path, torch.float64).generate(theirs, max_new_tokens=new, do_sample=False)
    out = out[:, ours.shape[1]:].numpy()
    np.testing.assert_array_equal(out, mine[:, :out.shape[1]])
    assert (out.shape[1] == new or (mine[:, out.shape[1]:] == tokenizer.pad_id).all())
    decoded = hf_tokenizer.batch_decode(out)
    assert decoded == [tokenizer.decode(row) for row in out]


def test_prompts_of_different_lengths_generate_together(tmp_path, float64):
    """The exported tokenizer pads on the left, so transformers generates a batch of uneven prompts in one call;
    each continuation equals minimoe's greedy continuation of that prompt alone (RoPE scores depend on relative
    positions only, and the padding is masked)."""
    model = make_model(bias_scale=0.05)
    export_hf(model, tmp_path)
    tokenizer = Tokenizer()
    prompts = ["7+5=", "347+589=", "12+4="]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    batch = hf_tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = load_transformers(tmp_path, torch.float64).generate(**batch, max_new_tokens=12, do_sample=False)
    for row, prompt in zip(out[:, batch["input_ids"].shape[1]:].numpy(), prompts):
        ids = np.array([tokenizer.encode("<bos>" + prompt)])
        mine = generate(model, ids, 12, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, greedy=True).responses[0]
        np.testing.assert_array_equal(row, mine[:len(row)])


def test_tokenizer_json_matches_minimoe_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    export_hf(make_model(), tmp_path)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer()
    text = "12+34=<think>4+2=6 3+1=4</think><answer>46</answer><eos>"
    assert theirs.encode(text).ids == ours.encode("<bos>" + text)
    assert theirs.decode(ours.encode(text), skip_special_tokens=False) == text
    assert theirs.get_vocab_size() == ours.vocab_size
    with pytest.raises(Exception):
        theirs.encode("12a")  # not in the vocabulary: refused, as minimoe refuses it


def test_the_shipped_v3_preset_exports_exactly(tmp_path, float64):
    """minimoe/presets/v3.json (`python -m minimoe demo`'s default preset) is DeepSeek-V3's
    architecture in miniature: MLA, sigmoid gate, shared expert, aux-loss-free bias (route scale 1 and one group
    at 8 experts: lesson 08 section 8 measured why)."""
    from importlib import resources

    preset = json.loads((resources.files("minimoe") / "presets" / "v3.json").read_text())
    assert set(preset) <= {"model", "pretrain", "grpo"}  # the task and evaluation stay the demo's
    overrides = preset["model"]
    assert overrides["attention"] == "mla" and overrides["score_func"] == "sigmoid"
    model = Transformer(ModelConfig(vocab_size=Tokenizer().vocab_size, **overrides)).eval()  # the demo's shape
    for moe in model.moe_layers():
        moe.gate.bias = np.random.default_rng(0).normal(scale=0.05, size=moe.gate.bias.shape)
    export_hf(model, tmp_path)
    ids = token_ids((2, 24))
    assert_logits_close(model(ids).data, their_logits(load_transformers(tmp_path, torch.float64), ids),
                        FLOAT64_RTOL)


def test_the_demo_base_model_runs_in_transformers(tmp_path, float64):
    """The model the demo trains by default, as it ships with lesson 10 (the v3 preset, pretrained): exported by the
    CLI, loaded by transformers, it gives minimoe's logits and minimoe's greedy answers to held-out problems."""
    from minimoe.checkpoint import load_checkpoint
    from minimoe.cli import main

    checkpoint = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lessons", "data",
                              "v3_base_addition3")
    main(["export-hf", "--checkpoint", checkpoint, "--out", str(tmp_path / "hf")])
    model = load_checkpoint(checkpoint, restore_random_state=False)[0].eval()
    hf_model = load_transformers(tmp_path / "hf", torch.float64)
    tokenizer = Tokenizer()
    prompts = [p.prompt for p in AdditionTask(3).sample(np.random.default_rng(0), 8, split="test")]
    ours = np.array([tokenizer.encode("<bos>" + p) for p in prompts])  # (8, 9)
    assert_logits_close(model(ours).data, their_logits(hf_model, ours), FLOAT64_RTOL)
    mine = generate(model, ours, 12, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, greedy=True).responses
    with torch.no_grad():
        out = hf_model.generate(torch.from_numpy(ours), max_new_tokens=12, do_sample=False)[:, ours.shape[1]:]
    np.testing.assert_array_equal(out.numpy(), mine[:, :out.shape[1]])


# ---- round trip ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["q_lora_groups_dense_first", "no_shared_experts", "dense"])
def test_export_then_load_gives_identical_arrays(tmp_path, name):
    model = make_model(bias_scale=0.1, **CONFIGS[name], dropout=0.1, z_loss_coef=1e-3)
    export_hf(model, tmp_path)
    loaded = load_hf(tmp_path)
    assert loaded.config == model.config  # the training-only fields come back from config.json's minimoe section
    ours, back = model.state_dict(), loaded.state_dict()
    assert sorted(ours) == sorted(back)
    for name_ in ours:
        assert back[name_].dtype == ours[name_].dtype
        np.testing.assert_array_equal(back[name_], ours[name_], err_msg=name_)


def test_export_from_a_checkpoint_path_and_from_another_backend(tmp_path):
    from minimoe.checkpoint import save_checkpoint

    with minimoe.use_backend("fakegpu"):
        model = make_model(bias_scale=0.1)
        save_checkpoint(tmp_path / "ckpt", model)
    export_hf(str(tmp_path / "ckpt"), tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], minimoe.backend._backend("fakegpu").to_numpy(value))


def test_cli_export_hf(tmp_path):
    from minimoe.checkpoint import save_checkpoint
    from minimoe.cli import main

    model = make_model()
    save_checkpoint(tmp_path / "ckpt", model)
    main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "hf"))


# ---- import of a model made by transformers --------------------------------------------------------------------

def random_transformers_model(folder, rope_interleave=True, q_lora_rank=12, shard=False):
    """A randomly initialised DeepseekV3ForCausalLM (float64), with weights and biases large enough that routing
    and attention are far from uniform, saved with save_pretrained."""
    config = transformers.DeepseekV3Config(
        vocab_size=40, hidden_size=24, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=6,
        routed_scaling_factor=1.5, kv_lora_rank=10, q_lora_rank=q_lora_rank, qk_rope_head_dim=6, v_head_dim=5,
        qk_nope_head_dim=7, n_group=3, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=64, rope_interleave=rope_interleave, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).to(torch.float64).eval()
    model.set_experts_implementation("eager")  # the grouped-GEMM kernels have no float64
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.3)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(folder, max_shard_size="20KB" if shard else "5GB")
    return model


@pytest.mark.parametrize("rope_interleave, q_lora_rank, shard", [(True, 12, False), (False, None, True)])
def test_import_of_a_transformers_model(tmp_path, float64, rope_interleave, q_lora_rank, shard):
    reference = random_transformers_model(tmp_path, rope_interleave, q_lora_rank, shard)
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == shard
    model = load_hf(tmp_path)
    assert model.config.attention == "mla" and model.config.n_expert_groups == 3
    assert model.config.q_lora_rank == (q_lora_rank or 0)
    ids = np.random.default_rng(4).integers(0, 40, size=(2, 30))
    assert_logits_close(model(ids).data, their_logits(reference, ids), FLOAT64_RTOL)


def test_import_of_fused_expert_tensors(tmp_path, float64):
    """transformers keeps the experts fused (gate_up_proj (E, 2I, d), down_proj (E, d, I)); a file written that
    way loads too."""
    from safetensors.numpy import save_file

    reference = random_transformers_model(tmp_path)
    tensors = {name: value.numpy() for name, value in reference.state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors
    ids = np.random.default_rng(4).integers(0, 40, size=(2, 30))
    assert_logits_close(load_hf(tmp_path)(ids).data, their_logits(reference, ids), FLOAT64_RTOL)


# ---- refusals ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field, closest", [
    (dict(attention="mha"), "attention='mha'", "attention='mla'"),
    (dict(score_func="softmax"), "score_func='softmax'", "score_func='sigmoid'"),
    (dict(n_expert_groups=2, n_limited_groups=1, bias_update_speed=0.0), "bias_update_speed=0",
     "bias_update_speed > 0"),
    (dict(n_expert_groups=8, n_limited_groups=4), "n_expert_groups=8", "fewer groups"),
])
def test_export_refuses_what_deepseek_v3_cannot_express(tmp_path, overrides, field, closest):
    model = make_model(**overrides)
    with pytest.raises(HFFormatError) as error:
        export_hf(model, tmp_path / "out")
    assert field in str(error.value) and closest in str(error.value)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_the_classic_model_is_refused_with_both_fields_named(tmp_path):
    """ModelConfig's own defaults, the classic preset (MHA attention, softmax gate), name both fields at once."""
    with pytest.raises(HFFormatError, match="attention='mha'.*\n.*score_func='softmax'"):
        export_hf(Transformer(ModelConfig()), tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                           "original_max_position_embeddings": 16}), "YaRN"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(norm_topk_prob=False), "norm_topk_prob=False"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="llama"), "model_type='llama'"),
])
def test_load_refuses_features_minimoe_lacks(tmp_path, change, message):
    export_hf(make_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(HFFormatError, match=message):
        load_hf(tmp_path)


def test_load_refuses_missing_and_unexpected_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    export_hf(make_model(), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.extra.weight"] = tensors.pop("model.layers.1.self_attn.o_proj.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFFormatError, match="missing.*o_proj.*unexpected.*extra"):
        load_hf(tmp_path)


def test_load_skips_multi_token_prediction_layers_with_a_warning(tmp_path):
    """DeepSeek's Hub checkpoints carry the MTP module as one more layer (model.layers.61 in V3)."""
    from safetensors.numpy import load_file, save_file

    model = make_model()
    export_hf(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.2.eh_proj.weight"] = np.zeros((32, 64), dtype=np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="skipped 1 tensors of layers ≥ 2"):
        loaded = load_hf(tmp_path)
    np.testing.assert_array_equal(loaded.state_dict()["head.weight"], model.state_dict()["head.weight"])


def test_import_of_bfloat16_weights(tmp_path):
    """The Hub's usual dtype, which NumPy lacks: widened to float32 exactly."""
    reference = random_transformers_model(tmp_path).to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    ours = model.state_dict()
    assert ours["embed.weight"].dtype == np.float32
    np.testing.assert_array_equal(ours["embed.weight"], reference.model.embed_tokens.weight.detach().float().numpy())
    np.testing.assert_array_equal(ours["layers.1.ffn.experts.4.w3.weight"],
                                  reference.model.layers[1].mlp.experts.gate_up_proj[4, 12:].detach().float().numpy())
