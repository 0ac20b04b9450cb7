"""Expert parallelism (minimoe.distributed): the checks in tests/distributed_worker.py run under
`mpiexec -n W` for W = 1, 2, 4 (oversubscribed on a small machine), each rank comparing its part of the
expert-parallel answer with the single-process layer on the whole batch in float64. Any rank's failure aborts
the job with that rank's message, which this test shows; a timeout catches a hang."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minimoe
from minimoe import distributed as D
from minimoe.checkpoint import load_checkpoint
from minimoe.nn import MoE

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
MPIEXEC = D.find_mpiexec()
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason=D.MPI_MISSING)


def launch(world_size, *args, script=WORKER, timeout=60):
    """Run `mpiexec -n world_size python script args` (script None: `python args`); the completed process."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    command = [MPIEXEC, "-n", str(world_size), sys.executable, *([script] if script else []), *args]
    return subprocess.run(command, env=env,
                          capture_output=True, text=True, timeout=timeout)


def results_of(process):
    assert process.returncode == 0, f"mpiexec failed ({process.returncode}):\n{process.stdout}\n{process.stderr}"
    return json.loads(process.stdout.strip().splitlines()[-1])


@needs_mpiexec
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_expert_parallel_equals_single_process(world_size):
    results = results_of(launch(world_size, "layer", "training"))
    assert results["world_size"] == world_size
    assert len([key for key in results if key.startswith("layer ")]) == 5
    assert all(value <= 1e-12 for key, value in results.items() if key.startswith("layer "))


@needs_mpiexec
def test_a_failing_rank_aborts_the_job_with_its_message():
    process = launch(3, "layer", timeout=30)  # 3 ranks cannot share 8 experts
    assert process.returncode != 0
    assert "[rank" in process.stderr and "world size 3 must divide n_routed_experts=8" in process.stderr


@needs_mpiexec
def test_one_failing_rank_ends_the_job_while_the_others_wait():
    process = launch(2, "one_rank_fails", timeout=30)  # a hang would raise TimeoutExpired
    assert process.returncode != 0
    assert "[rank 1 of 2]" in process.stderr and "rank 1 broke on purpose" in process.stderr


@needs_mpiexec
def test_mismatched_configuration_across_ranks_is_refused():
    process = launch(2, "mismatch", timeout=30)
    assert process.returncode != 0
    assert "differs between ranks" in process.stderr


def test_without_mpiexec_the_world_is_one_process():
    comm = D.world()
    assert (comm.rank, comm.size) == (0, 1)
    counts = np.array([3, 1])
    assert np.array_equal(comm.alltoallv(np.arange(4.0)[:, None], [4], [4]), np.arange(4.0)[:, None])
    assert np.array_equal(comm.allreduce(counts), counts)


def test_world_size_must_divide_the_experts():
    class FakeWorld(D.Communicator):
        rank, size = 0, 3

        def __init__(self):
            self.mpi, self.ranks_per_node = None, 3

    minimoe.manual_seed(0)
    with pytest.raises(ValueError, match=r"world size 3 must divide n_routed_experts=8.*\[1, 2, 4, 8\]"):
        D.ExpertParallelMoE(MoE(4, 8, 2, 4), FakeWorld())


def test_launcher_without_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(ImportError, match="pip install mpi4py mpich"):
        D.world()


def _tiny_pretraining(**settings):
    from minimoe.model import ModelConfig, Transformer
    from minimoe.train import PretrainConfig

    minimoe.manual_seed(0)
    config = PretrainConfig.from_dict({**PretrainConfig().to_dict(), "steps": 3, "batch_size": 4, "eval_every": 0,
                                       "warmup_steps": 1, **settings})
    return Transformer(ModelConfig(dim=16, n_heads=2, moe_inter_dim=16)), config


def test_one_rank_pretraining_saves_on_the_single_process_schedule(tmp_path):
    """checkpoint_every=0 saves only after the last step, as minimoe.loop.checkpoint_due says for one process."""
    from minimoe.tasks import AdditionTask

    model, config = _tiny_pretraining(checkpoint_every=0)
    history = D.pretrain(model, AdditionTask(), config, out_dir=str(tmp_path), progress=False)
    assert history["step"] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "pretrain_last")[1]["step"] == 3


