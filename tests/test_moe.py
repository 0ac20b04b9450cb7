"""Experts, gate and MoE layer against the PyTorch twin (tests/reference/moe.py) in float64 on every backend:
outputs, balance losses, stats and the gradient of every parameter and of the input under a random upstream
gradient. Then the behaviours the twin cannot show: the top-1 trap, auxiliary-loss-free balancing, −inf group
masking, noisy routing, clear errors and the state dict."""

import numpy as np
import pytest

import minimoe
from minimoe.nn import MLP, Expert, Gate, GroupedLinear, MoE, Renormalize
from minimoe.testing import check_close, to_numpy
from parity import check_op, torch, twin as load_twin

twin = load_twin("moe")

DIM, INTER = 16, 12
RTOL, ATOL = 1e-8, 1e-12
MIN_MARGIN = 1e-6  # selection scores closer than this would make the comparison a coin toss


# ---- the two ops -------------------------------------------------------------------------------------------------

def test_renormalize_op(backend):
    check_op(lambda x: Renormalize()(x), lambda x: x / x.sum(-1, keepdim=True), shapes=[(4, 3)],
             arrays=[np.random.default_rng(0).uniform(0.1, 1.0, (4, 3))])


def test_grouped_linear_op(backend):
    sizes = [3, 1, 4]

    def reference(x, *weights):
        return torch.cat([piece @ w.T for piece, w in zip(torch.split(x, sizes), weights)])

    check_op(lambda x, *weights: GroupedLinear(sizes)(x, *weights), reference,
             shapes=[(8, 5)] + [(6, 5)] * len(sizes))


def test_grouped_linear_empty_group_gets_no_gradient(backend, float64):
    x, *weights = (minimoe.randn(*shape, requires_grad=True) for shape in [(4, 5), (6, 5), (6, 5), (6, 5)])
    GroupedLinear([2, 0, 2])(x, *weights).sum().backward()
    assert weights[1].grad is None and weights[0].grad is not None and weights[2].grad is not None


def host_state(module):
    return {name: to_numpy(value) for name, value in module.state_dict().items()}


def make_pair(n_experts=8, top_k=2, seed=0, bias_scale=0.1, **options):
    """A minimoe MoE with a random balancing bias (when it has one), and its twin loaded from its state."""
    minimoe.manual_seed(seed)
    mine = MoE(DIM, n_experts, top_k, INTER, **options)
    if mine.gate.bias is not None:
        bias = np.random.default_rng(seed + 7).uniform(-bias_scale, bias_scale, n_experts)
        mine.gate.bias = minimoe.get_backend().asarray(bias)
    reference = twin.load_minimoe_state(twin.MoE(DIM, n_experts, top_k, INTER, **options), host_state(mine))
    return mine, reference


def assert_clear_routing(reference, x, top_k):
    """No near-ties: the K-th and (K+1)-th selection scores, the kept and dropped groups, and (with a capacity)
    each expert's last kept and first dropped token are all well apart."""
    gate = reference.gate
    with torch.no_grad():
        scores = (x.reshape(-1, x.shape[-1]) @ gate.weight.T)
        scores = scores.softmax(-1) if gate.score_func == "softmax" else scores.sigmoid()
        choice = gate.selection_scores(scores).sort(dim=-1, descending=True)[0]
        assert (choice[:, top_k - 1] - choice[:, top_k]).min() > MIN_MARGIN
        if gate.n_groups > 1:
            biased = scores if gate.bias is None else scores + gate.bias
            groups = gate.group_scores(biased).sort(dim=-1, descending=True)[0]
            assert (groups[:, gate.topk_groups - 1] - groups[:, gate.topk_groups]).min() > MIN_MARGIN
        if reference.capacity_factor is not None:
            indices = gate.selection_scores(scores).topk(top_k, dim=-1)[1]
            capacity = int(np.ceil(reference.capacity_factor * indices.numel() / len(reference.experts)))
            for e in range(len(reference.experts)):
                routed = scores[torch.where(indices == e)[0], e].sort(descending=True)[0]
                if len(routed) > capacity:
                    assert routed[capacity - 1] - routed[capacity] > MIN_MARGIN


