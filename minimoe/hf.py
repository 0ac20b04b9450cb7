"""Weights that travel: a minimoe model to and from Hugging Face's DeepseekV3 format.

    export_hf(model_or_checkpoint, "runs/hf")      config.json, model.safetensors, tokenizer files
    model = load_hf("runs/hf")                     a minimoe Transformer from any DeepseekV3-format folder

    python -m minimoe export-hf --checkpoint runs/demo/rl_last --out runs/hf
    # then, in transformers: AutoModelForCausalLM.from_pretrained("runs/hf"), AutoTokenizer.from_pretrained(...)

The format is the one DeepSeek publishes on the Hugging Face Hub and `DeepseekV3ForCausalLM.save_pretrained`
writes: a `config.json` with model_type "deepseek_v3" and one tensor per weight in safetensors files, experts
stored one by one. Our names follow DeepSeek's reference code, theirs the Hugging Face port:

    embed                          model.embed_tokens            head          lm_head
    layers.L.attn_norm             model.layers.L.input_layernorm   ffn_norm   ...post_attention_layernorm
    attn.wq | wq_a, q_norm, wq_b   self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj
    attn.wkv_a, kv_norm, wkv_b     self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj;  attn.wo  o_proj
    ffn.w1, w3, w2 (dense layers)  mlp.gate_proj, up_proj, down_proj (also shared_experts, experts.J)
    ffn.gate.weight, gate.bias     mlp.gate.weight, mlp.gate.e_score_correction_bias

The computations agree exactly, not approximately: interleaved RoPE pairs (`rope_interleave: true`), sigmoid
scores with the top-k renormalised (`norm_topk_prob: true`) and scaled by `routed_scaling_factor`, groups scored
by the sum of their top-2 biased scores. What the format cannot say is refused, naming the field and the closest
setting it can say; nothing is exported approximately:
  - attention="mha": DeepseekV3 has Multi-head Latent Attention only.
  - score_func="softmax": its router always uses a sigmoid and renormalises the chosen scores.
  - expert groups without a bias (bias_update_speed=0): its router always has `e_score_correction_bias` and
    always scores a group by its top-2 sum; minimoe's gate without a bias scores it by its max, as
    DeepSeek-V3's reference code does (see `Gate`). Groups of one expert, too: a top-2 needs two.
Training-only settings that DeepseekV3 has no field for (dropout, router noise, capacity, balance losses, the
bias update speed) do not change what a trained model computes; they travel in a "minimoe" section of
config.json, which transformers ignores and `load_hf` reads back.

Numbers: transformers computes RMSNorm, the router and the RoPE angles in float32 even in a float64 model, so
its logits agree with ours to ~1e-7 relative in float64, and to float32 round-off in float32.

The tokenizer: minimoe's `Tokenizer` is one token per character plus seven special tokens. That is exactly a
`tokenizers` WordLevel model whose vocabulary is the characters, behind a pre-tokenizer that splits the text
into single characters, with the special tokens as "added tokens" (matched whole before the split) and a Fuse
decoder (join the pieces with nothing between them). So `tokenizer.json` is written as that JSON, and
`AutoTokenizer.from_pretrained(folder)` encodes a prompt with a leading <bos>, as minimoe's generation does.
No tokenizers package is needed to write it.
"""

import json
import os
import warnings

import numpy as np

from .autograd import get_default_dtype, set_default_dtype
from .backend import backend_of
from .model import ModelConfig, Transformer
from .tasks import Tokenizer

__all__ = ["export_hf", "load_hf", "hf_config", "model_config_from_hf", "tokenizer_files", "HFFormatError"]

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
RMS_NORM_EPS = 1e-6  # minimoe's RMSNorm epsilon (fixed)
# ModelConfig fields that do not change what a trained model computes (training settings, and MLA's absorbed
# path, which computes the same): DeepseekV3 has no field for them
TRAINING_ONLY = ("dropout", "gate_noise_std", "capacity_factor", "aux_loss_alpha", "seq_aux_alpha", "z_loss_coef",
                 "bias_update_speed", "mla_absorb")
