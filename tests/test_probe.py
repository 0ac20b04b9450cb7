"""minimoe.probe and benchmarks/mla_probe.py (issue 19): the token roles of a worked solution, the attention weights rebuilt from a
layer's pieces (with MLA's score split into its content and RoPE parts), the per-role losses and the policy KL."""

import os

import numpy as np
import pytest
from scipy.special import rel_entr

import minimoe
from benchmarks.mla_probe import policy_kl
from minimoe.probe import (ROLES, attention_parts, edited_source, heldout_worked, label_worked, lookup_mass, misses,
                           token_losses, trace)
from minimoe.checkpoint import load_checkpoint
from minimoe import functional as F
from minimoe.model import ModelConfig, Transformer
from minimoe.tasks import AdditionTask, Tokenizer
from minimoe.train import IGNORE

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lessons", "data")


def tiny_model(attention):
    return Transformer(ModelConfig(vocab_size=Tokenizer().vocab_size, dim=16, n_layers=2, n_heads=2,
                                   attention=attention, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                                   v_head_dim=4, n_routed_experts=4, moe_inter_dim=8, max_seq_len=48))


def test_roles_of_a_worked_solution_by_hand():
    """57+68: "<think>7+8=15 5+6+1=12</think><answer>125</answer><eos>", labelled by hand. The sequence is
    "<bos>57+68=" (positions 0-6) then the completion from position 7."""
    task, tokenizer = AdditionTask(2), Tokenizer()
    tokens, roles, columns, sources = label_worked(task, task.problem(57, 68), tokenizer)
    assert tokenizer.decode(tokens) == "<think>7+8=15 5+6+1=12</think><answer>125</answer><eos>"
    expected = [  # (role, column, source position)
        ("<think>", -1, -1),
        ("a digit", 0, 2), ("+", -1, -1), ("b digit", 0, 5), ("carry? (+ or =)", 0, -1),  # 7+8=
        ("sum digit 1", 0, -1), ("sum digit 2", 0, -1), ("space", -1, -1),  # 15, at positions 12, 13
        ("a digit", 1, 1), ("+", -1, -1), ("b digit", 1, 4), ("carry? (+ or =)", 1, -1),  # 5+6+
        ("carry 1", -1, -1), ("= after +1", -1, -1),  # 1=
        ("sum digit 1", 1, -1), ("sum digit 2", 1, -1),  # 12, at positions 21, 22
        ("</think>", -1, -1), ("<answer>", -1, -1),
        ("answer digit", 1, 21), ("answer digit", 1, 22), ("answer digit", 0, 13),  # 1 2 from "12", 5 from "15"
        ("</answer>", -1, -1), ("<eos>", -1, -1)]
    assert list(zip(roles, columns, sources)) == expected


def test_roles_cover_every_completion_token_once_and_sources_hold_the_copied_digit():
    task, tokenizer = AdditionTask(3), Tokenizer()
    data = heldout_worked(task, tokenizer, n=64)
    completion = data["targets"] != IGNORE
    np.testing.assert_array_equal(data["role"] >= 0, completion)  # a role on every completion token, none elsewhere
    counts = np.stack([(data["role"] == i).sum(axis=1) for i in range(len(ROLES))], axis=1)  # (N, roles)
    assert (counts.sum(axis=1) == completion.sum(axis=1)).all()
    assert (counts[:, ROLES.index("a digit")] == 3).all() and (counts[:, ROLES.index("<eos>")] == 1).all()
    rows, targets = np.nonzero(data["source"] >= 0)
    copied = data["ids"][rows, data["source"][rows, targets]]
    np.testing.assert_array_equal(copied, data["targets"][rows, targets])  # the source holds the very digit
    assert (data["source"][rows, targets] <= targets).all()  # visible to the query that predicts it
    assert set(ROLES[i] for i in data["role"][rows, targets]) == {"a digit", "b digit", "answer digit"}


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_rebuilt_attention_weights_reproduce_the_layer(float64, attention):
    """softmax(content + position + causal mask) @ v, through wo, is the layer's own output; the weights are
    causal distributions."""
    model = tiny_model(attention)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(3, 11))
    x = model.embed(ids)
    with minimoe.no_grad():
        attn = model.layers[0].attn
        h = model.layers[0].attn_norm(x)
        parts = attention_parts(attn, h)
        expected = attn(h).numpy()
    weights = parts["weights"]  # (B, H, T, T)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-12)
    assert (np.triu(weights, k=1) == 0).all()
    heads = weights @ parts["values"]  # (B, H, T, dv)
    rebuilt = heads.transpose(0, 2, 1, 3).reshape(3, 11, -1) @ attn.wo.weight.numpy().T
    np.testing.assert_allclose(rebuilt, expected, atol=1e-12, rtol=1e-10)
    if attention == "mla":
        score = parts["content"] + parts["position"]
        score = np.where(np.triu(np.ones((11, 11), bool), k=1), -np.inf, score)
        np.testing.assert_allclose(np.exp(score) / np.exp(score).sum(-1, keepdims=True), weights, atol=1e-12)
        assert np.abs(parts["position"]).max() > 0 and np.abs(parts["content"]).max() > 0


