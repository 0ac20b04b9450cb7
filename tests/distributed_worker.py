"""Run by tests/test_distributed.py under `mpiexec -n W python tests/distributed_worker.py CHECK...`, one process
per rank (also runs alone, as one rank). Every rank builds the same single-process reference from the same seed,
runs it on the whole batch, and compares its own part of the expert-parallel answer with it, in float64.
Any failure on any rank aborts the whole job with that rank's message (abort_on_error). Rank 0 prints one JSON
line {"check": worst error} per check."""

import json
import os
import sys

import numpy as np

import minimoe
from minimoe import distributed as D
from minimoe.autograd import Tensor
from minimoe.nn import MoE

TOLERANCE = 1e-12

# (name, MoE options): top-k 1..4, softmax and sigmoid, shared experts, group-limited routing, capacity, balance
LAYER_CASES = [
    ("top1_softmax_aux", dict(n_activated_experts=1, aux_loss_alpha=0.01)),
    ("top2_shared_seq_z", dict(n_activated_experts=2, n_shared_experts=1, seq_aux_alpha=0.01, z_loss_coef=1e-3)),
    ("top3_sigmoid_groups_bias", dict(n_activated_experts=3, score_func="sigmoid", n_groups=4, topk_groups=2,
                                      route_scale=2.5, bias_update_speed=0.01, aux_loss_alpha=0.01)),
    ("top4_capacity", dict(n_activated_experts=4, n_shared_experts=2, capacity_factor=0.75, aux_loss_alpha=0.01)),
    ("top2_sigmoid_capacity_groups", dict(n_activated_experts=2, score_func="sigmoid", n_groups=2, topk_groups=1,
                                          capacity_factor=1.0, seq_aux_alpha=0.01)),
]


def worst(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b), initial=0.0))


