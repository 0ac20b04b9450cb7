"""Solutions to the exercises of lessons/00_backends.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, ...). tests/test_lessons.py runs the
notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: one_hot
def one_hot(ids, num_classes):
    """(...) integer ids -> (..., num_classes) float32 array with a 1 at each id, on ids' own library."""
    xp = minimoe.get_array_module(ids)
    return (ids[..., None] == xp.arange(num_classes)).astype(xp.float32)


# %% exercise: positional_signal
def positional_signal(x):
    """The same signal as positional_signal_numpy_only, on x's own library."""
    xp = minimoe.get_array_module(x)
    T, C = x.shape
    positions = xp.arange(T)[:, None]  # (T, 1)
    frequencies = 10.0 ** (-xp.arange(C) / C)  # (C,)
    return x + xp.sin(positions * frequencies)  # (T, C)
