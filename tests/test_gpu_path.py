"""The GPU path without a GPU: a float32 graph stays float32 everywhere (a spy on every backward), and what the
fakegpu stand-in counts as host reads stays within a documented budget."""

import numpy as np
import pytest

import minimoe
import minimoe.functional as F
from minimoe.autograd import Function
from minimoe.model import ModelConfig, Transformer
from minimoe.rl import policy_loss, token_logprobs
from minimoe.train import lm_loss, optimizer_step
from minimoe.optim import AdamW, WarmupCosine


# --------------------------------------------------------------------------------------------------------------
# the dtype spy
# --------------------------------------------------------------------------------------------------------------

def _function_classes():
    found, stack = [], [Function]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.append(sub)
            stack.append(sub)
    return found


class DtypeSpy:
    """Wraps every Function subclass's forward and backward; records (op, what, dtype) for each array seen."""

    def __init__(self, monkeypatch):
        self.seen = []
        for cls in _function_classes():
            if "backward" in cls.__dict__:
                monkeypatch.setattr(cls, "backward", self._spy_backward(cls.__dict__["backward"]))
            if "forward" in cls.__dict__:
                monkeypatch.setattr(cls, "forward", self._spy_forward(cls.__dict__["forward"]))

    def _spy_backward(self, backward):
        def spied(function, g):
            self.seen.append((function.name, "upstream gradient", g.dtype))
            grads = backward(function, g)
            for i, grad in enumerate(grads if isinstance(grads, tuple) else (grads,)):
                if grad is not None:
                    self.seen.append((function.name, f"gradient of input {i}", grad.dtype))
            return grads
        return spied

    def _spy_forward(self, forward):
        def spied(function, *arrays):
            out = forward(function, *arrays)
            if any(a.dtype == np.float32 for a in arrays) and out.dtype.kind == "f":
                self.seen.append((function.name, "output", out.dtype))
            return out
        return spied

    def assert_float32(self, least=1):
        assert len(self.seen) >= least, f"the spy saw only {len(self.seen)} arrays"
        wrong = sorted({(name, what, str(dtype)) for name, what, dtype in self.seen if dtype != np.float32})
        assert not wrong, f"not float32: {wrong}"


@pytest.fixture
def spy(monkeypatch):
    return DtypeSpy(monkeypatch)


def _op_cases():
    from test_ops import CASES  # the table of every op (importable without torch)
    return CASES


def test_every_op_keeps_float32_in_every_gradient(spy):
    """Not just the leaves' .grad (which are cast to the leaf's dtype): every gradient handed to a backward and
    every gradient it returns."""
    from parity import random_inputs

    for name, mine, _, shapes, *rest in _op_cases():
        domain = rest[0] if rest else {}
        inputs = [minimoe.tensor(a, dtype="float32", requires_grad=True) for a in random_inputs(shapes, **domain)]
        out = mine(*inputs)
        out.backward(minimoe.ones(*out.shape, dtype="float32"))
    spy.assert_float32(least=200)


def _demo_model(**overrides):
    config = ModelConfig(**overrides)
    minimoe.manual_seed(0)
    return Transformer(config), config


def _batch(config, batch=8, length=12, seed=0):
    rng = np.random.default_rng(seed)
    backend = minimoe.get_backend()
    return backend.asarray(rng.integers(0, config.vocab_size, (batch, length)))


@pytest.mark.parametrize("overrides", [{}, {"attention": "mla", "score_func": "sigmoid", "aux_loss_alpha": 0.01,
                                             "seq_aux_alpha": 0.01, "z_loss_coef": 1e-3, "dropout": 0.1,
                                             "capacity_factor": 1.0, "gate_noise_std": 0.1}],
                         ids=["demo", "every_option"])
