"""Optimizers, gradient clipping and a learning-rate schedule, matching torch.optim step for step.

An optimizer holds a list of parameters (leaf tensors with requires_grad) and updates their `.data` in place
from their `.grad`. A parameter whose `.grad` is None (an expert no token was routed to) is skipped, buffers
and step count included, as in torch. The state (momentum buffers, Adam moments, step counts) is saved with
`state_dict()` so a checkpointed run resumes exactly.
"""

import copy
import math

from .autograd import Tensor, no_grad
from .backend import backend_of, get_array_module

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_grad_norm_", "warmup_cosine", "WarmupCosine"]


class Optimizer:
    """Base class: `zero_grad()`, `step()`, `state_dict()`, `load_state_dict()`."""

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty list of parameters")
        first_position = {}
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor) or not p.requires_grad:
                raise TypeError(f"{type(self).__name__}: parameter {i} is not a tensor with requires_grad=True")
            if id(p) in first_position:
                raise ValueError(f"{type(self).__name__}: parameter {i} is parameter {first_position[id(p)]} "
                                 "again, so it would be updated twice per step; pass each parameter once")
            first_position[id(p)] = i
        _check_hyperparameter(self, "lr", lr)
        self.lr = lr
        self.step_count = 0
        self.state = [{} for _ in self.params]  # per parameter: buffer name -> array ("step" -> int)

    def zero_grad(self):
        """Forget the gradients (set them to None; the next backward writes fresh ones)."""
        for p in self.params:
            p.grad = None

    @no_grad()
    def step(self):
        """Update every parameter that has a gradient."""
        self.step_count += 1
        for p, state in zip(self.params, self.state):
            if p.grad is not None:
                self.update(p.data, p.grad, state)

    def update(self, param, grad, state):
        """Change `param` in place from `grad`; `state` is this parameter's own dict of buffers."""
        raise NotImplementedError

    def state_dict(self):
        """A snapshot that later steps do not change: {"step": int, "lr": float, "state": [{name: array}]}, one
        dict of buffers per parameter (Adam's also holds that parameter's own "step", an int)."""
        return {"step": self.step_count, "lr": self.lr, "state": copy.deepcopy(self.state)}

    def load_state_dict(self, state_dict):
        """Restore a `state_dict()` (its arrays may be host NumPy arrays, e.g. read from a checkpoint). The
        optimizer keeps copies, on its parameters' backend. Every shape is checked before anything changes."""
        if len(state_dict["state"]) != len(self.params):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the saved state has "
                             f"{len(state_dict['state'])} parameters, this optimizer {len(self.params)}")
        for i, (p, saved) in enumerate(zip(self.params, state_dict["state"])):
            for name, value in saved.items():
                if name != "step" and tuple(value.shape) != p.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: buffer {name!r} of parameter {i} "
                                     f"has shape {tuple(value.shape)}, the parameter {p.shape}")
        self.step_count, self.lr = int(state_dict["step"]), float(state_dict["lr"])
        self.state = [{name: int(value) if name == "step" else backend_of(p.data).asarray(value, dtype=p.dtype)
                       for name, value in saved.items()}
                      for p, saved in zip(self.params, state_dict["state"])]


