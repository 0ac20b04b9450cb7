"""Expert parallelism across processes (minimoe.distributed): what the all-to-all moves, and who waits for whom.

    python -m benchmarks --only distributed        launches `mpiexec -n 4 python -m benchmarks.distributed` itself
    mpiexec -n 4 python -m benchmarks.distributed  the same measurements, printed as one JSON line by rank 0

Four ranks, each one "node" (so every exchange between ranks crosses nodes), 16 routed experts (4 per rank), top-4,
sigmoid scores, dim 256, 512 tokens per rank, float32. Measured:

  traffic     bytes per token that cross nodes in the dispatch, without and with node-limited routing (each token's
              experts on at most M = 2 of the 4 nodes: the gate's groups are the nodes), counted two ways: one row
              per (token, expert) assignment as this implementation sends them, and one row per token and remote
              node as DeepSeek-V3's dispatch does (a token crosses to a node once and is forwarded inside it). The
              combine sends as much back. With collapsed routing (a bias that draws tokens to rank 0's experts)
              and after the auxiliary-loss-free bias has balanced it again (updated from the global load).
  imbalance   forward + backward of the layer: the slowest rank's compute time over the mean rank's, and the
              step time (set by the slowest rank: the others wait in the all-to-all), collapsed vs balanced
  comm share  time inside MPI calls (waiting included) over the step time, balanced routing
  overlap     the shared expert computed while the dispatch Ialltoallv is in flight (request.Test() between chunks
              of it: without a progress thread MPI moves data only inside MPI calls), against dispatch-then-compute.
              On one machine the "network" is a memory copy made by the same busy cores, so there is little or
              nothing to hide it behind: the saving needs hardware that moves the data while the cores compute
              (a NIC, NVLink copy engines; DeepSeek-V3 gives 20 of its SMs to communication).

Absolute times mean little on a 2-core machine running 4 ranks: read the ratios and the bytes. The V3 rows apply the
same counting to DeepSeek-V3's published shape (256 routed experts, 8 active, 1 shared, dim 7168, 64-way expert
parallelism over 8 nodes, at most 4 nodes per token, FP8 dispatch, BF16 combine) under uniform routing.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

WORLD_SIZE = 4
V3 = dict(n_routed_experts=256, n_activated_experts=8, dim=7168, nodes=8, max_nodes=4, dispatch_bytes=1,
          combine_bytes=2)


def run(quick=False):
    """The parent side, for `python -m benchmarks`: launch the ranks, read rank 0's JSON back, as Entries."""
    from minimoe.distributed import find_mpiexec

    from .common import Entry

    mpiexec = find_mpiexec()
    if mpiexec is None:
        print("benchmarks: distributed skipped: mpiexec not found; `pip install mpi4py mpich` "
              "(in requirements.txt) provides it", file=sys.stderr)
        return []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    command = [mpiexec, "-n", str(WORLD_SIZE), sys.executable, "-m", "benchmarks.distributed"]
    process = subprocess.run(command + (["--quick"] if quick else []), cwd=root, env=env, capture_output=True,
                             text=True, timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"benchmarks.distributed failed under mpiexec:\n{process.stdout}\n{process.stderr}")
    rows = json.loads(process.stdout.strip().splitlines()[-1])
    return [Entry(f"distributed: {name}", unit, value) for name, (unit, value) in rows.items()]


# ==============================================================================================================
# the ranks' side
# ==============================================================================================================

def _timed(comm_class):
    """A Communicator that adds the time spent in its collectives (waiting for the other ranks included)."""
    class TimedCommunicator(comm_class):
        seconds = 0.0

        def _time(self, method, *args, **kwargs):
            started = time.perf_counter()
            result = method(*args, **kwargs)
            self.seconds += time.perf_counter() - started
            return result

        def alltoallv(self, *args, **kwargs):
            return self._time(super().alltoallv, *args, **kwargs)

        def alltoall(self, *args, **kwargs):
            return self._time(super().alltoall, *args, **kwargs)

        def allreduce(self, *args, **kwargs):
            return self._time(super().allreduce, *args, **kwargs)

    return TimedCommunicator


