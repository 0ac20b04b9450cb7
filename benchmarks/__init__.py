"""minimoe timed side by side with PyTorch, on the same machine, in one run.

    python -m benchmarks [--json PATH] [--backend numpy|cupy] [--threads N] [--quick] [--only NAMES]

Every figure compares minimoe with an efficient eager PyTorch twin of the same model (benchmarks/torch_model.py):
same configuration, same weights (loaded from minimoe's state dict), float32, the same number of threads. The two
run in turns and each figure is a median over the rounds (benchmarks/common.py). Benchmarks:

    training    a training step (forward, backward, AdamW) of the demo model and of a 4× wider one
    generation  tokens/s of cached greedy generation, batch 64, MHA and MLA
    moe         an MoE layer as the routed experts grow from 8 to 64 (top-2): cost follows activated parameters
    overhead    the fixed cost of one op on tiny tensors, and the share of a step spent in BLAS matrix products
    memory      peak memory of a 200-step training run, each framework in a process of its own
    distributed expert parallelism on 4 MPI ranks (launches mpiexec): bytes per token across nodes with and
                without node-limited routing, the slowest rank under collapsed vs balanced routing, time in
                communication, overlap of the shared expert with the dispatch; minimoe figures only

Not timed, and run on its own: `python -m benchmarks.specialisation`, the experiments of lesson 15 (do the
experts specialise? before and after GRPO, fine-grained vs coarse, shared expert, ablation; several seeds).
"""