def _check_hyperparameter(optimizer, name, value, low=0.0, high=math.inf, high_open=False):
    """A finite real number in [low, high] (or [low, high)), else a ValueError naming the optimizer and the value."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
        or not low <= value <= high or (high_open and value == high)
    if bad:
        upper = "∞" if high == math.inf else f"{high}"
        raise ValueError(f"{type(optimizer).__name__}: {name} must be a finite number in [{low}, {upper}"
                         f"{')' if high_open or high == math.inf else ']'}, got {value!r}")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay (torch.optim.SGD):
    g ← g + λθ;   v ← μv + g (v = g at the first step);   θ ← θ - lr·v  (θ ← θ - lr·g without momentum)."""

    def __init__(self, params, lr=1e-2, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        _check_hyperparameter(self, "momentum", momentum, high=1.0)
        _check_hyperparameter(self, "weight_decay", weight_decay)
        self.momentum, self.weight_decay = momentum, weight_decay

    def update(self, param, grad, state):
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.momentum:
            if "momentum" not in state:
                state["momentum"] = grad.copy()
            else:
                state["momentum"] *= self.momentum
                state["momentum"] += grad
            grad = state["momentum"]
        param -= self.lr * grad


class Adam(Optimizer):
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient (torch.optim.Adam):
    m ← β₁m + (1-β₁)g;   v ← β₂v + (1-β₂)g²;   θ ← θ - lr · (m / (1-β₁ᵗ)) / (√(v / (1-β₂ᵗ)) + ε),
    t counting the steps in which this parameter had a gradient."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{type(self).__name__}: betas must be a pair (beta1, beta2), got {betas!r}")
        for name, beta in zip(("betas[0]", "betas[1]"), betas):
            _check_hyperparameter(self, name, beta, high=1.0, high_open=True)
        _check_hyperparameter(self, "eps", eps)
        _check_hyperparameter(self, "weight_decay", weight_decay)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def update(self, param, grad, state):
        xp = get_array_module(param)
        if self.weight_decay:
            if self.decoupled:
                param *= 1 - self.lr * self.weight_decay
            else:
                grad = grad + self.weight_decay * param
        if "m" not in state:
            state["step"], state["m"], state["v"] = 0, xp.zeros_like(param), xp.zeros_like(param)
        state["step"] += 1
        t, m, v = state["step"], state["m"], state["v"]
        m *= self.beta1
        m += (1 - self.beta1) * grad
        v *= self.beta2
        squared = (1 - self.beta2) * grad
        squared *= grad
        v += squared
        bias_correction1 = 1 - self.beta1 ** t
        bias_correction2 = 1 - self.beta2 ** t
        # plain: θ - lr · (m / (1-β₁ᵗ)) / (√(v / (1-β₂ᵗ)) + ε)  (update_plain), here in place on two new arrays
        denominator = xp.sqrt(v)
        denominator /= math.sqrt(bias_correction2)
        denominator += self.eps
        step = (self.lr / bias_correction1) * m
        step /= denominator
        param -= step

    def update_plain(self, param, grad, state):
        """The same step as `update`, written as the paper's algorithm box: new arrays, nothing changed in place.
        Returns the new parameter; `state` gets the new moments."""
        xp = get_array_module(param)
        if self.weight_decay and self.decoupled:
            param = param * (1 - self.lr * self.weight_decay)  # AdamW: θ ← θ(1 - lr·λ)
        elif self.weight_decay:
            grad = grad + self.weight_decay * param  # Adam's L2: g ← g + λθ
        t = state.get("step", 0) + 1
        m = self.beta1 * state.get("m", 0) + (1 - self.beta1) * grad
        v = self.beta2 * state.get("v", 0) + (1 - self.beta2) * grad ** 2
        m_hat, v_hat = m / (1 - self.beta1 ** t), v / (1 - self.beta2 ** t)
        state["step"], state["m"], state["v"] = t, m, v
        return param - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)


class AdamW(Adam):
    """Adam with *decoupled* weight decay (Loshchilov & Hutter; torch.optim.AdamW): before the Adam step,
    θ ← θ (1 - lr·λ). The decay no longer passes through the adaptive denominator."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


@no_grad()
def clip_grad_norm_(params, max_norm):
    """Scale all gradients together so their global L2 norm is at most `max_norm` (torch's rule: multiply by
    min(1, max_norm / (norm + 1e-6))). Returns the norm before clipping as a 0-d tensor; it stays on the
    device, so logging it is the caller's choice."""
    params = [params] if isinstance(params, Tensor) else params
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("clip_grad_norm_: no parameter has a gradient; call backward() first")
    xp = get_array_module(grads[0])
    total = xp.sqrt(sum(xp.vdot(g, g) for g in grads))  # vdot: Σ g² without a g² array
    scale = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g *= scale.astype(g.dtype)
    return Tensor(xp.asarray(total))


def warmup_cosine(step, base_lr, warmup_steps, total_steps, min_lr=0.0):
    """Learning rate at `step` (0-based): a linear rise to base_lr over `warmup_steps`, then half a cosine
    wave down to min_lr at `total_steps`.
        step < warmup:  base_lr · (step + 1) / warmup
        after:          min_lr + (base_lr - min_lr) · ½ (1 + cos(π · (step - warmup) / (total - warmup)))"""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets `optimizer.lr` from `warmup_cosine`: call `step()` once after each optimizer step."""

    def __init__(self, optimizer, warmup_steps, total_steps, min_lr=0.0):
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"WarmupCosine: need 0 ≤ warmup_steps ({warmup_steps}) ≤ total_steps ({total_steps})")
        self.optimizer, self.base_lr = optimizer, optimizer.lr
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step):
        return warmup_cosine(step, self.base_lr, self.warmup_steps, self.total_steps, self.min_lr)

    def step(self):
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)

    def state_dict(self):
        return {"last_step": self.last_step, "base_lr": self.base_lr}

    def load_state_dict(self, state):
        self.last_step, self.base_lr = int(state["last_step"]), float(state["base_lr"])
        self.optimizer.lr = self.lr_at(self.last_step)