def test_a_diverged_loss_stops_pretraining_with_the_loops_error(monkeypatch):
    from minimoe.loop import TrainingDiverged
    from minimoe.tasks import AdditionTask

    real_step = D.training_step

    def diverged(*args):
        return {**real_step(*args), "loss": float("nan")}

    monkeypatch.setattr(D, "training_step", diverged)
    model, config = _tiny_pretraining()
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 1; stopping \(there is no checkpoint"):
        D.pretrain(model, AdditionTask(), config, progress=False)


@needs_mpiexec
def test_pretraining_resumes_on_another_number_of_ranks_and_matches_one_process(tmp_path):
    """Interrupted after step 5 on 2 ranks (checkpoint at step 4), resumed on 4: the loss curve and the final
    checkpoint, loaded in one process, equal one process training all the way on the whole batch (float64)."""
    first = launch(2, "pretrain_interrupted", "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    results = results_of(launch(4, "pretrain_resumed", "--out", str(tmp_path)))
    assert results["pretrain resumed"] <= 1e-12


@needs_mpiexec
def test_train_command_under_mpiexec_follows_the_single_process_loss_curve(tmp_path):
    """`mpiexec -n 2 python -m minimoe train` in float32: the same loss curve as one process, to float32
    round-off (the sums over ranks run in another order): |Δloss| ≤ 1e-5 over 6 steps."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"dim": 16, "n_heads": 2, "moe_inter_dim": 16},
                                  "pretrain": {"steps": 6, "batch_size": 8, "eval_every": 0, "checkpoint_every": 6,
                                               "warmup_steps": 2}}))
    curves = {}
    for world_size in (1, 2):
        out = tmp_path / f"run{world_size}"
        process = launch(world_size, "-m", "minimoe", "train", "--config", str(config), "--out", str(out),
                         "--quiet", script=None)
        assert process.returncode == 0, process.stderr
        curves[world_size] = load_checkpoint(out / "pretrain_last")[1]["history"]["loss"]
    assert len(curves[2]) == 6
    assert np.max(np.abs(np.subtract(curves[2], curves[1]))) <= 1e-5


def test_traffic_counts_rows_per_assignment_and_once_per_remote_node():
    # 4 ranks, 2 per node, 2 experts per rank; this is rank 0 (node 0). Token 0 picks experts 0, 1, 4, 6:
    # its own rank twice (free), node 1 twice (ranks 2 and 3). Token 1 picks 2, 3 (rank 1, same node) and 5.
    indices = np.array([[0, 1, 4, 6], [2, 3, 5, 0]])
    counted = D.traffic(indices, rank=0, experts_per_rank=2, ranks_per_node=2, row_bytes=10)
    assert counted["within_node"] == 2 * 10  # token 1's experts 2 and 3 on rank 1
    assert counted["across_node"] == 3 * 10  # experts 4, 6 of token 0, 5 of token 1
    assert counted["across_node_once"] == 2 * 10  # node 1 once per token
    assert counted["nodes_per_token"] == 2.0 and counted["tokens"] == 2


def test_node_limited_routing_sends_each_token_to_at_most_m_nodes():
    minimoe.manual_seed(0)
    moe = MoE(8, 16, 4, 8, **D.node_limited_routing(n_nodes=4, max_nodes=2))
    indices = moe.gate(minimoe.randn(3, 20, 8)).indices  # (60, 4)
    nodes_per_token = D.traffic(indices, rank=0, experts_per_rank=4, ranks_per_node=1, row_bytes=1)["nodes_per_token"]
    assert 1 < nodes_per_token <= 2
    nodes_reached = [len({expert // 4 for expert in row}) for row in indices.tolist()]
    assert max(nodes_reached) == 2
    with pytest.raises(ValueError, match="max_nodes=5 must be between 1 and n_nodes=4"):
        D.node_limited_routing(4, 5)


class TwoRankView(D.Communicator):
    """Rank `rank` of a 2-rank world seen alone (no MPI): enough to build that rank's shard in one process."""

    def __init__(self, rank):
        self.mpi, self.rank, self.size, self.ranks_per_node = None, rank, 2, 2

    def bcast(self, value):
        return value  # every rank built the same model from the same seed


def test_a_shard_is_refused_where_a_whole_model_state_is_expected():
    from minimoe.model import ModelConfig, Transformer

    config = ModelConfig(vocab_size=8, dim=8, n_heads=2, max_seq_len=8, moe_inter_dim=4)
    minimoe.manual_seed(0)
    rank0 = D.shard_model(Transformer(config), TwoRankView(0))
    minimoe.manual_seed(0)
    rank1 = D.shard_model(Transformer(config), TwoRankView(1))
    with pytest.raises(ValueError, match="not a whole model's state"):
        D.load_full_state_dict(rank1, rank0.state_dict())  # rank 0's shard names experts 0-3 only


@pytest.mark.parametrize("backend", ["numpy", "fakegpu"])
def test_one_rank_layer_equals_moe_on_every_backend(backend, float64):
    """World size 1, on a backend that refuses implicit host <-> device copies: the explicit to_host/upload path."""
    options = dict(n_shared_experts=1, capacity_factor=0.8, score_func="sigmoid", aux_loss_alpha=0.01,
                   z_loss_coef=0.01, bias_update_speed=0.01)
    with minimoe.use_backend(backend):
        minimoe.manual_seed(0)
        reference = MoE(8, 8, 2, 6, **options)
        minimoe.manual_seed(0)
        layer = D.ExpertParallelMoE(MoE(8, 8, 2, 6, **options), D.world())
        x = minimoe.randn(2, 5, 8)
        outputs = []
        for moe in (reference, layer):
            y = moe(x)
            (y.sum() + moe.balance_loss).backward()
            moe.update_bias()
            outputs.append((y.numpy(), moe.balance_loss.numpy(), moe.gate.weight.grad, moe.gate.bias))
        for ours, theirs in zip(*outputs):
            np.testing.assert_allclose(D.to_host(ours), D.to_host(theirs), rtol=0, atol=1e-14)