# ModelConfig fields that have a DeepseekV3 counterpart (see hf_config)
MAPPED = ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "attention", "rope_theta", "q_lora_rank",
          "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn", "inter_dim", "n_dense_layers",
          "n_routed_experts", "n_shared_experts", "n_activated_experts", "moe_inter_dim", "score_func", "route_scale",
          "n_expert_groups", "n_limited_groups")


class HFFormatError(ValueError):
    """A model the DeepseekV3 format cannot express, or a DeepseekV3 folder minimoe cannot run exactly."""


# ==============================================================================================================
# configuration
# ==============================================================================================================

# Long because it is a table: one line for each DeepseekV3 field and one check for each setting the format cannot
# express; split up, the mapping would be harder to check against the format's documentation.
def hf_config(config, tokenizer=None):
    """The DeepseekV3 `config.json` (a dict) of a minimoe ModelConfig, or HFFormatError naming every field the
    format cannot express and the closest setting it can."""
    tokenizer = tokenizer or Tokenizer()
    c = config
    problems = []
    if c.attention != "mla":
        problems.append(f"attention={c.attention!r}: DeepseekV3 has Multi-head Latent Attention only; the closest "
                        "exportable setting is attention='mla' (a different model: train it again)")
    has_moe = c.ffn == "moe" and c.n_dense_layers < c.n_layers
    if has_moe:
        if c.score_func != "sigmoid":
            problems.append(f"score_func={c.score_func!r}: DeepseekV3's router always scores with a sigmoid and "
                            "renormalises the chosen scores; the closest exportable setting is score_func='sigmoid'")
        if c.n_expert_groups > 1 and c.bias_update_speed == 0:
            problems.append(f"n_expert_groups={c.n_expert_groups} with bias_update_speed=0: without a bias minimoe "
                            "scores a group by its best expert (DeepSeek-V3's reference rule), DeepseekV3 in "
                            "transformers always by its top-2 sum with e_score_correction_bias; export with "
                            "bias_update_speed > 0 (e.g. 1e-3, the same rule there) or n_expert_groups=1")
        if c.n_routed_experts // c.n_expert_groups < 2:
            problems.append(f"n_routed_experts={c.n_routed_experts} in n_expert_groups={c.n_expert_groups}: "
                            "DeepseekV3 sums each group's top-2 scores, so a group needs at least 2 experts; "
                            "use fewer groups")
    unknown = [f"{name}={value!r}" for name, value in c.to_dict().items()
               if name not in MAPPED + TRAINING_ONLY and value != getattr(ModelConfig, name, object())]
    if unknown:
        problems.append(f"{', '.join(unknown)}: the DeepseekV3 export does not know these fields; leave them at "
                        "their defaults to export")
    if problems:
        raise HFFormatError("export_hf: this model cannot be written as DeepseekV3 without changing what it "
                            "computes:\n  " + "\n  ".join(problems))
    if c.vocab_size < tokenizer.vocab_size:
        raise HFFormatError(f"export_hf: vocab_size={c.vocab_size} is smaller than the tokenizer's "
                            f"{tokenizer.vocab_size} tokens")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_heads,
        "max_position_embeddings": c.max_seq_len,
        # Multi-head Latent Attention
        "q_lora_rank": c.q_lora_rank or None,
        "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_interleave": True,  # pairs (x0, x1), (x2, x3), ... as DeepSeek's reference and minimoe
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "rope_theta": float(c.rope_theta),  # how transformers < 5 spells the same
        "rope_scaling": None,
        # feed-forward: the first k layers dense, then MoE
        "hidden_act": "silu",
        "intermediate_size": c.inter_dim,
        "first_k_dense_replace": c.n_dense_layers if has_moe else c.n_layers,
        "moe_intermediate_size": c.moe_inter_dim,
        "n_routed_experts": c.n_routed_experts,
        "n_shared_experts": c.n_shared_experts,
        "num_experts_per_tok": c.n_activated_experts,
        "n_group": c.n_expert_groups,
        "topk_group": c.n_limited_groups,
        "norm_topk_prob": True,
        "routed_scaling_factor": float(c.route_scale),
        "scoring_func": "sigmoid",  # the two fields of DeepSeek's own Hub config.json; transformers ignores them
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": 0,
        # the rest
        "rms_norm_eps": RMS_NORM_EPS,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "minimoe": c.to_dict(),
    }