def test_mla_score_split_in_float32_matches_the_weights_to_1e_6():
    model = tiny_model("mla")
    data = heldout_worked(AdditionTask(3), Tokenizer(), n=8)
    logits, layers = trace(model, data["inputs"])
    np.testing.assert_allclose(logits, model(data["inputs"]).numpy(), atol=1e-5)
    for parts in layers:
        tokens = parts["weights"].shape[-1]
        score = np.where(np.triu(np.ones((tokens, tokens), bool), k=1), -np.inf,
                         parts["content"].astype(np.float64) + parts["position"])
        rebuilt = np.exp(score - score.max(-1, keepdims=True))
        np.testing.assert_allclose(rebuilt / rebuilt.sum(-1, keepdims=True), parts["weights"], atol=1e-6)


def test_token_losses_average_to_the_library_cross_entropy():
    model = tiny_model("mha")
    data = heldout_worked(AdditionTask(3), Tokenizer(), n=16)
    logits = model(data["inputs"])
    losses = token_losses(logits.numpy().astype(np.float64), data["targets"])
    counted = data["targets"] != IGNORE
    assert losses[counted].mean() == pytest.approx(F.cross_entropy(logits, data["targets"],
                                                                   ignore_index=IGNORE).item(), rel=1e-5)
    assert (losses[~counted] == 0).all()


def test_lookup_mass_finds_a_head_that_reads_the_source_one_token_late():
    data = heldout_worked(AdditionTask(3), Tokenizer(), n=8)
    batch, tokens = data["inputs"].shape
    weights = np.full((batch, 2, tokens, tokens), 1.0 / tokens)
    rows, queries = np.nonzero(data["source"] >= 0)
    weights[rows, 1, queries, :] = 0.0
    weights[rows, 1, queries, np.minimum(data["source"][rows, queries] + 1, queries)] = 1.0  # head 1: source + 1
    mask = data["role"] == ROLES.index("answer digit")
    mass = lookup_mass([{"weights": weights}], data, mask)  # (1, 2, offsets)
    assert mass[0, 1, 1] == pytest.approx(1.0) and mass[0, 1, 0] == 0.0
    assert mass[0, 0, 0] == pytest.approx(1.0 / tokens)


def test_policy_kl_is_the_kl_of_the_softmaxes():
    rng = np.random.default_rng(0)
    old, new = rng.standard_normal((2, 3, 5, 7))
    mask = rng.random((3, 5)) < 0.6
    p, q = (np.exp(z) / np.exp(z).sum(-1, keepdims=True) for z in (old, new))
    expected = (rel_entr(p, q).sum(-1) * mask).sum() / mask.sum()
    assert policy_kl(old, new, mask) == pytest.approx(expected, rel=1e-12)
    assert policy_kl(old, old + 3.0, mask) == pytest.approx(0.0, abs=1e-12)  # a shift of every logit: same policy


def test_the_committed_good_mla_base_copies_its_answer_from_the_worked_solution():
    """Lesson 08's good base writes the units digit of the answer by copying the units sum from <think>: edit that
    sum and the answer follows the edit, not the true sum."""
    model = load_checkpoint(os.path.join(DATA, "mla_base_good"), restore_random_state=False)[0].eval()
    tokenizer = Tokenizer()
    data = heldout_worked(AdditionTask(3), tokenizer, n=32)
    units = (data["role"] == ROLES.index("answer digit")) & (data["column"] == 0)
    found = edited_source(model, data, units, tokenizer)
    assert found["edited"] > 0.9 and found["true"] < 0.05


def test_misses_counts_wrong_digits_and_those_next_to_the_target():
    tokenizer = Tokenizer()
    data = heldout_worked(AdditionTask(3), tokenizer, n=4)
    mask = data["role"] == ROLES.index("answer digit")
    rows, queries = np.nonzero(mask)
    zero = tokenizer.token_to_id["0"]
    target = data["targets"][rows, queries] - zero
    guess = target.copy()
    guess[0], guess[1], guess[2] = (target[0] + 9) % 10, (target[1] + 5) % 10, (target[2] + 1) % 10  # -1, far, +1
    logits = np.zeros(data["targets"].shape + (tokenizer.vocab_size,))
    logits[rows, queries, guess + zero] = 1.0
    found = misses(logits, data, mask, tokenizer)
    assert found == {"wrong": pytest.approx(3 / len(rows)), "beside": pytest.approx(2 / 3)}


def test_keeping_only_the_content_part_is_exact_when_the_rope_key_is_zero(float64):
    """With the RoPE rows of wkv_a zeroed, k_pe = 0 and every position score is 0: keeping the content part alone
    at a head changes nothing, so trace's hand-made Block step must give the model's own logits; keeping the
    position part alone (all zeros: uniform attention) must change them."""
    model = tiny_model("mla")
    for layer in model.layers:
        layer.attn.wkv_a.weight.data[layer.attn.kv_lora_rank:] = 0.0
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(2, 9))
    expected = model(ids).numpy()
    for layer in (0, 1):
        logits, parts = trace(model, ids, only=(layer, 1, "content"))
        assert np.abs(parts[layer]["position"]).max() == 0.0
        np.testing.assert_allclose(logits, expected, atol=1e-12, rtol=1e-10)
        assert np.abs(trace(model, ids, only=(layer, 1, "position"))[0] - expected).max() > 1e-6