CONFIGS = {
    "softmax": dict(score_func="softmax"),
    "softmax_top3_route_scale": dict(top_k=3, score_func="softmax", route_scale=16.0),
    "sigmoid_shared": dict(score_func="sigmoid", route_scale=2.5, n_shared_experts=2),
    "softmax_groups_shared": dict(n_experts=12, top_k=3, score_func="softmax", n_groups=4, topk_groups=2,
                                  n_shared_experts=1),
    "sigmoid_groups_bias": dict(n_experts=12, top_k=3, score_func="sigmoid", n_groups=4, topk_groups=2,
                                route_scale=2.5, bias_update_speed=1e-3),
    "aux_loss": dict(score_func="softmax", aux_loss_alpha=0.01),
    "aux_loss_sigmoid": dict(score_func="sigmoid", aux_loss_alpha=0.01),
    "seq_aux_loss": dict(score_func="sigmoid", seq_aux_alpha=1e-2, bias_update_speed=1e-3),
    "z_loss": dict(score_func="softmax", z_loss_coef=1e-3),
    "every_term_v3": dict(score_func="sigmoid", n_shared_experts=1, route_scale=2.5, n_groups=4, topk_groups=2,
                          aux_loss_alpha=0.01, seq_aux_alpha=1e-3, z_loss_coef=1e-3, bias_update_speed=1e-3),
    "capacity_softmax": dict(score_func="softmax", capacity_factor=0.75, aux_loss_alpha=0.01),
    "capacity_sigmoid_groups_shared": dict(n_experts=12, top_k=3, score_func="sigmoid", n_groups=4,
                                           topk_groups=2, n_shared_experts=1, capacity_factor=1.0,
                                           bias_update_speed=1e-3, bias_scale=0.3),
}


def compare_with_twin(mine, reference, x_host, seed=1):
    """Forward both, backward Σ y ⊙ G + balance_loss with a random G, compare everything."""
    x = minimoe.tensor(x_host, requires_grad=True)
    x_torch = torch.tensor(x_host, requires_grad=True)
    y, y_torch = mine(x), reference(x_torch)
    check_close(y, y_torch, ATOL, RTOL, name="output", quiet=True)

    assert {name for name in mine.stats if name.endswith("loss")} == set(reference.losses)
    for name, value in reference.losses.items():
        check_close(mine.stats[name], value, ATOL, RTOL, name=name, quiet=True)
    if reference.balance_loss is None:
        assert mine.balance_loss is None
    else:
        check_close(mine.balance_loss, reference.balance_loss, ATOL, RTOL, name="balance_loss", quiet=True)
    counts = to_numpy(mine.stats["tokens_per_expert"])
    np.testing.assert_array_equal(counts, reference.counts.numpy())
    assert int(to_numpy(mine.stats["dropped"])) == reference.dropped
    assert float(to_numpy(mine.stats["imbalance"])) == pytest.approx(counts.max() / counts.mean(), rel=1e-12)

    upstream = np.random.default_rng(seed).normal(size=x_host.shape)
    loss = (y * minimoe.tensor(upstream)).sum()
    loss_torch = (y_torch * torch.tensor(upstream)).sum()
    if reference.balance_loss is not None:
        loss, loss_torch = loss + mine.balance_loss, loss_torch + reference.balance_loss
    loss.backward()
    loss_torch.backward()
    check_close(x.grad, x_torch.grad, ATOL, RTOL, name="grad of the input", quiet=True)
    theirs = dict(reference.named_parameters())
    for name, p in mine.named_parameters():
        expected = theirs[name].grad if theirs[name].grad is not None else torch.zeros_like(theirs[name])
        actual = p.grad if p.grad is not None else np.zeros(p.shape)
        check_close(actual, expected, ATOL, RTOL, name=f"grad of {name}", quiet=True)
    return y


