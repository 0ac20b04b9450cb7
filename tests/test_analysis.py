"""Routing analysis (minimoe/analysis.py): the token categories, the tables and their information, the shuffled null,
and the interventions (bias, ablation) on a real model. Expected values are worked out by hand here."""

import math

import numpy as np
import pytest

import minimoe
from minimoe import analysis
from minimoe.model import ModelConfig, Transformer
from minimoe.tasks import Tokenizer
from minimoe.testing import to_numpy

SMALL = dict(vocab_size=26, dim=16, n_layers=2, n_heads=2, max_seq_len=48, n_routed_experts=4, n_shared_experts=1,
             n_activated_experts=2, moe_inter_dim=8)


def names_of(labelling, row):
    return [labelling.names[label] if label >= 0 else "-" for label in labelling.labels[row]]


def test_categories_of_a_handmade_sequence():
    tokenizer = Tokenizer()
    text = "<bos>12+34=<think>2+4=6 1+3+1=5</think><answer>56</answer><eos>"
    ids, _ = tokenizer.encode_batch([text, "<bos>12+34=<answer>46</answer><eos>"])
    categories = analysis.token_categories(ids, tokenizer)
    #        <bos>    1      2      +      3      4      =    <think>  2     +     4      =      6    space
    token = ["<bos>", "digit", "digit", "operator", "digit", "digit", "=", "<think>", "digit", "operator", "digit",
             "=", "digit", "space",
             # 1       +        3        +          1       =     5     </think>    <answer>  5       6
             "digit", "operator", "digit", "operator", "digit", "=", "digit", "</think>", "<answer>", "digit", "digit",
             "</answer>", "<eos>"]
    assert names_of(categories["token"], 0) == token
    region = ["prompt"] * 7 + ["think"] * 15 + ["answer"] * 4 + ["end"]
    assert names_of(categories["region"], 0) == region
    role = ["-", "operand_a", "operand_a", "-", "operand_b", "operand_b", "-", "-", "column_x", "-", "column_y", "-",
            "column_sum", "-", "column_x", "-", "column_y", "-", "carry", "-", "column_sum", "-", "-", "answer",
            "answer", "-", "-"]
    assert names_of(categories["digit_role"], 0) == role
    place = ["-", "tens", "units", "-", "tens", "units", "-", "-", "units", "-", "units", "-", "units", "-", "tens",
             "-", "tens", "-", "tens", "-", "tens", "-", "-", "tens", "units", "-", "-"]
    assert names_of(categories["place"], 0) == place
    # the shorter direct answer: its padding belongs to no category
    assert names_of(categories["region"], 1) == ["prompt"] * 7 + ["answer"] * 4 + ["end"] + ["-"] * 15
    assert names_of(categories["digit_role"], 1)[7:10] == ["-", "answer", "answer"]


def test_counts_and_mutual_information_of_a_hand_built_router():
    # 8 tokens, top-1. Category A (0) goes to expert 0 three times and expert 1 once; B (1) the other way round.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    experts = np.array([[0], [0], [0], [1], [1], [1], [1], [0]])
    counts = analysis.contingency(labels, experts, 2, 3)
    np.testing.assert_array_equal(counts, [[3, 1, 0], [1, 3, 0]])
    # p(c,e) = 3/8 on the diagonal, 1/8 off it; p(c) = p(e) = 1/2:
    # I = 2·(3/8)·log2((3/8)/(1/4)) + 2·(1/8)·log2((1/8)/(1/4)) = 0.75·log2(1.5) − 0.25
    by_hand = 0.75 * math.log2(1.5) - 0.25
    assert analysis.mutual_information_bits(counts) == pytest.approx(by_hand, abs=1e-12)
    assert analysis.uncertainty_coefficient(counts) == pytest.approx(by_hand / 1.0, abs=1e-12)  # H(C) = 1 bit


