"""Expert parallelism over MPI (DeepSeek-V3 report §2.1.2 and §3.2; GShard, Lepikhin et al. 2020).

One process per device ("rank"). Each rank holds its own tokens (data parallelism) and E/W of the E routed
experts (expert parallelism, W ranks); everything else — embeddings, attention, the gate, the shared experts —
is replicated. An MoE layer then moves tokens, not weights:

    route     every rank runs the (replicated) gate on its own tokens: which K experts, with which weights
    dispatch  Alltoallv: the rows of each (token, expert) assignment go to the rank that owns that expert
              (the row counts are exchanged first, so each rank knows how much it will receive)
    compute   each rank runs its experts on everything it received, grouped by expert (one grouped GEMM)
    combine   Alltoallv back: each result returns to the token's rank, which weights it and sums it in

and backward runs the same exchanges in reverse (the gradient of a send is a receive). The busiest rank sets
the pace of every step: that is why balanced routing matters more here than in one process, and why DeepSeek-V3
limits each token to M nodes (node-limited routing: the gate's groups are the nodes, `topk_groups` = M).

Equal to the single-process `MoE` on the whole batch: the gate's balance terms and the capacity are computed
from the GLOBAL load (an all-reduce of the expert counts), the routing bias is updated from the global load, and
each rank's loss is its *share* of the global loss, so the gradients of the replicated parameters are summed
(`allreduce_gradients`) and the experts' gradients — which arrive from every rank through the combine's backward —
need no reduction at all.

Capacity dropping needs the global view: an expert keeps its `capacity` best assignments of the whole batch.
Here it is decided where the whole view exists: on the expert's rank, which receives all the expert's
assignments (with their scores) in global token order, keeps the best `capacity` and returns zeros for the rest.

Randomness is per rank: with gate noise (noise_std > 0) or dropout, each rank draws its own, so such a run is a
valid run but not the single-process one. Everything else is deterministic and equal to one process.

MPI moves host memory: arrays go to the host before an exchange and back to the device after it, explicitly
(`to_host`, `upload`); on NumPy both are free. Run with `mpiexec -n W python ...`; without mpiexec (or without
mpi4py) `world()` is a one-rank communicator and the same code runs in one process.
"""

import math
import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np
from tqdm.auto import tqdm

from . import functional as F
from .autograd import Function, Tensor
from .backend import backend_of, get_array_module, random_state, set_random_state
from .checkpoint import NonFiniteCheckpointError, load_checkpoint, save_checkpoint
from .model import Transformer
from .nn import Module, ModuleList, MoE
from .nn.moe import GroupedLinear, Renormalize
from .optim import AdamW
from .tasks import Tokenizer, build_corpus
from .loop import TrainingDiverged, checkpoint_due
from .train import PretrainConfig, heldout_loss, lm_batch, make_optimizer

__all__ = ["Communicator", "world", "find_mpiexec", "abort_on_error", "to_host", "upload", "AllToAll", "ExpertParallelMoE",
           "traffic", "node_limited_routing", "shard_model", "gather_state_dict", "load_full_state_dict",
           "allreduce_gradients", "clip_grad_norm", "lm_loss_share", "training_step", "batch_part", "pretrain",
           "MPI_MISSING"]

MPI_MISSING = ("mpi4py / mpiexec not found: install them with `pip install mpi4py mpich` (or `pip install -r "
               "requirements.txt`); the mpich wheel provides `mpiexec`")

_LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


# ==============================================================================================================
# host <-> device
# ==============================================================================================================

def to_host(array):
    """A contiguous host NumPy array with the data of a backend array (a device->host copy for device arrays)."""
    host = backend_of(array).to_numpy(array)
    return host if host.flags.c_contiguous else np.ascontiguousarray(host)  # (ascontiguousarray makes 0-d 1-d)


def upload(host_array, like):
    """The host array on the backend of `like` (a host->device copy for device backends)."""
    return backend_of(like).asarray(host_array)


# ==============================================================================================================
# the communicator
# ==============================================================================================================