def check_layer(comm, name, options, batch=4, seq_len=5, dim=6, n_experts=8):
    """Output, input gradient, every expert's, the gate's and the shared experts' gradients, the balance terms,
    the stats and the bias update: expert-parallel on this rank's slice vs single-process on the whole batch."""
    if batch % comm.size:
        batch = comm.size * 2
    reference = make_moe(options, dim, n_experts)
    initial = {n: np.array(value) for n, value in reference.state_dict().items()}
    rng = np.random.default_rng(2)
    x_all = rng.standard_normal((batch, seq_len, dim))
    probe = rng.standard_normal((batch, seq_len, dim))  # loss = Σ y ⊙ probe + balance
    x_ref = Tensor(x_all, requires_grad=True)
    y_ref = reference(x_ref)
    loss_ref = (y_ref * Tensor(probe)).sum()
    if reference.balance_loss is not None:
        loss_ref = loss_ref + reference.balance_loss
    loss_ref.backward()
    reference_grads = {n: p.grad.copy() for n, p in reference.named_parameters() if p.grad is not None}
    reference_stats = {key: np.asarray(value) for key, value in reference.stats.items() if key != "router_entropy"}
    reference.update_bias()
    reference_bias = None if reference.gate.bias is None else reference.gate.bias.copy()

    whole = make_moe(options, dim, n_experts)
    whole.load_state_dict(initial)
    layer = D.ExpertParallelMoE(whole, comm)
    part = slice(comm.rank * batch // comm.size, (comm.rank + 1) * batch // comm.size)
    x = Tensor(x_all[part], requires_grad=True)
    y = layer(x)
    loss = (y * Tensor(probe[part])).sum()
    if layer.balance_loss is not None:
        loss = loss + layer.balance_loss
    loss.backward()
    layer.update_bias()

    errors = {"output": worst(y.data, y_ref.data[part]), "input_grad": worst(x.grad, x_ref.grad[part])}
    errors["loss"] = worst(comm.allreduce(np.array([loss.item()])), [loss_ref.item()])
    replicated = {n: p for n, p in layer.named_parameters() if not n.startswith("experts.")}
    for n, p in replicated.items():  # each rank holds its tokens' part of the gradient: the sum is the whole
        grad = comm.allreduce(p.grad if p.grad is not None else np.zeros_like(p.data))
        errors[f"grad {n}"] = worst(grad, reference_grads.get(n, np.zeros_like(grad)))
    for i, expert in enumerate(layer.experts):  # experts: the gradient from every rank's tokens is already here
        for n, p in expert.named_parameters():
            full = f"experts.{layer.first_expert + i}.{n}"
            grad = p.grad if p.grad is not None else np.zeros_like(p.data)
            errors[f"grad {full}"] = worst(grad, reference_grads.get(full, np.zeros_like(grad)))
    for key, value in reference_stats.items():
        errors[f"stats {key}"] = worst(layer.stats[key], value)
    if reference.capacity_factor is not None and not reference_stats["dropped"] > 0:
        raise AssertionError(f"{name}: the capacity dropped nothing, so the case checks no dropping")
    if reference_bias is not None:
        if not np.abs(reference_bias - initial["gate.bias"]).min() > 0:
            raise AssertionError(f"{name}: the bias update changed nothing")
        errors["bias update"] = worst(layer.gate.bias, reference_bias)
    return errors


def make_moe(options, dim, n_experts):
    """The same MoE on every rank (same seed), with a small random routing bias when it has one."""
    minimoe.manual_seed(1)
    options = dict(options)
    moe = MoE(dim, n_experts, options.pop("n_activated_experts"), 5, options.pop("n_shared_experts", 0),
              capacity_factor=options.pop("capacity_factor", None), **options)
    if moe.gate.bias is not None:
        moe.gate.bias[...] = np.random.default_rng(3).uniform(-0.05, 0.05, n_experts)
    return moe


def run_layer(comm):
    results = {}
    for name, options in LAYER_CASES:
        errors = check_layer(comm, name, options)
        worst_error = max(comm.allgather(max(errors.values())))
        bad = {key: value for key, value in errors.items() if not value <= TOLERANCE}
        if bad:
            raise AssertionError(f"expert-parallel MoE {name} on rank {comm.rank} of {comm.size} differs from "
                                 f"the single-process MoE beyond {TOLERANCE}: {bad}")
        results[f"layer {name}"] = worst_error
    return results


def run_training(comm, steps=3, batch=4, seq_len=7):
    """Data + expert parallel training steps of a small Transformer (each rank a quarter/half of the batch) vs one
    process on the whole batch: the loss of every step, and every parameter and optimizer buffer at the end."""
    from minimoe.model import ModelConfig, Transformer
    from minimoe.optim import AdamW, WarmupCosine
    from minimoe.train import lm_loss, optimizer_step

    config = ModelConfig(vocab_size=16, dim=16, n_heads=2, max_seq_len=8, moe_inter_dim=8, score_func="sigmoid",
                         n_expert_groups=4, n_limited_groups=2, aux_loss_alpha=0.01, seq_aux_alpha=0.01,
                         z_loss_coef=1e-3, bias_update_speed=0.01, capacity_factor=1.5)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 16, (steps, batch, seq_len))
    targets = np.where(rng.random((steps, batch, seq_len)) < 0.3, -100, rng.integers(0, 16, (steps, batch, seq_len)))

    def build():
        minimoe.manual_seed(4)
        model = Transformer(config)
        return model

    reference = build()
    optimizer = AdamW(reference.parameters(), lr=1e-2)
    scheduler = WarmupCosine(optimizer, 1, steps)
    reference_losses = []
    for step in range(steps):
        loss, _ = lm_loss(reference, ids[step], targets[step])
        optimizer_step(reference, optimizer, scheduler, loss, grad_clip=0.5)
        reference.update_routing_bias()
        reference_losses.append(loss.item())

    model = D.shard_model(build(), comm)
    sharded_optimizer = AdamW(model.parameters(), lr=1e-2)
    sharded_scheduler = WarmupCosine(sharded_optimizer, 1, steps)
    losses = []
    for step in range(steps):
        record = D.training_step(model, sharded_optimizer, sharded_scheduler, D.batch_part(ids[step], comm),
                                 D.batch_part(targets[step], comm), 0.5, comm)
        losses.append(record["loss"])
    errors = {"training loss": worst(losses, reference_losses)}
    gathered = D.gather_state_dict(model, sharded_optimizer, comm)
    if comm.rank == 0:
        state, buffers = gathered
        for name, value in reference.state_dict().items():
            errors[f"trained {name}"] = worst(state[name], value)
        names = [name for name, _ in reference.named_parameters()]
        for name, saved in zip(names, optimizer.state):
            for key, value in saved.items():
                errors[f"adam {key} {name}"] = worst(buffers[name][key], value)
    worst_error = max(comm.allgather(max(errors.values())))
    if not worst_error <= TOLERANCE:
        bad = {key: value for key, value in errors.items() if not value <= TOLERANCE}
        raise AssertionError(f"data + expert parallel training on rank {comm.rank} of {comm.size} differs from "
                             f"one process beyond {TOLERANCE}: {bad}")
    return {"training": worst_error}


