"""Solutions to the exercises of lessons/02_ops_and_broadcasting.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, F, Function, ...).
tests/test_lessons.py runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: my_sum_to
def my_sum_to(grad, shape):
    """Sum `grad` down to `shape`, undoing broadcasting."""
    prepended = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(prepended)))  # the axes broadcasting put in front
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True)  # the size-1 axes it stretched, kept as size 1


# %% exercise: softplus
class Softplus(Function):
    """y = log(1 + eˣ);   dL/dx = g ⊙ σ(x)."""

    def forward(self, x):
        xp = minimoe.get_array_module(x)
        self.save(x)
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))  # e^(-|x|) ≤ 1: no overflow

    def backward(self, g):
        (x,) = self.saved
        xp = minimoe.get_array_module(x)
        return g * 0.5 * (xp.tanh(0.5 * x) + 1)  # σ(x), the stable way


def softplus(x):
    return Softplus()(x)


# %% exercise: cross_entropy_by_hand
def cross_entropy_by_hand(logits, targets):
    """Mean over rows of -log softmax(logits)[row, target], from library ops."""
    rows = np.arange(logits.shape[0])
    return -F.log_softmax(logits)[rows, targets].mean()