class Communicator:
    """The few collectives expert parallelism needs, on host NumPy arrays. Wraps an mpi4py communicator, or
    nothing: a one-rank world where every collective is the identity, so single-process code is the same code.

    rank, size            -- this process, and how many there are
    ranks_per_node        -- how ranks group into "nodes" for the traffic count (default: all on one node)
    """

    def __init__(self, mpi_comm=None, ranks_per_node=None):
        self.mpi = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()
        self.ranks_per_node = ranks_per_node or self.size
        if self.size % self.ranks_per_node:
            raise ValueError(f"Communicator: ranks_per_node={self.ranks_per_node} must divide the world size "
                             f"{self.size}")

    def node_of(self, rank):
        return rank // self.ranks_per_node

    def allreduce(self, array):
        """Σ over ranks of a host array (every rank gets the sum)."""
        array = np.require(array, requirements="C")
        if self.mpi is None:
            return array.copy()
        total = np.empty_like(array)
        self.mpi.Allreduce(array, total)
        return total

    def alltoall(self, rows):
        """rows (size, ...) host array: row j goes to rank j; returns (size, ...) with row i from rank i."""
        rows = np.ascontiguousarray(rows)
        if self.mpi is None:
            return rows.copy()
        received = np.empty_like(rows)
        self.mpi.Alltoall(rows, received)
        return received

    def alltoallv(self, rows, send_counts, recv_counts, wait=True):
        """Variable all-to-all of the rows of a host array (n, ...): the first send_counts[0] rows go to rank 0,
        the next send_counts[1] to rank 1, ...; returns the rows received, rank 0's first. With wait=False,
        returns (request, receive buffer) of a non-blocking Ialltoallv: the buffer is filled once
        request.Wait() returns, and the caller computes something else meanwhile."""
        rows = np.ascontiguousarray(rows)
        width = math.prod(rows.shape[1:])
        received = np.empty((int(sum(recv_counts)), *rows.shape[1:]), dtype=rows.dtype)
        if self.mpi is None:
            received[...] = rows
            return received if wait else (_DoneRequest(), received)
        send = [rows, (_elements(send_counts, width), _offsets(send_counts, width))]
        receive = [received, (_elements(recv_counts, width), _offsets(recv_counts, width))]
        if wait:
            self.mpi.Alltoallv(send, receive)
            return received
        return self.mpi.Ialltoallv(send, receive), received

    def allgather(self, value):
        """[value of rank 0, value of rank 1, ...] (any picklable object)."""
        return [value] if self.mpi is None else self.mpi.allgather(value)

    def gather(self, value):
        """On rank 0 the list of every rank's value; None elsewhere."""
        return [value] if self.mpi is None else self.mpi.gather(value, root=0)

    def bcast(self, value):
        """Rank 0's value, on every rank (the others' `value` is ignored)."""
        return value if self.mpi is None else self.mpi.bcast(value, root=0)

    def barrier(self):
        if self.mpi is not None:
            self.mpi.Barrier()

    def check_same(self, what, value):
        """Raise on every rank if `value` differs between ranks (checked at start-up: configurations)."""
        values = self.allgather(value)
        different = [rank for rank, other in enumerate(values) if other != values[0]]
        if different:
            other = values[different[0]]
            if isinstance(value, dict):  # name the settings that differ
                values = [{key: v.get(key) for key in sorted(set(values[0]) | set(other)) if values[0].get(key) !=
                           other.get(key)} for v in (values[0], other)]
                other = values[1]
            raise ValueError(f"distributed: {what} differs between ranks: rank 0 has {values[0]!r}, rank "
                             f"{different[0]} has {other!r}; every rank must be started with the same settings")

    def abort(self, code=1):
        if self.mpi is not None:
            self.mpi.Abort(code)
        sys.exit(code)


class _DoneRequest:
    """The request of an exchange that a one-rank world completed at once."""

    def Test(self):
        return True

    def Wait(self):
        pass


def _elements(counts, width):
    return np.asarray(counts, dtype=np.int64) * width


def _offsets(counts, width):
    counts = _elements(counts, width)
    return np.cumsum(counts) - counts