def test_a_training_step_stays_float32(spy, overrides):
    model, config = _demo_model(**overrides)
    optimizer = AdamW(model.parameters(), lr=1e-3)
    ids = _batch(config)
    loss, _ = lm_loss(model, ids[:, :-1], ids[:, 1:])
    assert loss.dtype == np.float32
    optimizer_step(model, optimizer, WarmupCosine(optimizer, 1, 10), loss, grad_clip=1.0)
    spy.assert_float32(least=100)
    assert all(p.data.dtype == np.float32 for p in model.parameters())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "reinforce"])
def test_a_grpo_step_stays_float32(spy, loss_type):
    model, config = _demo_model()
    tokens = _batch(config)
    xp = minimoe.get_backend().xp
    mask = xp.asarray(np.random.default_rng(1).random((8, 11)) < 0.8)
    advantages = xp.asarray(np.random.default_rng(2).standard_normal(8).astype(np.float32))
    logprobs, _ = token_logprobs(model, tokens, temperature=0.8)
    old = logprobs.data + np.float32(0.05)
    loss, stats = policy_loss(logprobs, old, advantages, mask, loss_type, beta=0.04, ref_logprobs=old - 0.1,
                              max_new_tokens=11)
    loss.backward()
    spy.assert_float32(least=100)
    assert all(value.dtype == np.float32 for value in stats.values())


def test_generation_stays_float32(spy):
    from minimoe.generate import generate

    model, config = _demo_model()
    generate(model, _batch(config, length=4), max_new_tokens=5, eos_id=1, pad_id=0, temperature=0.9, top_p=0.9)
    spy.assert_float32(least=20)


# --------------------------------------------------------------------------------------------------------------
# the sync budget: how often the host waits for the device (counted by fakegpu)
# --------------------------------------------------------------------------------------------------------------
# A training step reads back the logged loss, plus each MoE layer's E expert counts: the grouped products need the
# expert block sizes as host integers (computed once per layer, as DeepSeek-V3's reference code does with
# bincount(...).tolist()). A decode step reads only the end-of-sequence flag: its few tokens take the MoE's
# sync-free path. Everything else — routing counts, the balance bias, index checks, clipping — stays on the device.

def _host_reads_of(run):
    from minimoe.backend import host_reads

    before = host_reads()
    run()
    return host_reads() - before


@pytest.fixture
def fakegpu():
    with minimoe.use_backend("fakegpu") as chosen:
        yield chosen


@pytest.mark.parametrize("overrides", [{}, {"attention": "mla", "score_func": "sigmoid", "seq_aux_alpha": 0.01,
                                             "aux_loss_alpha": 0.01, "gate_noise_std": 0.1, "dropout": 0.1}],
                         ids=["demo", "more_options"])
def test_a_training_step_stays_within_its_sync_budget(fakegpu, overrides):
    model, config = _demo_model(**overrides)
    optimizer = AdamW(model.parameters(), lr=1e-3)
    scheduler = WarmupCosine(optimizer, 1, 10)
    ids = _batch(config, batch=16, length=41)

    def step():
        loss, _ = lm_loss(model, ids[:, :-1], ids[:, 1:])
        optimizer_step(model, optimizer, scheduler, loss, grad_clip=1.0)
        model.update_routing_bias()
        return loss.item()  # the one read the loop needs: the logged loss

    assert _host_reads_of(step) == 1 + len(model.moe_layers())  # 3 for the demo model (it was 10)


def test_a_decode_step_stays_within_its_sync_budget(fakegpu):
    from minimoe.generate import generate

    model, config = _demo_model()
    prompt = _batch(config, batch=16, length=5)
    short = _host_reads_of(lambda: generate(model, prompt, 1, eos_id=config.vocab_size, pad_id=0))
    long = _host_reads_of(lambda: generate(model, prompt, 11, eos_id=config.vocab_size, pad_id=0))
    assert (long - short) / 10 == 1  # the EOS check only (it was 9: EOS, embedding range check, MoE counts)