def build_layer(comm, node_limit, collapsed, dim=256, n_experts=16, top_k=4, inter=128):
    """The same MoE on every rank, sharded. collapsed: a bias drawing every token to rank 0's experts."""
    import minimoe
    from minimoe import distributed as D
    from minimoe.nn import MoE

    minimoe.manual_seed(0)
    options = D.node_limited_routing(comm.size // comm.ranks_per_node, node_limit) if node_limit else {}
    moe = MoE(dim, n_experts, top_k, inter, n_shared_experts=1, score_func="sigmoid", bias_update_speed=0.02,
              **options)
    if collapsed:
        moe.gate.bias[: n_experts // comm.size] = 0.3
    return D.ExpertParallelMoE(moe, comm)


def balance(layer, x, updates=60):
    """The auxiliary-loss-free bias, updated from the global load on a fixed batch until the load is even."""
    from minimoe.autograd import no_grad

    with no_grad():
        for _ in range(updates):
            layer(x)
            layer.update_bias()


def tokens(comm, dim=256, batch=8, seq_len=64):
    import minimoe

    rng = np.random.default_rng(100 + comm.rank)
    return minimoe.Tensor(rng.standard_normal((batch, seq_len, dim)).astype(np.float32))


def measure_traffic(comm):
    from minimoe.autograd import no_grad

    rows = {}
    x = tokens(comm)
    for limit in (None, 2):
        for state in ("collapsed", "balanced"):
            layer = build_layer(comm, limit, collapsed=True)
            if state == "balanced":
                balance(layer, x)
            with no_grad():
                layer(x)
            counted = {key: comm.allreduce(np.array([value], dtype=np.float64))[0]
                       for key, value in layer.traffic.items()}
            n_tokens = counted["tokens"]
            load = np.asarray(layer.stats["tokens_per_expert"]).reshape(comm.size, -1).sum(axis=1)  # per rank
            label = f"{'no node limit' if limit is None else f'<= {limit} of {comm.size} nodes'}, {state}"
            rows[f"bytes/token across nodes, per assignment, {label}"] = ("bytes", counted["across_node"] / n_tokens)
            rows[f"bytes/token across nodes, once per node (V3), {label}"] = (
                "bytes", counted["across_node_once"] / n_tokens)
            rows[f"nodes per token, {label}"] = ("nodes", counted["nodes_per_token"] / comm.size)
            rows[f"busiest rank's rows / mean, {label}"] = ("ratio", float(load.max() / load.mean()))
    for how in ("per assignment", "once per node (V3)"):
        for state in ("collapsed", "balanced"):
            without = rows[f"bytes/token across nodes, {how}, no node limit, {state}"][1]
            with_limit = rows[f"bytes/token across nodes, {how}, <= 2 of {comm.size} nodes, {state}"][1]
            rows[f"node limit: across-node bytes with / without, {how}, {state}"] = ("ratio", with_limit / without)
    return rows


def _median_times(comm, layer, x, repeats):
    """Per rank: median step time and median time inside MPI calls, forward + backward."""
    import minimoe

    probe = minimoe.Tensor(np.ones(x.shape, dtype=np.float32))
    steps, waits = [], []
    for _ in range(repeats + 1):
        comm.barrier()
        layer.comm.seconds = 0.0
        started = time.perf_counter()
        x.grad = None
        (layer(x) * probe).sum().backward()
        steps.append(time.perf_counter() - started)
        waits.append(layer.comm.seconds)
    return statistics.median(steps[1:]), statistics.median(waits[1:])


def measure_imbalance(comm, repeats):
    from minimoe import distributed as D

    rows = {}
    timed = _timed(D.Communicator)(comm.mpi, comm.ranks_per_node)
    x = tokens(comm)
    x.requires_grad = True
    results = {}
    for state in ("collapsed", "balanced"):
        layer = build_layer(comm, None, collapsed=True)
        if state == "balanced":
            balance(layer, x)
        layer.comm = timed
        step, wait = _median_times(comm, layer, x, repeats)
        results[state] = comm.allgather((step, wait))
    for state, per_rank in results.items():
        compute = [step - wait for step, wait in per_rank]
        rows[f"slowest / mean rank compute time, {state}"] = ("ratio", max(compute) / statistics.mean(compute))
        rows[f"step time, {state}"] = ("ms", 1e3 * max(step for step, _ in per_rank))
    rows["step time collapsed / balanced"] = ("ratio", rows["step time, collapsed"][1] / rows["step time, balanced"][1])
    balanced = results["balanced"]
    rows["time in MPI calls / step time, balanced"] = (
        "ratio", statistics.mean(wait / step for step, wait in balanced))
    return rows


def measure_overlap(comm, repeats, dim=256, shared_inter=1024, rows_per_rank=2048):
    """Dispatch (Alltoallv of the routed rows) then the shared expert, against the shared expert computed while
    a non-blocking Ialltoallv is in flight. Raw arrays: the shape of the overlap, without autograd."""
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((512, dim)).astype(np.float32)  # this rank's tokens
    routed = rng.standard_normal((rows_per_rank, dim)).astype(np.float32)  # the rows to dispatch
    w1, w3 = (rng.standard_normal((shared_inter, dim)).astype(np.float32) * 0.05 for _ in range(2))
    w2 = rng.standard_normal((dim, shared_inter)).astype(np.float32) * 0.05
    counts = [rows_per_rank // comm.size] * comm.size

    def shared_expert(request=None, chunks=8):
        """SwiGLU on the tokens in chunks; between chunks request.Test() lets MPI move the dispatch along
        (without a progress thread, MPI advances a non-blocking exchange only inside MPI calls)."""
        out = []
        for part in np.array_split(x, chunks):
            a, b = part @ w1.T, part @ w3.T
            out.append((a / (1 + np.exp(-a)) * b) @ w2.T)
            if request is not None:
                request.Test()
        return np.concatenate(out)

    def one(kind):
        comm.barrier()
        started = time.perf_counter()
        if kind == "dispatch":
            comm.alltoallv(routed, counts, counts)
        elif kind == "shared":
            shared_expert()
        elif kind == "serial":
            comm.alltoallv(routed, counts, counts)
            shared_expert()
        else:
            request, _ = comm.alltoallv(routed, counts, counts, wait=False)
            shared_expert(request)
            request.Wait()
        return max(comm.allgather(time.perf_counter() - started))  # the step waits for the slowest rank

    times = {kind: statistics.median([one(kind) for _ in range(repeats)])
             for kind in ("dispatch", "shared", "serial", "overlapped")}
    saved = times["serial"] - times["overlapped"]
    return {"overlap: dispatch alone": ("ms", 1e3 * times["dispatch"]),
            "overlap: shared expert alone": ("ms", 1e3 * times["shared"]),
            "overlap: dispatch then shared expert": ("ms", 1e3 * times["serial"]),
            "overlap: shared expert during Ialltoallv": ("ms", 1e3 * times["overlapped"]),
            "overlap: time saved / the most it could save": (
                "ratio", saved / min(times["dispatch"], times["shared"]))}


def v3_rows():
    """DeepSeek-V3's shape under uniform routing: expected remote nodes per token without and with the node
    limit, and the bytes that cross nodes per token and MoE layer (dispatch FP8 + combine BF16)."""
    c = V3
    per_node = c["n_routed_experts"] // c["nodes"]
    # P(a given node holds none of the 8 experts) when 8 of 256 are drawn uniformly without replacement
    empty = math.comb(c["n_routed_experts"] - per_node, c["n_activated_experts"]) / \
        math.comb(c["n_routed_experts"], c["n_activated_experts"])
    remote_free = (c["nodes"] - 1) * (1 - empty)
    # limited: M nodes chosen among 8 (the token's own one of them with probability M/8), each almost surely used
    remote_limited = c["max_nodes"] - c["max_nodes"] / c["nodes"]
    per_assignment = c["n_activated_experts"] * (c["nodes"] - 1) / c["nodes"]
    row = c["dim"] * (c["dispatch_bytes"] + c["combine_bytes"])
    return {"V3 shape: remote nodes per token, no node limit": ("nodes", remote_free),
            "V3 shape: remote nodes per token, <= 4 of 8 nodes": ("nodes", remote_limited),
            "V3 shape: KB/token/layer across nodes, per assignment": ("KB", per_assignment * row / 1e3),
            "V3 shape: KB/token/layer across nodes, once per node, no limit": ("KB", remote_free * row / 1e3),
            "V3 shape: KB/token/layer across nodes, once per node, <= 4 nodes": ("KB", remote_limited * row / 1e3),
            "V3 shape: node limit, across-node bytes with / without": ("ratio", remote_limited / remote_free)}


def main(argv=None):
    from minimoe import distributed as D

    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    comm = D.world(ranks_per_node=1)
    with D.abort_on_error(comm):
        rows = {**measure_traffic(comm), **measure_imbalance(comm, 3 if quick else 7),
                **measure_overlap(comm, 5 if quick else 15), **v3_rows()}
        if comm.rank == 0:
            print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