def _rope_theta(hf):
    """rope_theta from either spelling of the RoPE settings, refusing any scaling (YaRN, linear, dynamic...)."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if scaling or kind != "default":
        raise HFFormatError(f"load_hf: rope_scaling={scaling or parameters!r}: minimoe implements plain RoPE only "
                            "(no YaRN or other scaling); the closest runnable setting drops the scaling, which "
                            "changes the model, so it is not done for you")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf):
    """A ModelConfig for a DeepseekV3 config dict, or HFFormatError naming every feature minimoe lacks."""
    if hf.get("model_type") != "deepseek_v3":
        raise HFFormatError(f"load_hf: model_type={hf.get('model_type')!r}; only 'deepseek_v3' is supported")
    problems = []
    n_layers = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    has_moe = first_dense < n_layers
    checks = [("quantization_config", hf.get("quantization_config"), None,
               "quantized weights (e.g. FP8 blocks) are not read; convert them to bfloat16 or float32 first"),
              ("hidden_act", hf.get("hidden_act", "silu"), "silu", "minimoe's experts are SwiGLU"),
              ("attention_bias", hf.get("attention_bias", False), False, "minimoe's projections have no bias"),
              ("rms_norm_eps", hf.get("rms_norm_eps", RMS_NORM_EPS), RMS_NORM_EPS, "minimoe's RMSNorm uses 1e-6")]
    if has_moe:
        checks += [("norm_topk_prob", hf.get("norm_topk_prob", True), True,
                    "minimoe's sigmoid gate always renormalises the chosen scores"),
                   ("scoring_func", hf.get("scoring_func", "sigmoid"), "sigmoid",
                    "transformers' DeepseekV3 router is a sigmoid too")]
    for name, value, supported, why in checks:
        if value != supported:
            problems.append(f"{name}={value!r} (supported: {supported!r}; {why})")
    try:
        rope_theta = _rope_theta(hf)
    except HFFormatError as error:
        problems.append(str(error).removeprefix("load_hf: "))
    if problems:
        raise HFFormatError("load_hf: this DeepseekV3 model uses features minimoe does not implement:\n  "
                            + "\n  ".join(problems))
    values = {
        "vocab_size": hf["vocab_size"], "dim": hf["hidden_size"], "n_layers": n_layers,
        "n_heads": hf["num_attention_heads"], "max_seq_len": hf.get("max_position_embeddings", 4096),
        "attention": "mla", "rope_theta": rope_theta, "q_lora_rank": hf.get("q_lora_rank") or 0,
        "kv_lora_rank": hf["kv_lora_rank"], "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"], "v_head_dim": hf["v_head_dim"],
        "inter_dim": hf["intermediate_size"], "ffn": "moe" if has_moe else "dense",
        "n_dense_layers": first_dense if has_moe else 0}
    if has_moe:
        values.update({
            "n_routed_experts": hf["n_routed_experts"], "n_shared_experts": hf.get("n_shared_experts") or 0,
            "n_activated_experts": hf["num_experts_per_tok"], "moe_inter_dim": hf["moe_intermediate_size"],
            "score_func": "sigmoid", "route_scale": float(hf.get("routed_scaling_factor", 1.0)),
            "n_expert_groups": hf.get("n_group") or 1, "n_limited_groups": hf.get("topk_group") or 1})
    # training-only settings, and the fields a dense model does not use, come back from our own section
    saved = hf.get("minimoe") or {}
    return ModelConfig.from_dict({**{k: v for k, v in saved.items() if k not in values}, **values})


# ==============================================================================================================
# weights
# ==============================================================================================================

def _names(config):
    """[(minimoe name, Hugging Face name)] of every tensor but the routed experts and the gate bias."""
    attention = (["wq"] if config.q_lora_rank == 0 else ["wq_a", "q_norm", "wq_b"]) + ["wkv_a", "kv_norm", "wkv_b",
                                                                                       "wo"]
    hf_attention = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
                    "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    mlp = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    pairs = [("embed.weight", "model.embed_tokens.weight")]
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(ours + "attn_norm.weight", theirs + "input_layernorm.weight"),
                  (ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight")]
        pairs += [(f"{ours}attn.{name}.weight", f"{theirs}self_attn.{hf_attention[name]}.weight") for name in attention]
        if config.ffn == "moe" and i >= config.n_dense_layers:
            pairs.append((ours + "ffn.gate.weight", theirs + "mlp.gate.weight"))
            if config.n_shared_experts:
                pairs += [(f"{ours}ffn.shared_experts.{w}.weight", f"{theirs}mlp.shared_experts.{p}.weight")
                          for w, p in mlp.items()]
            pairs += [(f"{ours}ffn.experts.{j}.{w}.weight", f"{theirs}mlp.experts.{j}.{p}.weight")
                      for j in range(config.n_routed_experts) for w, p in mlp.items()]
        else:
            pairs += [(f"{ours}ffn.{w}.weight", f"{theirs}mlp.{p}.weight") for w, p in mlp.items()]
    return pairs + [("norm.weight", "model.norm.weight"), ("head.weight", "lm_head.weight")]


def _moe_layers(config):
    return [i for i in range(config.n_layers) if config.ffn == "moe" and i >= config.n_dense_layers]


def _host_state(model):
    return {name: backend_of(value).to_numpy(value) for name, value in model.state_dict().items()}


def _hf_tensors(model):
    """{Hugging Face name: host array} of a minimoe Transformer."""
    config, state = model.config, _host_state(model)
    tensors = {theirs: state[ours] for ours, theirs in _names(config)}
    for i in _moe_layers(config):
        theirs = f"model.layers.{i}.mlp."
        bias = state.get(f"layers.{i}.ffn.gate.bias")
        tensors[theirs + "gate.e_score_correction_bias"] = \
            bias if bias is not None else np.zeros(config.n_routed_experts, dtype=state["norm.weight"].dtype)
        if not config.n_shared_experts:  # DeepseekV3 always builds shared experts: here of width 0, adding 0
            dtype = state["norm.weight"].dtype
            tensors.update({theirs + "shared_experts.gate_proj.weight": np.zeros((0, config.dim), dtype),
                            theirs + "shared_experts.up_proj.weight": np.zeros((0, config.dim), dtype),
                            theirs + "shared_experts.down_proj.weight": np.zeros((config.dim, 0), dtype)})
    return {name: np.ascontiguousarray(array) for name, array in tensors.items()}


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _read_safetensors(path):
    """{name: host array} of one safetensors file. bfloat16 (the Hub's usual dtype, which NumPy lacks) is widened
    to float32 exactly: its 16 bits are the top half of a float32's."""
    import safetensors

    with open(path, "rb") as file:
        entries = safetensors.deserialize(file.read())
    tensors = {}
    for name, entry in entries:
        dtype, shape, data = entry["dtype"], entry["shape"], entry["data"]
        if dtype == "BF16":
            array = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            array = np.frombuffer(data, dtype=np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise HFFormatError(f"load_hf: {path}: tensor {name} has dtype {dtype}, which minimoe cannot read "
                                "(quantized weights? convert them to bfloat16 or float32 first)")
        tensors[name] = array.reshape(shape)
    return tensors


def _read_weights(folder):
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as file:
            files = sorted(set(json.load(file)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        raise HFFormatError(f"load_hf: {folder} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    tensors = {}
    for name in files:
        tensors.update(_read_safetensors(os.path.join(folder, name)))
    return tensors


def _rotate_half_to_interleaved(weight, n_heads, head_dim, rope_dim):
    """Reorder the RoPE rows of a projection written for rotate-half pairs (x_i, x_{i+D/2}) into interleaved pairs
    (x_2i, x_2i+1): row 2i takes row i and row 2i+1 takes row i+D/2, in each head's last rope_dim rows."""
    order = np.stack([np.arange(rope_dim // 2), np.arange(rope_dim // 2) + rope_dim // 2], axis=1).reshape(-1)
    rows = weight.reshape(n_heads, head_dim, -1).copy()
    rows[:, head_dim - rope_dim:] = rows[:, head_dim - rope_dim:][:, order]
    return rows.reshape(weight.shape)


def _minimoe_state(tensors, config, hf):
    """{minimoe name: host array} from the Hugging Face tensors; HFFormatError listing missing/unexpected ones."""
    tensors = dict(tensors)
    if hf.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")
    for i in _moe_layers(config):  # transformers >= 5 may hold the experts fused: split them
        theirs = f"model.layers.{i}.mlp.experts."
        if theirs + "gate_up_proj" in tensors:
            gate_up = tensors.pop(theirs + "gate_up_proj")  # (E, 2I, dim): w1 rows, then w3 rows
            down = tensors.pop(theirs + "down_proj")  # (E, dim, I)
            for j in range(config.n_routed_experts):
                gate, up = np.split(gate_up[j], 2, axis=0)
                tensors.update({f"{theirs}{j}.gate_proj.weight": gate, f"{theirs}{j}.up_proj.weight": up,
                                f"{theirs}{j}.down_proj.weight": down[j]})
    state, missing = {}, []
    for ours, theirs in _names(config):
        if theirs in tensors and tensors[theirs] is not None:
            state[ours] = tensors.pop(theirs)
        else:
            missing.append(theirs)
    for i in _moe_layers(config):
        theirs = f"model.layers.{i}.mlp."
        bias = tensors.pop(theirs + "gate.e_score_correction_bias", None)
        if bias is None:
            missing.append(theirs + "gate.e_score_correction_bias")
        elif config.bias_update_speed > 0:
            state[f"layers.{i}.ffn.gate.bias"] = bias
        elif np.any(bias != 0):
            raise HFFormatError(f"load_hf: {theirs}gate.e_score_correction_bias is not zero, but the config's "
                                "minimoe section says bias_update_speed=0 (a gate without a bias)")
        if not config.n_shared_experts:
            for p in ("gate_proj", "up_proj", "down_proj"):
                shared = tensors.pop(f"{theirs}shared_experts.{p}.weight", None)
                if shared is not None and shared.size:
                    raise HFFormatError(f"load_hf: {theirs}shared_experts.{p}.weight is not empty, but "
                                        "n_shared_experts is 0")
    mtp = [name for name in tensors if name.startswith("model.layers.")
           and int(name.split(".")[2]) >= config.n_layers]
    if mtp:
        warnings.warn(f"load_hf: skipped {len(mtp)} tensors of layers ≥ {config.n_layers} (the multi-token "
                      "prediction modules, num_nextn_predict_layers); next-token prediction does not use them")
        for name in mtp:
            del tensors[name]
    unexpected = [name for name in tensors if not name.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise HFFormatError("load_hf: the weights do not match the config: "
                            + "; ".join(([f"missing {missing}"] if missing else [])
                                        + ([f"unexpected {unexpected}"] if unexpected else [])))
    if hf.get("rope_interleave", True) is False:
        for i in range(config.n_layers):
            name = f"layers.{i}.attn." + ("wq" if config.q_lora_rank == 0 else "wq_b") + ".weight"
            state[name] = _rotate_half_to_interleaved(state[name], config.n_heads,
                                                      config.qk_nope_head_dim + config.qk_rope_head_dim,
                                                      config.qk_rope_head_dim)
            name = f"layers.{i}.attn.wkv_a.weight"
            state[name] = _rotate_half_to_interleaved(state[name], 1, state[name].shape[0], config.qk_rope_head_dim)
    return state


# ==============================================================================================================
# the tokenizer
# ==============================================================================================================

def tokenizer_files(tokenizer=None, max_length=None):
    """{file name: JSON-ready dict}: tokenizer.json (the `tokenizers` format: see the module docstring),
    tokenizer_config.json and special_tokens_map.json. max_length: the model's max_seq_len."""
    tokenizer = tokenizer or Tokenizer()
    specials = [t for t in tokenizer.tokens if t.startswith("<")]
    bos, eos, pad = (tokenizer.tokens[i] for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id))
    added = [{"id": tokenizer.token_to_id[t], "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for t in specials]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": False},
        "post_processor": {  # a leading <bos>, as minimoe's generation puts before every prompt
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": dict(tokenizer.token_to_id), "unk_token": "<unk>"},
    }
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                        "clean_up_tokenization_spaces": False, "add_bos_token": True,
                        "padding_side": "left",  # prompts of different lengths generate together, ends aligned
                        **special_map}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special_map}


# ==============================================================================================================
# export and load
# ==============================================================================================================

def _write_json(path, value):
    with open(path, "w") as file:
        json.dump(value, file, indent=2, ensure_ascii=False)
        file.write("\n")


def export_hf(model_or_checkpoint, out_dir, tokenizer=None):
    """Write a minimoe Transformer (or the checkpoint at a path) as a DeepseekV3 model folder that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads: config.json, generation_config.json,
    model.safetensors (the model's dtype), tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    Raises HFFormatError, before writing anything, if the format cannot express the model exactly.
    Returns out_dir."""
    from safetensors.numpy import save_file

    model = model_or_checkpoint
    if not isinstance(model, Transformer):
        from .checkpoint import load_checkpoint

        model = load_checkpoint(str(model_or_checkpoint))[0]
    tokenizer = tokenizer or Tokenizer()
    config = hf_config(model.config, tokenizer)
    if os.path.exists(os.path.join(out_dir, INDEX_FILE)):
        raise HFFormatError(f"export_hf: {out_dir} already holds a sharded model ({INDEX_FILE}), whose shards "
                            "would be read instead of the new weights; choose another folder or empty this one")
    tensors = _hf_tensors(model)
    config["dtype"] = str(tensors["lm_head.weight"].dtype)
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    save_file(tensors, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes a private file; a model folder is for sharing
    _write_json(os.path.join(out_dir, CONFIG_FILE), config)
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id})
    for name, value in tokenizer_files(tokenizer, model.config.max_seq_len).items():
        _write_json(os.path.join(out_dir, name), value)
    return out_dir


def load_hf(folder, dtype=None):
    """A minimoe Transformer from a DeepseekV3 model folder (config.json and model.safetensors, or shards listed
    in model.safetensors.index.json), in `dtype` (default: minimoe's default dtype) on the current backend.
    Raises HFFormatError naming any feature minimoe does not implement (RoPE scaling such as YaRN,
    norm_topk_prob=false, quantized weights, ...) and any missing or unexpected tensor. Rotate-half RoPE
    (rope_interleave=false) is converted exactly by reordering rows. Multi-token-prediction layers are skipped
    with a warning."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise HFFormatError(f"load_hf: {path} does not exist")
    with open(path) as file:
        hf = json.load(file)
    config = model_config_from_hf(hf)
    state = _minimoe_state(_read_weights(folder), config, hf)
    previous = get_default_dtype()
    set_default_dtype(dtype or previous)
    try:
        model = Transformer(config)
    finally:
        set_default_dtype(previous)
    model.load_state_dict(state)
    return model.eval()
