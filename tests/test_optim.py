"""Optimizers, gradient clipping and the learning-rate schedule against torch.optim, in float64, step for step.

Both frameworks train the same small MLP from the same weights, so the gradients change from step to step. Its
parameters include a 0-d scale, and one parameter that gets a gradient only every other step (as an expert that
no token chose gets none): optimizers must skip it then, buffers and step count included, as torch does."""

import numpy as np
import pytest

import minimoe
import minimoe.functional as F
from minimoe.optim import SGD, Adam, AdamW, WarmupCosine, clip_grad_norm_, warmup_cosine
from minimoe.testing import check_close, to_numpy
from parity import torch

TOL = 1e-10
STEPS = 6


def problem(seed=0):
    """Inputs, targets and the initial weights [W1 (5, 4), b1 (4,), W2 (4, 2), s (), extra (2,)]."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(8, 5)), rng.normal(size=(8, 2))
    weights = [rng.normal(size=(5, 4)) * 0.5, rng.normal(size=4) * 0.1, rng.normal(size=(4, 2)) * 0.5,
               np.array(1.3), rng.normal(size=2)]
    return x, y, weights


def loss_of(params, x, y, step, tanh):
    """mean((s · tanh(x W1 + b1) W2 - y)²), plus mean(extra ⊙ out) on even steps only."""
    w1, b1, w2, s, extra = params
    out = s * (tanh(x @ w1 + b1) @ w2)
    loss = ((out - y) ** 2).mean()
    return loss + (extra * out).mean() if step % 2 == 0 else loss


class Twins:
    """The same parameters and data in minimoe (current backend) and in torch."""

    def __init__(self, weights=None):
        x, y, initial = problem()
        weights = initial if weights is None else weights
        self.mine = [minimoe.tensor(w, dtype="float64", requires_grad=True) for w in weights]
        self.theirs = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in weights]
        self.x, self.y = minimoe.tensor(x, dtype="float64"), minimoe.tensor(y, dtype="float64")
        self.tx, self.ty = torch.tensor(x), torch.tensor(y)

    def backward(self, step):
        loss_of(self.mine, self.x, self.y, step, F.tanh).backward()
        loss_of(self.theirs, self.tx, self.ty, step, torch.tanh).backward()
        assert (self.mine[4].grad is None) == (step % 2 == 1)

    def check_parameters(self, what):
        for i, (p, q) in enumerate(zip(self.mine, self.theirs)):
            check_close(p, q.detach(), TOL, TOL, name=f"{what}, parameter {i}", quiet=True)


def train_step(optimizer, params, x, y, step):
    optimizer.zero_grad()
    loss_of(params, x, y, step, F.tanh).backward()
    optimizer.step()


OPTIMIZERS = {
    "sgd": (lambda p: SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_momentum": (lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "sgd_weight_decay": (lambda p: SGD(p, lr=0.1, weight_decay=0.05),
                         lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05)),
    "sgd_momentum_weight_decay": (lambda p: SGD(p, lr=0.1, momentum=0.8, weight_decay=0.05),
                                  lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, weight_decay=0.05)),
    "adam": (lambda p: Adam(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
    "adam_betas_eps": (lambda p: Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6),
                       lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6)),
    "adam_weight_decay": (lambda p: Adam(p, lr=0.05, weight_decay=0.1),
                          lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1)),
    "adamw": (lambda p: AdamW(p, lr=0.05, weight_decay=0.1),
              lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)),
    "adamw_default_decay": (lambda p: AdamW(p, lr=0.05), lambda p: torch.optim.AdamW(p, lr=0.05)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_matches_torch(backend, name):
    make_mine, make_torch = OPTIMIZERS[name]
    twins = Twins()
    mine, theirs = make_mine(twins.mine), make_torch(twins.theirs)
    for step in range(STEPS):
        mine.zero_grad()
        theirs.zero_grad()
        twins.backward(step)
        mine.step()
        theirs.step()
        twins.check_parameters(f"{name}, step {step}")
    assert mine.step_count == STEPS


@pytest.mark.parametrize("max_norm, clips", [(0.05, True), (1e3, False)])
@pytest.mark.parametrize("step", [0, 1])
def test_clip_grad_norm_matches_torch(backend, max_norm, clips, step):
    twins = Twins()
    twins.backward(step)
    before = [None if p.grad is None else to_numpy(p.grad).copy() for p in twins.mine]
    norm = clip_grad_norm_(twins.mine, max_norm)
    expected_norm = torch.nn.utils.clip_grad_norm_(twins.theirs, max_norm)
    assert isinstance(norm, minimoe.Tensor) and norm.shape == () and type(norm.data) is backend.array_type
    check_close(norm, expected_norm, TOL, TOL, name="norm")
    assert (norm.item() > max_norm) == clips
    for i, (p, q, old) in enumerate(zip(twins.mine, twins.theirs, before)):
        if q.grad is None:
            assert p.grad is None
            continue
        check_close(p.grad, q.grad, TOL, TOL, name=f"clipped grad {i}")
        if not clips:
            np.testing.assert_array_equal(to_numpy(p.grad), old)


def test_clip_grad_norm_accepts_one_tensor_and_refuses_no_gradients():
    x = minimoe.tensor([3.0, 4.0], dtype="float64", requires_grad=True)
    with pytest.raises(ValueError, match=r"no parameter has a gradient; call backward\(\) first"):
        clip_grad_norm_([x], 1.0)
    (x * x).sum().backward()  # grad (6, 8), norm 10
    assert clip_grad_norm_(x, 1.0).item() == pytest.approx(10.0, rel=1e-14)
    check_close(x.grad, np.array([6.0, 8.0]) / (10.0 + 1e-6), name="clipped")


def test_clip_grad_norm_clips_zero_dimensional_gradients_in_place(backend):
    s, ts = minimoe.tensor(3.0, dtype="float64", requires_grad=True), torch.tensor(3.0, requires_grad=True,
                                                                                   dtype=torch.float64)
    (s * s).backward()  # all 0-d: NumPy computes the gradient as a scalar, the engine keeps it an array
    (ts * ts).backward()
    check_close(clip_grad_norm_([s], 1.0), torch.nn.utils.clip_grad_norm_([ts], 1.0), TOL, TOL, name="norm")
    check_close(s.grad, ts.grad, TOL, TOL, name="clipped 0-d grad")


def test_warmup_cosine_matches_torch_schedulers(backend):
    warmup, total, base, min_lr = 5, 24, 0.05, 0.005
    twins = Twins()
    mine = AdamW(twins.mine, lr=base, weight_decay=0.1)
    schedule = WarmupCosine(mine, warmup, total, min_lr=min_lr)
    theirs = torch.optim.AdamW(twins.theirs, lr=base, weight_decay=0.1)
    schedulers = torch.optim.lr_scheduler
    torch_schedule = schedulers.SequentialLR(theirs, [
        schedulers.LinearLR(theirs, start_factor=1 / warmup, total_iters=warmup - 1),
        schedulers.CosineAnnealingLR(theirs, T_max=total - warmup, eta_min=min_lr)], milestones=[warmup])
    for step in range(total):
        expected = theirs.param_groups[0]["lr"]
        assert mine.lr == pytest.approx(expected, rel=1e-12, abs=0), f"learning rate at step {step}"
        assert warmup_cosine(step, base, warmup, total, min_lr) == mine.lr
        mine.zero_grad()
        theirs.zero_grad()
        twins.backward(step)
        mine.step()
        theirs.step()
        schedule.step()
        torch_schedule.step()
    twins.check_parameters("after the scheduled AdamW run")
    assert warmup_cosine(total + 10, base, warmup, total, min_lr) == min_lr  # flat after the end
    assert warmup_cosine(0, base, 0, total, min_lr) == base  # no warm-up: start at the peak


def test_schedule_state_dict_round_trip():
    x, y, weights = problem()
    optimizer = SGD([minimoe.tensor(weights[0], requires_grad=True)], lr=0.1)
    schedule = WarmupCosine(optimizer, warmup_steps=3, total_steps=10, min_lr=0.01)
    for _ in range(4):
        schedule.step()
    other = SGD([minimoe.tensor(weights[0], requires_grad=True)], lr=0.1)
    WarmupCosine(other, warmup_steps=3, total_steps=10, min_lr=0.01).load_state_dict(schedule.state_dict())
    assert other.lr == optimizer.lr == warmup_cosine(4, 0.1, 3, 10, 0.01)


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "adamw"])
def test_state_dict_round_trip_continues_bit_for_bit(backend, name):
    make = OPTIMIZERS[name][0]
    x, y, weights = problem()
    x, y = minimoe.tensor(x, dtype="float64"), minimoe.tensor(y, dtype="float64")
    params = [minimoe.tensor(w, dtype="float64", requires_grad=True) for w in weights]
    optimizer = make(params)
    for step in range(3):
        train_step(optimizer, params, x, y, step)
    weights_at_3 = [p.numpy().copy() for p in params]
    saved = optimizer.state_dict()
    for step in range(3, STEPS):  # the original carries on; `saved` is a snapshot and must not change with it
        train_step(optimizer, params, x, y, step)
    expected = [p.numpy() for p in params]

    # two optimizers restored from the same state: from its arrays, and from host copies (as a checkpoint has)
    on_host = {"step": saved["step"], "lr": saved["lr"],
               "state": [{key: to_numpy(value) for key, value in buffers.items()} for buffers in saved["state"]]}
    restored = []
    for state in (saved, on_host):
        copies = [minimoe.tensor(w, dtype="float64", requires_grad=True) for w in weights_at_3]
        optimizer = make(copies)
        optimizer.load_state_dict(state)
        restored.append((optimizer, copies))
    for step in range(3, STEPS):
        for optimizer, copies in restored:  # interleaved: they must not share buffers
            train_step(optimizer, copies, x, y, step)
    for optimizer, copies in restored:
        assert optimizer.step_count == STEPS
        for i, (p, e) in enumerate(zip(copies, expected)):
            np.testing.assert_array_equal(p.numpy(), e, err_msg=f"parameter {i}")


def test_zero_grad_starts_the_next_backward_afresh(backend):
    twins = Twins()
    optimizer = SGD(twins.mine, lr=0.1)
    twins.backward(0)
    optimizer.zero_grad()
    assert all(p.grad is None for p in twins.mine)
    twins.backward(0)  # torch's grads are now from two backwards, ours from one: compare with half of theirs
    for i, (p, q) in enumerate(zip(twins.mine, twins.theirs)):
        check_close(p.grad, q.grad / 2, TOL, TOL, name=f"grad {i}")


def test_optimizer_rejects_bad_parameters_and_states():
    p = minimoe.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match="empty list of parameters"):
        Adam([])
    with pytest.raises(TypeError, match="parameter 1 is not a tensor with requires_grad=True"):
        Adam([p, minimoe.tensor([1.0])])
    with pytest.raises(ValueError, match="parameter 1 is parameter 0 again"):
        Adam([p, p])
    with pytest.raises(ValueError, match=r"lr must be a finite number in \[0.0, ∞\)"):
        SGD([p], lr=-1.0)
    optimizer = Adam([p])
    (p * p).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    with pytest.raises(ValueError, match="the saved state has 2 parameters, this optimizer 1"):
        optimizer.load_state_dict({**state, "state": state["state"] * 2})
    wrong_shape = {**state, "state": [{**state["state"][0], "m": np.zeros(3)}]}
    with pytest.raises(ValueError, match=r"buffer 'm' of parameter 0 has shape \(3,\), the parameter \(2,\)"):
        optimizer.load_state_dict(wrong_shape)