def check_balance_loss_gradient(mine, reference, x_host):
    """The balance terms alone, whose gradient is small beside the output's: it reaches the router and the input."""
    mine.zero_grad(), reference.zero_grad()
    x, x_torch = minimoe.tensor(x_host, requires_grad=True), torch.tensor(x_host, requires_grad=True)
    mine(x), reference(x_torch)
    mine.balance_loss.backward()
    reference.balance_loss.backward()
    check_close(x.grad, x_torch.grad, ATOL, RTOL, name="balance: grad of the input", quiet=True)
    check_close(mine.gate.weight.grad, reference.gate.weight.grad, ATOL, RTOL, name="balance: grad of the gate",
                quiet=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_matches_twin(name, backend, float64):
    options = dict(CONFIGS[name])
    mine, reference = make_pair(**options)
    x_host = np.random.default_rng(3).normal(size=(3, 10, DIM))
    assert_clear_routing(reference, torch.tensor(x_host), mine.n_activated_experts)
    compare_with_twin(mine, reference, x_host)
    if reference.balance_loss is not None:
        check_balance_loss_gradient(mine, reference, x_host)
    if mine.capacity_factor is not None:
        assert reference.dropped > 0, "this configuration is meant to drop some assignments"
    assert mine.gate.weight.grad is not None and np.abs(to_numpy(mine.gate.weight.grad)).max() > 0


def test_router_entropy_stat(backend, float64):
    mine, reference = make_pair(score_func="sigmoid")
    x_host = np.random.default_rng(3).normal(size=(2, 10, DIM))
    mine(minimoe.tensor(x_host))
    scores = torch.tensor(x_host).reshape(-1, DIM) @ reference.gate.weight.T.detach()
    p = scores.sigmoid() / scores.sigmoid().sum(-1, keepdim=True)
    check_close(mine.stats["router_entropy"], -(p * p.log()).sum(-1).mean(), ATOL, RTOL, quiet=True)


def test_eval_mode_never_drops(backend, float64):
    """Capacity applies in training only: in eval the layer equals the dropless twin."""
    options = CONFIGS["capacity_softmax"]
    mine, _ = make_pair(**options)
    dropless = twin.load_minimoe_state(
        twin.MoE(DIM, 8, 2, INTER, **{**options, "capacity_factor": None}), host_state(mine))
    mine.eval()
    x_host = np.random.default_rng(3).normal(size=(3, 10, DIM))
    compare_with_twin(mine, dropless, x_host)
    assert int(to_numpy(mine.stats["dropped"])) == 0


def test_expert_and_mlp_match_twin(backend, float64):
    for cls, twin_cls, width in [(Expert, twin.Expert, INTER), (MLP, twin.MLP, 3 * INTER)]:
        mine = cls(DIM, width)
        reference = twin.load_minimoe_state(twin_cls(DIM, width), host_state(mine))
        x_host = np.random.default_rng(0).normal(size=(2, 5, DIM))
        x, x_torch = minimoe.tensor(x_host, requires_grad=True), torch.tensor(x_host, requires_grad=True)
        y, y_torch = mine(x), reference(x_torch)
        check_close(y, y_torch, ATOL, RTOL, quiet=True)
        upstream = np.random.default_rng(1).normal(size=y_torch.shape)
        y.backward(minimoe.tensor(upstream))
        y_torch.backward(torch.tensor(upstream))
        check_close(x.grad, x_torch.grad, ATOL, RTOL, quiet=True)
        for (name, p), p_torch in zip(mine.named_parameters(), reference.parameters()):
            check_close(p.grad, p_torch.grad, ATOL, RTOL, name=name, quiet=True)


# ---- the top-1 trap -------------------------------------------------------------------------------------------

def test_top1_renormalised_router_gets_no_gradient(backend, float64):
    """Sigmoid + renormalisation + top-1: every combine weight is exactly 1, so the output carries no gradient
    to the router, however the experts are trained. Softmax top-1 (weights not renormalised) does."""
    x_host = np.random.default_rng(0).normal(size=(2, 8, DIM))
    upstream = minimoe.tensor(np.random.default_rng(1).normal(size=x_host.shape))
    for score_func, router_learns in [("sigmoid", False), ("softmax", True)]:
        layer = MoE(DIM, 8, 1, INTER, score_func=score_func)
        (layer(minimoe.tensor(x_host)) * upstream).sum().backward()
        router_grad = to_numpy(layer.gate.weight.grad)
        assert np.any(router_grad != 0) == router_learns, score_func
        assert any(np.abs(to_numpy(e.w2.weight.grad)).max() > 0 for e in layer.experts if e.w2.weight.grad
                   is not None)
    routing = Gate(DIM, 8, 1, score_func="sigmoid", route_scale=2.5)(minimoe.tensor(x_host))
    np.testing.assert_array_equal(to_numpy(routing.weights), 2.5)


# ---- auxiliary-loss-free balancing ----------------------------------------------------------------------------

def skewed_gate(speed):
    """A sigmoid gate whose logits strongly favour experts 0 and 1 for inputs along a direction u."""
    gate = Gate(DIM, 8, 2, score_func="sigmoid", bias_update_speed=speed)
    u = np.zeros(DIM)
    u[0] = 1.0
    weight = to_numpy(gate.weight).copy()
    weight[:2] += 3.0 * u
    gate.weight.data = minimoe.get_backend().asarray(weight)
    return gate, u


def skewed_batch(rng, u, n=256):
    return minimoe.tensor(rng.normal(scale=0.5, size=(n, DIM)) + u)


def imbalance(counts):
    counts = to_numpy(counts)
    return counts.max() / counts.mean()


def test_loss_free_balancing_evens_out_a_skewed_load(backend, float64):
    gate, u = skewed_gate(speed=1e-2)
    rng = np.random.default_rng(0)
    start = imbalance(gate(skewed_batch(rng, u)).counts)
    assert start > 3.5  # nearly every token picks experts 0 and 1: 4 would be all of them
    for _ in range(300):
        gate(skewed_batch(rng, u))
        gate.update_bias()
    gate.eval()
    routing = gate(skewed_batch(rng, u, n=4096))  # a large batch: little sampling noise in the load
    end = imbalance(routing.counts)
    assert end < 1.4, f"imbalance {start:.2f} -> {end:.2f}"
    bias = to_numpy(gate.bias)
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down
    # the bias moved the choice, never the weights: they are the renormalised *unbiased* scores
    chosen = np.take_along_axis(to_numpy(routing.scores), to_numpy(routing.indices), axis=-1)
    check_close(routing.weights, chosen / chosen.sum(-1, keepdims=True), ATOL, RTOL, quiet=True)


def test_bias_changes_selection_not_weights(backend, float64):
    """A large bias on expert 5 makes every token choose it; its weight still comes from its own score."""
    x_host = np.random.default_rng(0).normal(size=(20, DIM))
    for score_func in ("sigmoid", "softmax"):
        minimoe.manual_seed(0)
        gate = Gate(DIM, 8, 2, score_func=score_func, bias_update_speed=1e-3)
        bias = np.zeros(8)
        bias[5] = 10.0
        gate.bias = minimoe.get_backend().asarray(bias)
        routing = gate(minimoe.tensor(x_host))
        assert np.all(to_numpy(routing.indices)[:, 0] == 5)
        reference = twin.load_minimoe_state(twin.Gate(DIM, 8, 2, score_func=score_func, bias_update_speed=1e-3),
                                            host_state(gate))
        weights, indices, _, _ = reference(torch.tensor(x_host)[None])
        np.testing.assert_array_equal(to_numpy(routing.indices), indices.numpy())
        check_close(routing.weights, weights, ATOL, RTOL, quiet=True)
        scores = to_numpy(routing.scores)
        chosen = np.take_along_axis(scores, to_numpy(routing.indices), axis=-1)
        expected = chosen / chosen.sum(-1, keepdims=True) if score_func == "sigmoid" else chosen
        check_close(routing.weights, expected, ATOL, RTOL, quiet=True)


def test_update_bias_uses_training_load_since_last_update(backend, float64):
    gate = Gate(DIM, 8, 2, score_func="sigmoid", bias_update_speed=0.5)
    x = minimoe.tensor(np.random.default_rng(0).normal(size=(30, DIM)))
    gate.eval()
    gate(x)
    gate.update_bias()  # no training forward yet: nothing to learn from
    np.testing.assert_array_equal(to_numpy(gate.bias), 0.0)
    gate.train()
    load = to_numpy(gate(x).counts) + to_numpy(gate(x).counts)
    gate.update_bias()
    np.testing.assert_array_equal(to_numpy(gate.bias), 0.5 * np.sign(load.mean() - load))
    gate.update_bias()  # the load was used up
    np.testing.assert_array_equal(to_numpy(gate.bias), 0.5 * np.sign(load.mean() - load))


def test_no_bias_without_bias_update_speed(backend, float64):
    layer = MoE(DIM, 8, 2, INTER, score_func="sigmoid")
    assert layer.gate.bias is None and "gate.bias" not in layer.state_dict()
    layer(minimoe.randn(2, 4, DIM))
    layer.update_bias()  # a no-op
    assert layer.gate.bias is None


# ---- group-limited routing masks with −inf ---------------------------------------------------------------------

def test_group_masking_uses_minus_infinity(backend, float64):
    """Sigmoid scores are in (0, 1); with a bias of −1 every selection score is negative. Masking the losing
    group with 0 would make its experts the best choice; −inf keeps every choice inside the winning group."""
    gate = Gate(DIM, 8, 2, score_func="sigmoid", n_groups=2, topk_groups=1, bias_update_speed=1e-3)
    gate.bias = minimoe.get_backend().xp.full(8, -1.0)
    x_host = np.random.default_rng(0).normal(size=(40, DIM))
    routing = gate(minimoe.tensor(x_host))
    choice = (to_numpy(routing.scores) - 1.0).reshape(40, 2, 4)  # s + b
    best_group = np.sort(choice, axis=-1)[..., -2:].sum(-1).argmax(-1)  # (40,)
    np.testing.assert_array_equal(to_numpy(routing.indices) // 4, np.repeat(best_group[:, None], 2, axis=1))
    masked_by_zero = np.where(np.arange(2)[None, :, None] == best_group[:, None, None], choice, 0.0)
    zero_choice = np.argsort(-masked_by_zero.reshape(40, 8), axis=-1)[:, :2] // 4
    assert np.all(zero_choice != best_group[:, None])  # the trap: 0 would have picked only masked experts


def deepseek_v3_reference_select(scores, bias, n_groups, topk_groups, top_k):
    """The selection of DeepSeek-V3's inference/model.py `Gate.forward`, transcribed: the group score is the max
    without a bias and the sum of the top-2 biased scores with one, whatever the score function."""
    if bias is not None:
        scores = scores + bias
    scores = scores.view(scores.shape[0], n_groups, -1)
    group_scores = scores.amax(dim=-1) if bias is None else scores.topk(2, dim=-1)[0].sum(dim=-1)
    indices = group_scores.topk(topk_groups, dim=-1)[1]
    mask = scores.new_ones(scores.shape[0], n_groups, dtype=bool).scatter_(1, indices, False)
    return torch.topk(scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1), top_k, dim=-1)[1]


@pytest.mark.parametrize("score_func, has_bias, expected", [("sigmoid", False, 0), ("softmax", True, 3)])
def test_group_score_follows_the_bias_as_deepseek_v3(backend, float64, score_func, has_bias, expected):
    """Group A = experts 0-2 with scores ∝ (0.9, 0.1, 0.1), group B = experts 3-5 with (0.6, 0.6, 0.6): A has the
    best expert (max rule), B the best pair (top-2 rule). V3's reference decides by the bias: without one the max
    picks A (expert 0), with one the top-2 sum picks B (expert 3). A rule by score function (max for softmax,
    top-2 for sigmoid) would choose the other expert in both cases."""
    xp = minimoe.get_backend().xp
    wanted = np.array([0.9, 0.1, 0.1, 0.6, 0.6, 0.6])
    logits = np.log(wanted / (1 - wanted)) if score_func == "sigmoid" else np.log(wanted)  # softmax ∝ wanted
    gate = Gate(1, 6, 1, score_func=score_func, n_groups=2, topk_groups=1, bias_update_speed=1e-3 * has_bias)
    gate.weight.data = xp.asarray(logits[:, None])  # (E, dim=1): x = 1 gives these logits
    routing = gate(minimoe.tensor(np.ones((1, 1))))
    assert int(to_numpy(routing.indices)[0, 0]) == expected
    scores = torch.from_numpy(to_numpy(routing.scores))
    bias = torch.zeros(6, dtype=torch.float64) if has_bias else None
    assert int(deepseek_v3_reference_select(scores, bias, 2, 1, 1)[0, 0]) == expected


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("has_bias", [False, True])
def test_group_limited_selection_matches_deepseek_v3_reference(backend, float64, score_func, has_bias):
    """Random routing of 300 tokens over 4 groups of 3 experts, 2 groups kept, top-3: the same experts as the
    transcribed reference, for each score function with and without a (non-zero) bias."""
    rng = np.random.default_rng(3)
    gate = Gate(DIM, 12, 3, score_func=score_func, n_groups=4, topk_groups=2, bias_update_speed=1e-3 * has_bias)
    if has_bias:
        gate.bias = minimoe.get_backend().xp.asarray(rng.normal(scale=0.1, size=12))
    routing = gate(minimoe.tensor(rng.normal(size=(300, DIM))))
    scores = torch.from_numpy(to_numpy(routing.scores))
    bias = torch.from_numpy(to_numpy(gate.bias)) if has_bias else None
    expected = deepseek_v3_reference_select(scores, bias, 4, 2, 3)
    np.testing.assert_array_equal(np.sort(to_numpy(routing.indices), axis=-1), np.sort(expected.numpy(), axis=-1))


# ---- noise --------------------------------------------------------------------------------------------------

def test_noise_only_in_training_and_only_in_selection(backend, float64):
    x = minimoe.tensor(np.random.default_rng(0).normal(size=(200, DIM)))
    minimoe.manual_seed(1)
    quiet = Gate(DIM, 8, 2, score_func="sigmoid")
    minimoe.manual_seed(1)
    noisy = Gate(DIM, 8, 2, score_func="sigmoid", noise_std=0.1)
    clean = to_numpy(quiet(x).indices)

    noisy.eval()
    np.testing.assert_array_equal(to_numpy(noisy(x).indices), clean)
    np.testing.assert_array_equal(to_numpy(noisy(x).indices), clean)

    noisy.train()
    first, second = noisy(x), noisy(x)
    changed = np.any(to_numpy(first.indices) != clean, axis=-1).mean()
    assert 0 < changed < 1, f"noise changed the choice of {changed:.0%} of the tokens"
    assert np.any(to_numpy(first.indices) != to_numpy(second.indices))
    scores = to_numpy(first.scores)
    check_close(scores, to_numpy(quiet(x).scores), ATOL, RTOL, quiet=True)  # noise never touches the scores
    chosen = np.take_along_axis(scores, to_numpy(first.indices), axis=-1)
    check_close(first.weights, chosen / chosen.sum(-1, keepdims=True), ATOL, RTOL, quiet=True)


# ---- errors and the state dict -----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(n_routed_experts=4, top_k=5), "top_k=5"),
    (dict(top_k=0), "top_k=0"),
    (dict(n_groups=3), "n_groups=3"),
    (dict(n_groups=4, topk_groups=5), "topk_groups=5"),
    (dict(n_groups=4, topk_groups=1, top_k=3), "cannot be found"),
    (dict(score_func="relu"), "score_func"),
    (dict(noise_std=-1.0), "noise_std"),
])
def test_gate_rejects_bad_options(options, message):
    arguments = {"dim": DIM, "n_routed_experts": 8, "top_k": 2, **options}
    with pytest.raises(ValueError, match=message):
        Gate(**arguments)