def find_mpiexec():
    """The path of `mpiexec`: the one installed next to this Python (the mpich wheel puts it there, also in a
    virtual environment that is not activated), else the first on PATH; None when there is none."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


def world(ranks_per_node=None):
    """The communicator of this job: MPI's world when the process was started by mpiexec, else one rank.
    (mpi4py is imported only under a launcher: a plain `python` never initialises MPI.)"""
    if not any(variable in os.environ for variable in _LAUNCHER_VARIABLES):
        return Communicator(None, ranks_per_node)
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(f"distributed: started by a launcher but {MPI_MISSING}") from error
    return Communicator(MPI.COMM_WORLD, ranks_per_node)


@contextmanager
def abort_on_error(comm):
    """Any exception on any rank prints that rank's message and aborts the whole job: no rank is left waiting
    in a collective for a partner that died."""
    try:
        yield
    except BaseException as error:  # noqa: B036 - SystemExit and KeyboardInterrupt must abort the job too
        if comm.size == 1 or (isinstance(error, SystemExit) and not error.code):
            raise
        message = "".join(traceback.format_exception(error))
        sys.stderr.write(f"[rank {comm.rank} of {comm.size}] {message}")
        sys.stderr.flush()
        # mpiexec forwards a rank's stderr on its own schedule, and an abort can end the job before it has: once,
        # on a busy machine, the message was lost (an error with no reason). A moment's pause here lets it out.
        time.sleep(1.0)
        comm.abort(1)


# ==============================================================================================================
# the exchange, as an op
# ==============================================================================================================

class AllToAll(Function):
    """Rows sent to other ranks: x (S, d) -> (R, d), the rows this rank receives (rank 0's first).

        forward:  the first send_counts[0] rows of x go to rank 0, the next send_counts[1] to rank 1, ...
        backward: the gradient rows travel back the way the rows came: the same exchange, counts swapped

    Dispatch and combine are both this op (combine is a dispatch with the counts swapped). Every rank must call
    it in the same order, forward and backward: the graphs are identical on every rank, so they do."""

    def __init__(self, comm, send_counts, recv_counts):
        self.comm, self.send_counts, self.recv_counts = comm, send_counts, recv_counts

    def forward(self, x):
        return upload(self.comm.alltoallv(to_host(x), self.send_counts, self.recv_counts), x)

    def backward(self, g):
        return upload(self.comm.alltoallv(to_host(g), self.recv_counts, self.send_counts), g)


# ==============================================================================================================
# the expert-parallel MoE layer
# ==============================================================================================================

class ExpertParallelMoE(MoE):
    """An `MoE` whose routed experts are spread over the ranks of `comm`: rank r holds experts
    [r·E/W, (r+1)·E/W). Made from a whole MoE (the same on every rank): it keeps the gate and the shared experts
    (replicated) and its own slice of the experts. x (B, T, dim) are this rank's tokens; the output is what the
    single-process MoE gives for them when run on the concatenation of every rank's batch (rank 0's first).

    balance_loss -- this rank's share of the global balance loss (the shares sum to the global value)
    stats        -- as MoE's, for the global batch ("tokens_per_expert", "imbalance", "dropped",
                    "router_entropy", and the balance terms' global values)
    traffic      -- what this rank's dispatch sent in the last forward (host numbers; see `traffic`)

    Node-limited routing (DeepSeek-V3): the experts of one node are one contiguous block, so the gate's
    group-limited routing with n_groups = the number of nodes and topk_groups = M sends each token to at most M
    nodes (`node_limited_routing` gives those gate options).
    """

    def __init__(self, moe, comm):
        Module.__init__(self)  # not MoE's: the experts are not built again
        n_experts, world_size = moe.n_routed_experts, comm.size
        if n_experts % world_size:
            raise ValueError(f"ExpertParallelMoE: the world size {world_size} must divide n_routed_experts="
                             f"{n_experts} (each rank holds the same number of experts); run with a number of "
                             f"ranks among {[w for w in range(1, n_experts + 1) if n_experts % w == 0]}")
        comm.check_same("the MoE layer's configuration", _moe_config(moe))
        self.comm = comm
        self.dim, self.n_routed_experts, self.n_activated_experts = moe.dim, n_experts, moe.n_activated_experts
        self.moe_inter_dim, self.n_shared_experts = moe.moe_inter_dim, moe.n_shared_experts
        self.capacity_factor = moe.capacity_factor
        self.gate, self.shared_experts = moe.gate, moe.shared_experts
        self.experts_per_rank = n_experts // world_size
        self.first_expert = comm.rank * self.experts_per_rank
        self.experts = ModuleList(list(moe.experts)[self.first_expert:self.first_expert + self.experts_per_rank])
        self.balance_loss = self.stats = self.traffic = None

    def forward(self, x):
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"ExpertParallelMoE: expected an input (B, T, dim={self.dim}), got shape {x.shape}")
        comm, xp, k = self.comm, get_array_module(x.data), self.n_activated_experts
        world_size, per_rank = comm.size, self.experts_per_rank
        routing = self.gate(x)
        tokens = x.reshape(-1, self.dim)  # (n, dim) this rank's tokens
        n = tokens.shape[0]
        local_counts = to_host(routing.counts)  # (E,) this rank's load: the one device->host copy of routing
        n_sequences = math.prod(x.shape[:-2])
        global_counts = comm.allreduce(np.append(local_counts, [n, n_sequences]))  # the global load, N, sequences
        counts, n_global, global_sequences = global_counts[:-2], int(global_counts[-2]), int(global_counts[-1])

        # Dispatch: assignments sorted by expert are also sorted by rank (rank r owns a contiguous block of
        # experts). First every rank learns how many rows of each of its experts it will get from each rank.
        expert_of = routing.indices.reshape(-1)  # (n·K,)
        order = xp.argsort(expert_of, kind="stable")  # (n·K,) by expert, in token order within each
        token_of = order // k
        incoming = comm.alltoall(local_counts.reshape(world_size, per_rank))  # (W, E/W) rows from rank i, expert j
        send_rows, receive_rows = local_counts.reshape(world_size, per_rank).sum(1), incoming.sum(1)  # (W,), (W,)
        received = AllToAll(comm, send_rows, receive_rows)(tokens[token_of])  # (R, dim) rank 0's rows first

        # Compute: the received rows grouped by local expert. A stable sort keeps each expert's rows in global
        # token order (rank 0's tokens first), the order the single-process layer sees them in.
        expert_of_row = np.repeat(np.tile(np.arange(per_rank), world_size), incoming.reshape(-1))  # (R,)
        by_expert = np.argsort(expert_of_row, kind="stable")  # (R,)
        sizes = incoming.sum(0)  # (E/W,)
        capacity = self._capacity(n_global) if self.training else None
        if capacity is not None:
            score = xp.take_along_axis(routing.scores.data, routing.indices, axis=-1).reshape(-1)[order]  # (n·K,)
            received_score = comm.alltoallv(to_host(score), send_rows, receive_rows)  # (R,)
            by_expert, sizes = _keep_best(received_score, expert_of_row, sizes, capacity)
        rows = upload(by_expert, routing.counts)
        routed = received[rows]  # (A, dim) A = Σ sizes, kept rows grouped by local expert
        gate_proj = _grouped(sizes, routed, [e.w1.weight for e in self.experts])  # (A, I)
        up_proj = _grouped(sizes, routed, [e.w3.weight for e in self.experts])  # (A, I)
        expert_out = _grouped(sizes, F.swiglu(gate_proj, up_proj), [e.w2.weight for e in self.experts])  # (A, dim)
        # back in arrival order; a dropped row stays 0 and so adds nothing where it returns
        results = F.index_add(Tensor(xp.zeros(received.shape, dtype=received.dtype)), rows, expert_out)  # (R, dim)

        # Combine: the results go back to their tokens' ranks, in the order they were sent; weight, sum.
        returned = AllToAll(comm, receive_rows, send_rows)(results)  # (n·K, dim)
        weights = routing.weights.reshape(-1)[order]  # (n·K,)
        base = self.shared_experts(tokens) if self.shared_experts is not None else Tensor(xp.zeros_like(tokens.data))
        y = F.index_add(base, token_of, returned * weights.unsqueeze(-1))  # (n, dim)

        dropped = 0 if capacity is None else int(np.maximum(counts - capacity, 0).sum())
        self._record_global(routing, counts, n_global, (n_sequences, global_sequences), dropped, xp)
        self.traffic = traffic(to_host(routing.indices), comm.rank, per_rank, comm.ranks_per_node,
                               row_bytes=self.dim * x.dtype.itemsize)
        return y.reshape(x.shape)

    def _record_global(self, routing, counts, n_global, sequences, dropped, xp):
        """balance_loss: this rank's share of each global balance term (the shares sum to the global term);
        stats: the global values. `sequences` (local, global) count the sequences."""
        shares = {}
        n_local = routing.scores.shape[0]
        if self.gate.aux_loss_alpha > 0:
            # α Σ_i f_i P_i with f_i from the global counts and P_i = (1/N) Σ_t p_{t,i} over ALL N tokens: this
            # rank's share is its own tokens' part of P_i
            scores = routing.scores
            probabilities = scores if self.gate.score_func == "softmax" else Renormalize()(scores)  # (n, E)
            fraction = xp.asarray(counts * (self.n_routed_experts / (self.n_activated_experts * n_global)),
                                  dtype=scores.dtype)  # (E,)
            shares["aux_loss"] = self.gate.aux_loss_alpha * (probabilities.sum(axis=0) * fraction).sum() / n_global
        if "seq_aux_loss" in routing.losses:  # a mean over sequences, each one whole on one rank
            shares["seq_aux_loss"] = routing.losses["seq_aux_loss"] * (sequences[0] / sequences[1])
        if "z_loss" in routing.losses:  # a mean over tokens
            shares["z_loss"] = routing.losses["z_loss"] * (n_local / n_global)
        values = list(shares.values())
        self.balance_loss = sum(values[1:], values[0]) if values else None
        p = routing.scores.data / routing.scores.data.sum(axis=-1, keepdims=True)  # (n, E)
        entropy = -xp.vdot(p, xp.log(xp.maximum(p, xp.finfo(p.dtype).tiny)))  # Σ over this rank's tokens
        totals = self.comm.allreduce(np.array([to_host(v) for v in [share.data for share in values] + [entropy]],
                                              dtype=np.float64))
        self.stats = {"tokens_per_expert": upload(counts, routing.counts),
                      "imbalance": xp.asarray(counts.max() / counts.mean()), "dropped": xp.asarray(dropped),
                      "router_entropy": xp.asarray(totals[-1] / n_global),
                      **{name: xp.asarray(total) for name, total in zip(shares, totals)}}

    def update_bias(self):
        """Auxiliary-loss-free balancing from the GLOBAL load: the ranks' loads since the last update are summed
        first, so every rank applies the same change to its copy of the bias."""
        gate = self.gate
        if gate.bias is None:
            return
        local = np.zeros(self.n_routed_experts, dtype=np.int64) if gate.load_since_update is None \
            else to_host(gate.load_since_update)
        total = self.comm.allreduce(local)
        gate.load_since_update = upload(total, gate.bias) if total.any() else None
        gate.update_bias()

    def extra_repr(self):
        return f"experts {self.first_expert}..{self.first_expert + self.experts_per_rank - 1} of " \
               f"{self.n_routed_experts} on rank {self.comm.rank} of {self.comm.size}; " + super().extra_repr()


def traffic(indices, rank, experts_per_rank, ranks_per_node, row_bytes):
    """Bytes the dispatch of one rank's tokens sends, given their chosen experts `indices` (n, K) (the combine
    sends as many back):
        within_node, across_node -- as sent here, one row per (token, expert) assignment to another rank
        across_node_once         -- one row per token and remote node: DeepSeek-V3's dispatch, where a token
                                    crosses to a node once (InfiniBand) and is forwarded inside it (NVLink)
        nodes_per_token          -- the mean number of distinct nodes a token's experts are on
        tokens                   -- n
    """
    destination = indices // experts_per_rank  # (n, K) ranks
    node, own_node = destination // ranks_per_node, rank // ranks_per_node  # (n, K), its own
    across = node != own_node
    nodes = np.sort(node, axis=-1)
    first_of_node = np.concatenate([np.ones((len(nodes), 1), dtype=bool), nodes[:, 1:] != nodes[:, :-1]], axis=1)
    return {"within_node": int(((destination != rank) & ~across).sum()) * row_bytes,
            "across_node": int(across.sum()) * row_bytes,
            "across_node_once": int((first_of_node & (nodes != own_node)).sum()) * row_bytes,
            "nodes_per_token": float(first_of_node.sum(axis=1).mean()) if len(nodes) else 0.0,
            "tokens": int(len(nodes))}


def node_limited_routing(n_nodes, max_nodes):
    """Gate options for DeepSeek-V3's node-limited routing: the experts of each node form one group, and a token
    picks its experts from its `max_nodes` best nodes (MoE(..., **node_limited_routing(4, 2)))."""
    if not 1 <= max_nodes <= n_nodes:
        raise ValueError(f"node_limited_routing: max_nodes={max_nodes} must be between 1 and n_nodes={n_nodes}")
    return {"n_groups": n_nodes, "topk_groups": max_nodes}


def _grouped(sizes, x, weights):
    """x (A, in) in consecutive groups of `sizes` rows, group j times weights[j]ᵀ (one graph node)."""
    return GroupedLinear([int(size) for size in sizes])(x, *weights)


def _keep_best(score, expert_of_row, sizes, capacity):
    """The received rows each local expert keeps under its capacity: its `capacity` highest-scoring rows (ties
    to the earlier row, i.e. the earlier token of the global batch, as in the single-process MoE). Returns the
    kept rows grouped by expert, best first within each, and the kept count per expert. Host arrays."""
    by_score = np.argsort(-score, kind="stable")
    grouped = by_score[np.argsort(expert_of_row[by_score], kind="stable")]  # by expert, best first in each
    first = np.cumsum(sizes) - sizes  # (E/W,)
    place = np.arange(grouped.shape[0]) - first[expert_of_row[grouped]]  # place within its expert
    return grouped[place < capacity], np.minimum(sizes, capacity)


def _moe_config(moe):
    """The settings an MoE layer must share across ranks, by name (for the start-up check's message)."""
    gate = moe.gate
    names = ["dim", "n_routed_experts", "n_activated_experts", "moe_inter_dim", "n_shared_experts", "capacity_factor"]
    gate_names = ["score_func", "route_scale", "n_groups", "topk_groups", "noise_std", "aux_loss_alpha",
                  "seq_aux_alpha", "z_loss_coef", "bias_update_speed"]
    return {**{name: getattr(moe, name) for name in names}, **{name: getattr(gate, name) for name in gate_names}}


# ==============================================================================================================
# data + expert parallel training
# ==============================================================================================================

def shard_model(model, comm):
    """Make `model` (a Transformer, built the same way on every rank) data + expert parallel, in place: check
    that every rank has the same configuration, give every rank rank 0's weights (so a different seed on one
    rank cannot split the model), then replace each MoE layer by an ExpertParallelMoE holding this rank's
    experts. Returns the model. Build the optimizer after this: it must hold this rank's parameters."""
    comm.check_same("the model configuration", model.config.to_dict())
    if comm.size > 1:
        model.load_state_dict(comm.bcast({name: to_host(value) for name, value in model.state_dict().items()}))
    for layer in model.layers:
        if isinstance(layer.ffn, MoE) and not isinstance(layer.ffn, ExpertParallelMoE):
            layer.ffn = ExpertParallelMoE(layer.ffn, comm)
    return model


def _expert_renames(model):
    """{local name prefix: single-process name prefix} for this rank's experts, e.g. on rank 1 of 2 with 8
    experts "layers.0.ffn.experts.0." -> "layers.0.ffn.experts.4."."""
    return {f"{prefix}.experts.{j}.": f"{prefix}.experts.{module.first_expert + j}."
            for prefix, module in model.named_modules() if isinstance(module, ExpertParallelMoE)
            for j in range(module.experts_per_rank)}


def _global_name(name, renames):
    """The single-process name of a state entry of this rank (an expert's index becomes its global index)."""
    for local, full in renames.items():
        if name.startswith(local):
            return full + name[len(local):]
    return name


def _is_expert_parameter(name, renames):
    return any(name.startswith(local) for local in renames)


def gather_state_dict(model, optimizer=None, comm=None):
    """The single-process state of a sharded model, on rank 0 (None elsewhere): {name: host array} with every
    expert under its global index, and, with an optimizer, its state_dict() in the single-process parameter
    order. Every rank must call it (it is a collective)."""
    renames = _expert_renames(model)
    names = [name for name, _ in model.named_parameters()]
    mine = {_global_name(name, renames): to_host(value) for name, value in model.state_dict().items()
            if comm.rank == 0 or _is_expert_parameter(name, renames)}
    buffers = {} if optimizer is None else {
        _global_name(name, renames): {key: value if key == "step" else to_host(value) for key, value in state.items()}
        for name, state in zip(names, optimizer.state) if comm.rank == 0 or _is_expert_parameter(name, renames)}
    pieces = comm.gather((mine, buffers))
    if comm.rank != 0:
        return None
    state, optimizer_buffers = {}, {}
    for model_part, optimizer_part in pieces:
        state.update(model_part)
        optimizer_buffers.update(optimizer_part)
    if optimizer is None:
        return state
    return state, optimizer_buffers


def load_full_state_dict(model, state, optimizer=None, optimizer_buffers=None, step=0, lr=None):
    """Load a single-process state (e.g. from a checkpoint written by any number of ranks) into a sharded model:
    each rank takes the replicated entries and its own experts (state None: the model is left alone); with an
    optimizer, its buffers likewise, from {single-process parameter name: buffers}.
    A state whose expert count does not match the model's configuration is refused by name."""
    renames = _expert_renames(model)
    if state is not None:
        _load_model_part(model, state, renames)
    if optimizer is not None:
        names = [_global_name(name, renames) for name, _ in model.named_parameters()]
        optimizer.load_state_dict({"step": step, "lr": optimizer.lr if lr is None else lr,
                                   "state": [optimizer_buffers.get(name, {}) for name in names]})


def _load_model_part(model, state, renames):
    own = {_global_name(name, renames): name for name in model.state_dict()}
    expected_experts = {name for name in own if ".experts." in name and ".shared_experts." not in name}
    saved_experts = {name for name in state if ".experts." in name and ".shared_experts." not in name}
    if not expected_experts <= saved_experts:
        missing = sorted(expected_experts - saved_experts)[:3]
        raise ValueError(f"load_full_state_dict: the saved state lacks experts this rank holds ({missing} ...): it "
                         "is not a whole model's state (a shard from another number of ranks?); save with "
                         "gather_state_dict, which writes every expert")
    model.load_state_dict({local: state[name] for name, local in own.items()})


def _replicated_and_expert_parameters(model):
    experts = {id(p) for module in model.moe_layers() if isinstance(module, ExpertParallelMoE)
               for p in module.experts.parameters()}
    parameters = model.parameters()
    return [p for p in parameters if id(p) not in experts], [p for p in parameters if id(p) in experts]


def allreduce_gradients(model, comm):
    """Sum the gradients of the replicated parameters over the ranks, in one all-reduce of one flat buffer.
    Each rank's loss is its share of the global loss (lm_loss_share), so the sum is the global gradient; the
    experts' gradients already are (every rank's tokens sent theirs back through the combine). A gradient
    that no rank has stays None, as in one process (the optimizer then leaves the parameter alone)."""
    replicated, _ = _replicated_and_expert_parameters(model)
    if comm.size == 1:
        return
    host = [np.zeros(p.shape, dtype=np.float64) if p.grad is None else to_host(p.grad) for p in replicated]
    flags = np.array([p.grad is not None for p in replicated], dtype=np.float64)
    total = comm.allreduce(np.concatenate([flags] + [h.reshape(-1).astype(np.float64) for h in host]))
    flags, offset = total[:len(replicated)], len(replicated)
    for p, has_grad in zip(replicated, flags):
        values = total[offset:offset + p.size].reshape(p.shape)
        offset += p.size
        p.grad = upload(values.astype(p.dtype), p.data) if has_grad else None


def clip_grad_norm(model, max_norm, comm):
    """clip_grad_norm_ over the whole (sharded) model: the global L2 norm counts the replicated gradients once
    and every rank's experts. Call after allreduce_gradients. Returns the norm before clipping (host float)."""
    replicated, experts = _replicated_and_expert_parameters(model)
    squares = lambda params: sum(float(to_host(get_array_module(p.grad).vdot(p.grad, p.grad)))  # noqa: E731
                                 for p in params if p.grad is not None)
    total = math.sqrt(squares(replicated) + float(comm.allreduce(np.array([squares(experts)]))[0]))
    scale = min(max_norm / (total + 1e-6), 1.0)
    for p in replicated + experts:
        if p.grad is not None:
            p.grad *= p.grad.dtype.type(scale)
    return total


def lm_loss_share(model, inputs, targets, comm, ignore_index=-100):
    """(share of the total loss, share of the next-token loss) for this rank's part of the global batch.
    The global mean over counted targets is Σ over ranks of (this rank's sum / the global count), so the
    shares add up to exactly the single-process loss (plain averaging of per-rank means would weight a rank
    with fewer counted targets too much). The balance terms are shares already (ExpertParallelMoE)."""
    counted = comm.allreduce(to_host((targets != ignore_index).sum()).reshape(1).astype(np.int64))[0]
    lm = F.cross_entropy(model(inputs), targets, ignore_index=ignore_index, reduction="sum") / max(int(counted), 1)
    balance = model.balance_loss()
    return (lm if balance is None else lm + balance), lm


def training_step(model, optimizer, scheduler, inputs, targets, grad_clip, comm):
    """One data + expert parallel step on this rank's part of the global batch: loss share, backward, gradient
    all-reduce, global clipping, AdamW, schedule, the routing bias from the global load. Returns host floats
    {"loss", "lm_loss", "grad_norm"} of the global batch, the same on every rank."""
    loss, lm = lm_loss_share(model, inputs, targets, comm)
    optimizer.zero_grad()
    loss.backward()
    allreduce_gradients(model, comm)
    grad_norm = clip_grad_norm(model, grad_clip, comm)
    optimizer.step()
    scheduler.step()
    model.update_routing_bias()
    total, lm_total = comm.allreduce(np.array([loss.item(), lm.item()]))
    return {"loss": float(total), "lm_loss": float(lm_total), "grad_norm": grad_norm}


def batch_part(array, comm):
    """This rank's rows of a global batch (B, ...): rank r gets rows [r·B/W, (r+1)·B/W)."""
    if array.shape[0] % comm.size:
        raise ValueError(f"distributed: the global batch of {array.shape[0]} rows does not split evenly over "
                         f"{comm.size} ranks; choose a batch size divisible by {comm.size}")
    rows = array.shape[0] // comm.size
    return array[comm.rank * rows:(comm.rank + 1) * rows]


def pretrain(model, task, config=None, tokenizer=None, out_dir=None, resume_from=None, progress=True, on_step=None,
             comm=None):
    """`minimoe.train.pretrain`, data + expert parallel over the ranks of `comm` (default: the MPI world).
    Every rank draws the same global batch of config.batch_size problems and trains on its own B/W rows; the
    history is the global one (the same on every rank), and equals the single-process run's up to round-off.
    One checkpoint, `out_dir/pretrain_last`, is written by rank 0 in the single-process format (every expert
    gathered), on the single-process schedule (minimoe.loop.checkpoint_due), so it loads in one process and
    resumes on any number of ranks. `model` is the whole model (the same on every rank); it is sharded in place.
    The held-out loss is computed by every rank on the whole held-out batch (the same answer, W times the work:
    evaluation is not this module's subject). on_step is called as on_step(step, record) on every rank after
    every step."""
    comm = comm or world()
    config = config or PretrainConfig()
    tokenizer = tokenizer or Tokenizer()
    with abort_on_error(comm):
        comm.check_same("the pretraining configuration", config.to_dict())
        out_dir = comm.bcast(out_dir)  # rank 0 writes the checkpoint: its run folder is the run folder
        batch_part(np.empty(config.batch_size), comm)  # refuse an uneven split before anything starts
        history = {"step": [], "loss": [], "lm_loss": [], "lr": [], "grad_norm": [], "expert_load": [],
                   "router_entropy": [], "eval": [], "seconds": 0.0}
        data_rng = np.random.default_rng(config.seed)
        start_step, history, saved = _resume_whole(model, config, resume_from, history, data_rng)
        shard_model(model, comm)
        optimizer, scheduler = make_optimizer(model, config, config.steps)
        _load_optimizer_part(model, optimizer, scheduler, saved)
        checkpoint = os.path.join(out_dir, "pretrain_last") if out_dir else None
        last_saved = (resume_from, start_step) if resume_from is not None else None
        model.train()
        started = time.perf_counter() - history["seconds"]
        steps = range(start_step + 1, config.steps + 1)
        for step in tqdm(steps, desc=f"pretrain ({comm.size} ranks)", disable=not progress or comm.rank != 0):
            record = _parallel_pretrain_step(model, optimizer, scheduler, task, tokenizer, config, data_rng, comm)
            _check_loss(step, record["loss"], last_saved)  # nothing is saved from a diverged step
            record = {"step": step, **record}
            for key, value in record.items():
                history[key].append(value)
            if on_step:
                on_step(step, record)
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                history["eval"].append({"step": step, "heldout_loss": heldout_loss(model, task, tokenizer, config)})
                model.train()
            history["seconds"] = time.perf_counter() - started
            if checkpoint and checkpoint_due(step, config.checkpoint_every, config.steps):
                _save_gathered(checkpoint, model, optimizer, scheduler, config, comm,
                               {"step": step, "history": history, "config": config.to_dict(),
                                "data_rng": data_rng.bit_generator.state, "world_size": comm.size})
                last_saved = (checkpoint + ".npz", step)
        history["seconds"] = time.perf_counter() - started
        return history


def _resume_whole(model, config, resume_from, history, data_rng):
    """Before sharding: load the interrupted run's checkpoint into the whole model, as one process would, and
    restore the data generator. Returns (start step, history, the optimizer's saved state or None), where that
    state is (buffers by parameter name, optimizer state_dict, scheduler state_dict)."""
    if resume_from is None:
        return 0, history, None
    whole_optimizer, whole_scheduler = make_optimizer(model, config, config.steps)
    _, state = load_checkpoint(resume_from, model, whole_optimizer, whole_scheduler)
    if state.get("config") != config.to_dict():
        raise ValueError(f"pretrain: cannot resume from {resume_from!r}: it was saved with a different "
                         f"PretrainConfig ({state.get('config')} vs {config.to_dict()})")
    data_rng.bit_generator.state = state["data_rng"]
    buffers = dict(zip([name for name, _ in model.named_parameters()], whole_optimizer.state))
    return state["step"], state["history"], (buffers, whole_optimizer.state_dict(), whole_scheduler.state_dict())


def _load_optimizer_part(model, optimizer, scheduler, saved):
    """After sharding: this rank's part of the resumed optimizer's state, and the schedule (saved None: a new
    run, nothing to do)."""
    if saved is None:
        return
    buffers, optimizer_state, scheduler_state = saved
    load_full_state_dict(model, None, optimizer, buffers, step=optimizer_state["step"], lr=optimizer_state["lr"])
    scheduler.load_state_dict(scheduler_state)


def _parallel_pretrain_step(model, optimizer, scheduler, task, tokenizer, config, data_rng, comm):
    """`minimoe.train.pretrain_step` over the ranks: every rank draws the same global batch and trains on its
    rows. Returns the global record: loss, lm_loss, grad_norm, lr and the routing summary."""
    corpus = build_corpus(task, config.batch_size, data_rng, config.mix, split="train")
    inputs, targets = lm_batch(corpus, tokenizer)
    lr = optimizer.lr
    record = training_step(model, optimizer, scheduler, batch_part(inputs, comm), batch_part(targets, comm),
                           config.grad_clip, comm)
    return {**record, "lr": lr, **model.routing_summary()}


def _where_last_checkpoint(last_saved):
    if last_saved is None:
        return "there is no checkpoint to resume from"
    path, step = last_saved
    return f"the last checkpoint is {path} (step {step})"


def _check_loss(step, loss_value, last_saved):
    """The divergence guard of minimoe.loop.TrainingRun.check_loss, on the global loss (the same on every rank,
    so every rank stops)."""
    if not math.isfinite(loss_value):
        raise TrainingDiverged(f"pretrain: the loss became {loss_value} at step {step}; stopping "
                               f"({_where_last_checkpoint(last_saved)}). Try a lower learning rate or a smaller "
                               "grad_clip.")


def _save_gathered(checkpoint, model, optimizer, scheduler, config, comm, state):
    """Every rank sends its experts and their optimizer buffers to rank 0 (a collective: every rank must call
    it), which writes them as one single-process checkpoint of a whole model; the others wait for the write."""
    gathered = gather_state_dict(model, optimizer, comm)
    if comm.rank == 0:
        weights, buffers = gathered
        generators = random_state()  # building a model draws its initial weights: leave no trace
        whole = Transformer(model.config)
        set_random_state(generators)
        whole.load_state_dict(weights)
        whole_optimizer = AdamW(whole.parameters(), lr=optimizer.lr, weight_decay=config.weight_decay)
        names = [name for name, _ in whole.named_parameters()]
        whole_optimizer.load_state_dict({"step": optimizer.step_count, "lr": optimizer.lr,
                                         "state": [buffers.get(name, {}) for name in names]})
        try:
            save_checkpoint(checkpoint, whole, whole_optimizer, scheduler, state)
        except NonFiniteCheckpointError as error:
            raise TrainingDiverged(f"pretrain: the weights became non-finite at step {state['step']}; stopping. "
                                   f"{error}") from None
    comm.barrier()
