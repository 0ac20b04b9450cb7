"""Generation: the cache changes nothing but speed, sequences stop at their own EOS, and the sampling filters
(temperature, top-k, top-p) keep exactly the tokens they should."""

import numpy as np
import pytest

import minimoe
from minimoe.autograd import Tensor
from minimoe.generate import filter_logits, generate, sample_next
from minimoe.model import ModelConfig, Transformer
from minimoe.testing import to_numpy

EOS, PAD = 2, 0
SMALL = dict(vocab_size=13, dim=16, n_layers=2, n_heads=2, max_seq_len=24, kv_lora_rank=8, qk_nope_head_dim=4,
             qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=8)


@pytest.mark.parametrize("attention", ["mha", "mla"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_generation_with_cache_equals_generation_without(backend, float64, attention, greedy):
    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(attention=attention, **SMALL))
    prompts = minimoe.get_backend().asarray(np.random.default_rng(0).integers(3, 13, (5, 4)))
    runs = []
    for use_cache in (True, False):
        generator = minimoe.get_backend().random_generator(7)
        runs.append(generate(model, prompts, 12, EOS, PAD, greedy=greedy, use_cache=use_cache, generator=generator))
    np.testing.assert_array_equal(to_numpy(runs[0].tokens), to_numpy(runs[1].tokens))
    np.testing.assert_array_equal(to_numpy(runs[0].lengths), to_numpy(runs[1].lengths))


class ScriptedModel:
    """Stands in for a Transformer: row b emits script[b][t] at its t-th generated step (as a one-hot logit)."""

    def __init__(self, script, vocab=8, max_seq_len=32):
        self.script, self.vocab, self.training = np.array(script), vocab, True
        self.config = type("Config", (), {"max_seq_len": max_seq_len})
        self.prompt_length = None

    def __call__(self, ids, start_pos=0, caches=None):
        if self.prompt_length is None:
            self.prompt_length = ids.shape[1]
        step = start_pos + ids.shape[1] - self.prompt_length  # generated tokens so far
        logits = np.full((ids.shape[0], ids.shape[1], self.vocab), -10.0)
        logits[np.arange(ids.shape[0]), -1, self.script[:, step]] = 10.0
        return Tensor(minimoe.get_backend().asarray(logits))

    def new_caches(self, batch, length):
        return [None]

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode


def test_each_sequence_stops_at_its_own_eos_and_is_padded_after():
    script = [[5, 6, EOS, 7, 7, 7],
              [EOS, 5, 5, 5, 5, 5],
              [5, 5, 5, 5, 5, 5]]
    model = ScriptedModel(script)
    out = generate(model, np.array([[1, 3], [1, 4], [1, 3]]), 5, EOS, PAD, greedy=True)
    assert out.responses.tolist() == [[5, 6, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 5, 5, 5, 5]]
    assert out.lengths.tolist() == [3, 1, 5]
    assert out.finished.tolist() == [True, True, False]
    assert out.tokens[:, :2].tolist() == [[1, 3], [1, 4], [1, 3]]
    assert model.training, "generate restores the training mode it found"


def test_generation_stops_early_once_every_sequence_finished():
    calls = []

    class Counting(ScriptedModel):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    out = generate(Counting([[EOS] + [5] * 9] * 2), np.array([[1], [1]]), 8, EOS, PAD, greedy=True)
    assert len(calls) == 1, "the prefill already produced EOS for every row: no further forward passes"
    assert out.lengths.tolist() == [1, 1]


def test_top_k_keeps_the_k_largest(backend):
    logits = minimoe.get_backend().asarray(np.array([[0.1, 2.0, -1.0, 1.5, 0.3]]))
    kept = np.isfinite(to_numpy(filter_logits(logits, top_k=2)))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus(backend):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 9)) * 2
    for top_p in (0.1, 0.5, 0.9, 1.0):
        kept = np.isfinite(to_numpy(filter_logits(minimoe.get_backend().asarray(logits), top_p=top_p)))
        probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        for row, keep in zip(probabilities, kept):  # brute force: add tokens from the most likely until ≥ top_p
            order = np.argsort(-row)
            needed = int(np.searchsorted(np.cumsum(row[order]), top_p) + 1)
            expected = np.zeros_like(keep)
            expected[order[:min(needed, len(row))]] = True
            assert keep.tolist() == expected.tolist(), f"top_p={top_p}"


def test_sampling_follows_softmax_with_temperature(backend):
    logits = np.log(np.array([[0.5, 0.3, 0.2]]))
    batch = np.repeat(logits, 20000, axis=0)
    generator = minimoe.get_backend().random_generator(0)
    for temperature in (1.0, 0.5):
        draws = to_numpy(sample_next(minimoe.get_backend().asarray(batch), temperature, generator=generator))
        expected = np.array([0.5, 0.3, 0.2]) ** (1 / temperature)
        expected /= expected.sum()
        frequencies = np.bincount(draws, minlength=3) / len(draws)
        np.testing.assert_allclose(frequencies, expected, atol=0.015)


def test_bad_arguments_are_refused(float64):
    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=24"):
        generate(model, np.ones((1, 20), dtype=np.int64), 10, EOS, PAD)
    with pytest.raises(ValueError, match="temperature=0.0 must be a finite number > 0"):
        sample_next(np.zeros((1, 3)), temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        filter_logits(np.zeros((1, 3)), top_p=1.5)