def test_input_dimension_mismatch_is_a_clear_error(backend):
    layer = MoE(DIM, 8, 2, INTER)
    with pytest.raises(minimoe.ShapeError, match=r"MoE: expected an input \(B, T, dim=16\), got shape \(2, 3, 5\)"):
        layer(minimoe.randn(2, 3, 5))
    with pytest.raises(minimoe.ShapeError, match="Gate"):
        layer.gate(minimoe.randn(4, 7))
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(DIM, 8, 2, INTER, capacity_factor=0)


def test_state_dict_round_trip_keeps_the_bias(backend, float64):
    options = dict(score_func="sigmoid", n_shared_experts=1, bias_update_speed=0.1)
    layer = MoE(DIM, 8, 2, INTER, **options)
    x = minimoe.randn(2, 6, DIM)
    layer(x)
    layer.update_bias()
    state = layer.state_dict()
    assert "gate.bias" in state and np.any(to_numpy(state["gate.bias"]) != 0)
    minimoe.manual_seed(123)
    copy = MoE(DIM, 8, 2, INTER, **options)
    copy.load_state_dict(state)
    np.testing.assert_array_equal(to_numpy(copy.gate.bias), to_numpy(layer.gate.bias))
    layer.eval(), copy.eval()
    check_close(copy(x), layer(x), 0, 0, quiet=True)
    with pytest.raises(ValueError, match="missing: gate.bias"):
        MoE(DIM, 8, 2, INTER, **options).load_state_dict({k: v for k, v in state.items() if k != "gate.bias"})