def run_mismatch(comm):
    """Ranks built with different settings: refused at start-up, on every rank."""
    minimoe.manual_seed(0)
    D.ExpertParallelMoE(MoE(4, 8, 1 + comm.rank % 2, 4), comm)
    return {}


PRETRAIN = dict(steps=8, batch_size=8, eval_every=4, checkpoint_every=4, warmup_steps=2, eval_batch_size=8, seed=3)


def _pretraining_setup():
    from minimoe.model import ModelConfig, Transformer
    from minimoe.tasks import AdditionTask, Tokenizer
    from minimoe.train import PretrainConfig

    tokenizer = Tokenizer()
    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=16, n_heads=2, moe_inter_dim=8,
                                    aux_loss_alpha=0.01, bias_update_speed=0.01))
    return model, AdditionTask(3), PretrainConfig(**PRETRAIN), tokenizer


def run_pretrain_interrupted(comm):
    """`distributed.pretrain` on this world, stopped after step 5 as if killed: its checkpoint holds step 4."""
    model, task, config, tokenizer = _pretraining_setup()

    def stop(step, record):
        if step == 5:
            sys.exit(0)

    D.pretrain(model, task, config, tokenizer, out_dir=OUT, progress=False, on_step=stop, comm=comm)
    raise AssertionError("pretrain did not stop")


def run_pretrain_resumed(comm):
    """Resume the interrupted run on this world (another number of ranks) to the end; compare the loss curve and
    the final checkpoint (loaded in one process) with one process that trained all 8 steps on the whole batch."""
    from minimoe.checkpoint import load_checkpoint
    from minimoe.train import pretrain

    model, task, config, tokenizer = _pretraining_setup()
    resumed = os.path.join(OUT, "pretrain_last")
    model = load_checkpoint(resumed, restore_random_state=False)[0]
    history = D.pretrain(model, task, config, tokenizer, out_dir=OUT, resume_from=resumed, progress=False,
                         comm=comm)
    errors = {}
    if comm.rank == 0:
        whole, _, _, _ = _pretraining_setup()
        reference = pretrain(whole, task, config, tokenizer, progress=False)
        errors["pretrain loss curve"] = worst(history["loss"], reference["loss"])
        errors["pretrain heldout"] = worst([e["heldout_loss"] for e in history["eval"]],
                                           [e["heldout_loss"] for e in reference["eval"]])
        loaded, state = load_checkpoint(resumed, restore_random_state=False)
        if state["step"] != 8:
            raise AssertionError(f"the final checkpoint is at step {state['step']}, not 8")
        for name, value in whole.state_dict().items():
            errors[f"checkpoint {name}"] = worst(loaded.state_dict()[name], value)
        worst_error = max(errors.values())
        if not worst_error <= TOLERANCE:
            raise AssertionError(f"resumed distributed pretraining differs from one process: "
                                 f"{ {k: v for k, v in errors.items() if not v <= TOLERANCE} }")
    return {"pretrain resumed": comm.bcast(max(errors.values()) if errors else None)}


def run_one_rank_fails(comm):
    """Rank 1 fails while the others wait in a collective for it: the job must end, with rank 1's message."""
    if comm.rank == 1:
        raise RuntimeError("rank 1 broke on purpose")
    comm.barrier()  # without the abort, this would wait forever
    return {}


CHECKS = {"one_rank_fails": run_one_rank_fails, "pretrain_interrupted": run_pretrain_interrupted, "pretrain_resumed": run_pretrain_resumed, "layer": run_layer, "training": run_training, "mismatch": run_mismatch}


OUT = None  # the run folder of the pretraining checks: --out DIR


def main(names):
    global OUT
    if "--out" in names:
        OUT = names[names.index("--out") + 1]
        names = [name for name in names if name not in ("--out", OUT)]
    comm = D.world()
    with D.abort_on_error(comm):
        minimoe.set_default_dtype("float64")
        results = {}
        for name in names:
            results.update(CHECKS[name](comm))
        if comm.rank == 0:
            print(json.dumps({"world_size": comm.size, **results}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CHECKS))
