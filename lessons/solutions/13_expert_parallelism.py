"""Solutions to the exercises of lesson 13 (expert parallelism). Each section replaces the stub cell of the same
name; it runs in the notebook's namespace."""

# %% exercise: rows_to_each_rank
def rows_to_each_rank(indices, experts_per_rank, world_size):
    """indices (n, K) host int array of chosen experts -> (world_size,) int array: how many rows this rank's
    dispatch sends to each rank (one row per assignment, its own rank included)."""
    return np.bincount((indices // experts_per_rank).reshape(-1), minlength=world_size)


# %% exercise: remote_nodes_per_token
def remote_nodes_per_token(indices, rank, experts_per_rank, ranks_per_node):
    """indices (n, K) chosen experts of this rank's tokens -> (n,) int array: the number of distinct nodes other
    than this rank's own node that hold at least one of the token's experts (V3's once-per-node count)."""
    nodes = np.sort(indices // (experts_per_rank * ranks_per_node), axis=-1)  # (n, K)
    first = np.ones(nodes.shape, dtype=bool)
    first[:, 1:] = nodes[:, 1:] != nodes[:, :-1]  # the first expert of each distinct node
    return (first & (nodes != rank // ranks_per_node)).sum(axis=-1)


# %% exercise: expected_nodes
def expected_nodes(n_experts, k, n_nodes):
    """The expected number of distinct nodes (of n_nodes, each holding n_experts / n_nodes experts) that a token's
    k experts occupy, when the k are drawn uniformly without replacement. A float."""
    per_node = n_experts // n_nodes
    empty = math.comb(n_experts - per_node, k) / math.comb(n_experts, k)  # P(a given node holds none)
    return n_nodes * (1 - empty)