@pytest.mark.parametrize("n_shared_experts", [0, 1])
def test_the_sync_free_decode_path_equals_the_grouped_one(backend, float64, monkeypatch, n_shared_experts):
    from minimoe.nn import MoE

    minimoe.manual_seed(0)
    layer = MoE(dim=8, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=6, n_shared_experts=n_shared_experts)
    layer.eval()
    x = minimoe.randn(3, 5, 8)
    with minimoe.no_grad():
        sync_free = layer(x)
        monkeypatch.setattr(layer, "sync_free_tokens", 0)
        grouped = layer(x)
    assert sync_free.shape == grouped.shape == (3, 5, 8)
    np.testing.assert_allclose(sync_free.numpy(), grouped.numpy(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# out-of-range indices: NumPy raises, CuPy wraps around; the library checks for itself
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda w, ids: F.embedding(ids, w),
    lambda w, ids: w[ids],
    lambda w, ids: F.take_along_axis(w, ids.reshape(3, 1), axis=0),
    lambda w, ids: F.index_add(w, ids, minimoe.ones(3, 2, dtype=w.dtype)),
    lambda w, ids: F.cross_entropy(w[:3], ids),
], ids=["embedding", "getitem", "take_along_axis", "index_add", "cross_entropy"])
@pytest.mark.parametrize("where", ["numpy", "fakegpu_debug"])
def test_an_out_of_range_index_is_a_clear_error(call, where):
    from minimoe.backend import set_debug_checks

    previous = set_debug_checks(where == "fakegpu_debug")
    try:
        with minimoe.use_backend(where.split("_")[0]):
            w = minimoe.randn(4, 2, requires_grad=True)
            ids = minimoe.tensor([0, 7, 1])
            with pytest.raises(IndexError, match=r"indices range over \[0, 7\] but only .* exist"):
                call(w, ids)
    finally:
        set_debug_checks(previous)


def test_device_index_checks_are_debug_only_and_cost_no_sync(fakegpu):
    from minimoe.backend import debug_checks

    assert not debug_checks()
    w = minimoe.randn(4, 2)
    ids = minimoe.tensor([0, 3, 1])
    assert _host_reads_of(lambda: F.embedding(ids, w)) == 0


# --------------------------------------------------------------------------------------------------------------
# reproducible resume on a device backend: the device generator's state is saved with the checkpoint
# --------------------------------------------------------------------------------------------------------------

def test_the_device_generator_state_round_trips_through_json(fakegpu):
    import json

    from minimoe.backend import device_rng, random_state, set_random_state

    minimoe.manual_seed(5)
    generator = device_rng()
    generator.random((3,), dtype="float32")
    state = json.loads(json.dumps(random_state()))
    expected = [generator.random((4,), dtype="float32").tolist(), generator.standard_normal((2,)).tolist()]
    minimoe.manual_seed(0)  # somewhere else entirely
    device_rng().random((7,))
    set_random_state(state)
    again = [device_rng().random((4,), dtype="float32").tolist(), device_rng().standard_normal((2,)).tolist()]
    assert again == expected


def test_a_state_saved_before_device_generators_still_loads():
    from minimoe.backend import random_state, set_random_state

    old = {key: value for key, value in random_state().items() if key in ("seed", "host", "numpy")}
    set_random_state(old)


@pytest.fixture
def deterministic_adds(monkeypatch):
    """Bit-exact comparisons on fakegpu need add.at in a fixed order; on a real GPU atomic adds make a resumed run
    equal to an uninterrupted one only up to float rounding (see the README's GPU section)."""
    monkeypatch.setattr("minimoe.backend.deterministic_atomic_adds", True)


class _Interrupt(Exception):
    pass


def _stop_at(step_to_stop):
    def on_step(step, record):
        if step == step_to_stop:
            raise _Interrupt
    return on_step


def _tiny(seed=0, **overrides):
    minimoe.manual_seed(seed)
    return Transformer(ModelConfig(**{**dict(vocab_size=26, dim=16, n_layers=1, n_heads=2, n_routed_experts=4,
                                             moe_inter_dim=8, max_seq_len=48), **overrides}))


