"""The sampler is honest: the probability with which RL's rollout drew each token (cached decoding, one position
at a time) is the probability the GRPO loss later assigns to it (`token_logprobs`, one forward pass over the
whole sequence). If the two disagreed — a cache that stores the wrong positions, a RoPE offset, an absorbed
MLA path that drifts from the plain one — the policy gradient would push on a policy nobody sampled from, and the
run would look exactly like a GRPO collapse. So: record the logits the sampler actually used, and compare."""

import numpy as np
import pytest

import minimoe
import minimoe.generate as generate_module
from minimoe.generate import sample_responses
from minimoe.model import ModelConfig, Transformer
from minimoe.rl import token_logprobs
from minimoe.tasks import AdditionTask, Tokenizer
from minimoe.testing import to_numpy

TEMPERATURE = 0.8  # not 1: the re-scoring must divide by the same temperature as the sampler
SMALL = dict(dim=32, n_layers=2, n_heads=4, max_seq_len=48, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16,
             inter_dim=64)
ARCHITECTURES = {
    "mha-dense": dict(attention="mha", ffn="dense"),
    "mha-moe": dict(attention="mha", ffn="moe"),
    "mla-dense": dict(attention="mla", ffn="dense"),
    "mla-moe": dict(attention="mla", ffn="moe"),
    "mla-absorbed-dense": dict(attention="mla", ffn="dense", mla_absorb=True),
    "mla-absorbed-moe": dict(attention="mla", ffn="moe", mla_absorb=True, score_func="sigmoid"),
}


def _peaked_model(architecture):
    """A random model whose weights are scaled up so its next-token distributions are far from uniform (an
    untrained model's are nearly flat, and a flat distribution hides a wrong cache)."""
    model = Transformer(ModelConfig(vocab_size=Tokenizer().vocab_size, **SMALL, **ARCHITECTURES[architecture]))
    for name, p in model.named_parameters():
        if p.data.ndim == 2 and "norm" not in name:
            p.data *= 8.0 if name in ("embed.weight", "head.weight") else 3.0
    return model


def _recorded_rollout(model, monkeypatch, n_problems=6, group=4, max_new_tokens=24):
    """Sample like GRPO's rollout and keep what the sampler saw: the logits (B, V) it drew each token from."""
    seen = []
    original = generate_module.sample_next

    def recording_sample_next(logits, *args, **kwargs):
        ids = original(logits, *args, **kwargs)
        seen.append((to_numpy(logits).astype(np.float64), to_numpy(ids)))
        return ids

    monkeypatch.setattr(generate_module, "sample_next", recording_sample_next)
    problems = AdditionTask(3).sample(np.random.default_rng(0), n_problems, split="train")
    responses = sample_responses(model, problems, Tokenizer(), group, max_new_tokens, temperature=TEMPERATURE,
                                 generator=minimoe.get_backend().random_generator(3))
    prompt_length = len(Tokenizer().encode("<bos>" + problems[0].prompt))
    assert len({len(p.prompt) for p in problems}) == 1  # one generate() call: rows are in order
    return responses, seen, prompt_length


def _sampler_logprobs(responses, seen, prompt_length, width):
    """log softmax(logits / T)[sampled token] at the position that predicted it, (B, width), NaN elsewhere."""
    out = np.full((len(responses.texts), width), np.nan)
    for step, (logits, ids) in enumerate(seen):
        scaled = logits / TEMPERATURE
        log_p = scaled - scaled.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        out[:, prompt_length - 1 + step] = log_p[np.arange(len(ids)), ids]
    return out


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_sampled_tokens_are_rescored_with_the_probability_they_were_drawn_with(architecture, monkeypatch):
    model = _peaked_model(architecture)
    responses, seen, prompt_length = _recorded_rollout(model, monkeypatch)
    mask = to_numpy(responses.response_mask)  # (B, L-1): positions whose next token is a response token
    rescored = to_numpy(token_logprobs(model, responses.tokens, TEMPERATURE)[0].data).astype(np.float64)
    sampled = _sampler_logprobs(responses, seen, prompt_length, mask.shape[1])
    assert mask.sum() > 100 and not np.isnan(sampled[mask]).any()
    assert to_numpy(model.head.weight.data).dtype == np.float32  # the float32 the RL loop runs in
    assert sampled[mask].std() > 0.5  # the distributions are peaked enough for a cache error to show
    np.testing.assert_allclose(rescored[mask], sampled[mask], rtol=0, atol=5e-5)

    # the check has teeth: re-scoring at the wrong temperature, or one position off, is far outside the tolerance
    wrong_temperature = to_numpy(token_logprobs(model, responses.tokens, 1.0)[0].data)
    assert np.abs(wrong_temperature[mask] - sampled[mask]).max() > 1e-2
    shifted = np.roll(rescored, 1, axis=1)
    assert np.abs(shifted[mask] - sampled[mask]).max() > 1e-2


def test_absorbed_and_plain_mla_score_the_sampled_tokens_alike(monkeypatch):
    """Sampling with the absorbed latent cache and re-scoring with the plain path (the two share parameters)."""
    model = _peaked_model("mla-absorbed-moe")
    responses, seen, prompt_length = _recorded_rollout(model, monkeypatch)
    for layer in model.layers:
        layer.attn.absorb = False
    mask = to_numpy(responses.response_mask)
    rescored = to_numpy(token_logprobs(model, responses.tokens, TEMPERATURE)[0].data)
    sampled = _sampler_logprobs(responses, seen, prompt_length, mask.shape[1])
    np.testing.assert_allclose(rescored[mask], sampled[mask], rtol=0, atol=5e-5)