def test_top_k_tables_count_every_slot_and_a_specialised_router_scores_one():
    # top-2: category 0 always takes experts {0, 1}, category 1 {2, 3}, category 2 {3, 2} (order swapped), and a
    # token labelled −1 (padding) is left out.
    labels = np.array([[0, 0, 1, 2, -1]])
    experts = np.array([[[0, 1], [1, 0], [2, 3], [3, 2], [0, 1]]])
    counts = analysis.contingency(labels, experts, 3, 4)
    np.testing.assert_array_equal(counts, [[2, 2, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    # categories 1 and 2 share their experts: the expert tells category 0 apart and nothing more.
    # p(c) = (1/2, 1/4, 1/4): H(C) = 1.5 bits; H(C|E) = p(e ∈ {2,3}) · H(1/2, 1/2) = 1/2 bit; I = 1 bit.
    assert analysis.entropy_bits(counts.sum(axis=1)) == pytest.approx(1.5, abs=1e-12)
    assert analysis.mutual_information_bits(counts) == pytest.approx(1.0, abs=1e-12)
    assert analysis.uncertainty_coefficient(counts) == pytest.approx(2 / 3, abs=1e-12)
    weighted = analysis.contingency(labels, experts, 3, 4, weights=np.full(experts.shape, 0.5))
    np.testing.assert_allclose(weighted, counts * 0.5)


def test_shuffled_null_of_a_perfectly_specialised_router_is_near_zero():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 4000)
    experts = np.stack([2 * labels, 2 * labels + 1], axis=-1)  # (N, 2): category c owns experts 2c and 2c+1
    counts = analysis.contingency(labels, experts, 4, 8)
    assert analysis.uncertainty_coefficient(counts) == pytest.approx(1.0, abs=1e-12)
    null = analysis.shuffled_null(labels, experts, 4, 8, n_shuffles=10, seed=1)
    assert null.shape == (10,)
    assert 0 < null.mean() < 0.01 and null.std() < 0.01
    # the shuffles keep the loads: each permuted table has the original column sums
    # (checked through the worst case: a router that sends everything to one pair has U = 0 and so does its null)
    constant = np.zeros_like(experts) + np.array([0, 1])
    assert analysis.uncertainty_coefficient(analysis.contingency(labels, constant, 4, 8)) == pytest.approx(0.0)
    assert np.allclose(analysis.shuffled_null(labels, constant, 4, 8, n_shuffles=3), 0.0)


def test_same_token_null_keeps_what_the_token_identity_explains():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 5, 3000)
    labels = (ids >= 3).astype(int)  # the category is a function of the token: it adds nothing beyond identity
    experts = ids[:, None] % 4  # routing is a function of the token too
    counts = analysis.contingency(labels, experts, 2, 4)
    u = analysis.uncertainty_coefficient(counts)
    same_token = analysis.shuffled_null(labels, experts, 2, 4, n_shuffles=5, strata=ids)
    np.testing.assert_allclose(same_token, u, atol=1e-12)
    free = analysis.shuffled_null(labels, experts, 2, 4, n_shuffles=5)
    assert free.max() < 0.01 < u


@pytest.fixture
def small_model():
    minimoe.manual_seed(0)
    return Transformer(ModelConfig(**SMALL)).eval()


@pytest.fixture
def some_ids():
    texts = ["<bos>347+589=<think>7+9=16 4+8+1=13 3+5+1=9</think><answer>936</answer><eos>",
             "<bos>12+34=<answer>46</answer><eos>"]
    return Tokenizer().encode_batch(texts)[0]


def test_route_records_what_the_layers_used(small_model, some_ids):
    routes = analysis.route(small_model, some_ids)
    assert len(routes.experts) == 2 and routes.experts[0].shape == some_ids.shape + (2,)
    assert routes.scores[1].shape == some_ids.shape + (4,)
    for experts, moe in zip(routes.experts, small_model.moe_layers()):  # the layer's own load after that forward
        np.testing.assert_array_equal(np.bincount(experts.reshape(-1), minlength=4),
                                      to_numpy(moe.stats["tokens_per_expert"]))
    np.testing.assert_allclose(np.take_along_axis(routes.scores[0], routes.experts[0], -1), routes.weights[0])
    assert "forward" not in vars(small_model.moe_layers()[0].gate)  # the recording wrapper is gone


def test_disabling_an_expert_reroutes_only_its_tokens(small_model, some_ids):
    before = analysis.route(small_model, some_ids)
    bias_before = to_numpy(small_model.moe_layers()[0].gate.bias).copy()
    with analysis.experts_disabled(small_model, {0: [1]}):
        during = analysis.route(small_model, some_ids)
    after = analysis.route(small_model, some_ids)
    assert not (during.experts[0] == 1).any()
    untouched = ~(before.experts[0] == 1).any(-1)  # tokens that never used expert 1 keep both experts
    np.testing.assert_array_equal(during.experts[0][untouched], before.experts[0][untouched])
    np.testing.assert_array_equal(after.experts[0], before.experts[0])
    np.testing.assert_array_equal(to_numpy(small_model.moe_layers()[0].gate.bias), bias_before)
    with pytest.raises(ValueError, match="at least top_k"):
        with analysis.experts_disabled(small_model, {0: [0, 1, 2]}):
            pass


def test_token_losses_and_similarity(small_model, some_ids):
    losses = analysis.token_losses(small_model, some_ids)
    assert losses.shape == (2, some_ids.shape[1] - 1) and (losses > 0).all()
    similarity = analysis.expert_output_similarity(small_model, analysis.route(small_model, some_ids))
    assert len(similarity) == 2 and similarity[0].shape == (4, 4)
    np.testing.assert_allclose(np.diag(similarity[0]), 1.0, atol=1e-9)
    np.testing.assert_allclose(similarity[0], similarity[0].T, atol=1e-12)


def test_explorer_draws_static_figures_without_a_front_end(small_model):
    figures = analysis.routing_explorer(small_model, "<bos>12+34=<answer>46</answer><eos>", interactive=False)
    assert len(figures) == 4  # two layers, bias on and off
    grid = figures[0].axes[0].images[0].get_array()
    assert grid.shape == (4, 12) and int((~np.ma.getmaskarray(grid) & ~np.isnan(grid.filled(np.nan))).sum()) == 24
    with pytest.raises(ValueError, match="layer 5"):
        analysis.routing_figure(small_model, "<bos>1", layer=5)