def _host_parameters(model):
    return {name: minimoe.to_host(p).copy() for name, p in model.state_dict().items()}


def test_pretraining_resumes_bit_for_bit_on_fakegpu(tmp_path, fakegpu, deterministic_adds):
    """Dropout and gate noise draw from the device generator: both must continue where they stopped."""
    from minimoe.tasks import AdditionTask
    from minimoe.train import PretrainConfig, pretrain

    config = PretrainConfig(steps=5, batch_size=8, warmup_steps=2, eval_every=5, eval_batch_size=8,
                            checkpoint_every=2, seed=3)
    options = dict(dropout=0.1, gate_noise_std=0.5, bias_update_speed=1e-2)
    straight = _tiny(**options)
    pretrain(straight, AdditionTask(3), config, out_dir=str(tmp_path / "a"), progress=False)
    with pytest.raises(_Interrupt):
        pretrain(_tiny(**options), AdditionTask(3), config, out_dir=str(tmp_path / "b"), progress=False,
                 on_step=_stop_at(3))
    resumed = _tiny(seed=99, **options)
    minimoe.manual_seed(12345)
    pretrain(resumed, AdditionTask(3), config, out_dir=str(tmp_path / "b"),
             resume_from=str(tmp_path / "b" / "pretrain_last"), progress=False)
    for name, value in _host_parameters(straight).items():
        np.testing.assert_array_equal(_host_parameters(resumed)[name], value, err_msg=name)


def test_grpo_resumes_bit_for_bit_on_fakegpu_including_sampling(tmp_path, fakegpu, deterministic_adds):
    from minimoe.rl import GRPOConfig, train_grpo
    from minimoe.tasks import AdditionTask

    config = GRPOConfig(steps=4, prompts_per_step=2, group_size=4, warmup_steps=1, max_new_tokens=12,
                        checkpoint_every=2, seed=1,
                        allow_weak_base=True)  # an untrained model: the loop, not the learning
    straight = _tiny()
    expected = train_grpo(straight, AdditionTask(3), config, out_dir=str(tmp_path / "a"), progress=False)
    with pytest.raises(_Interrupt):
        train_grpo(_tiny(), AdditionTask(3), config, out_dir=str(tmp_path / "b"), progress=False,
                   on_step=_stop_at(3))
    resumed = _tiny(seed=7)
    minimoe.manual_seed(4321)
    history = train_grpo(resumed, AdditionTask(3), config, out_dir=str(tmp_path / "b"),
                         resume_from=str(tmp_path / "b" / "rl_last"), progress=False)
    assert [r["mean_length"] for r in history["steps"]] == [r["mean_length"] for r in expected["steps"]]
    for name, value in _host_parameters(straight).items():
        np.testing.assert_array_equal(_host_parameters(resumed)[name], value, err_msg=name)


# --------------------------------------------------------------------------------------------------------------
# python -m minimoe.gpucheck
# --------------------------------------------------------------------------------------------------------------

def test_gpucheck_without_a_gpu_says_so_and_exits_2():
    import os
    import subprocess
    import sys

    from minimoe.backend import BackendUnavailableError, backend_named

    try:
        backend_named("cupy")
        pytest.skip("a GPU is usable here")
    except BackendUnavailableError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "minimoe.gpucheck"], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert result.returncode == 2
    assert "no usable GPU here" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_gpucheck_comparison_passes_on_the_stand_in():
    from minimoe.gpucheck import compare_with_numpy

    checks = compare_with_numpy("fakegpu", batch=4, length=17, new_tokens=4)
    assert len(checks) == 10 and all(check.ok for check in checks), "\n".join(map(str, checks))
    for preset in ("v3", "classic"):  # the default model and the classic one, five checks each
        assert sum(f"{preset} model" in check.name for check in checks) == 5
