"""Solutions to the exercises of lessons/01_autograd.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, math, Scalar, ...). tests/test_lessons.py runs
the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: scalar_exp
def scalar_exp(x):
    """e^x as a Scalar whose parent is x."""
    y = math.exp(x.value)
    return Scalar(y, (x,), (y,))  # d(e^x)/dx = e^x


# %% exercise: numerical_gradient
def numerical_gradient(f, x, eps=1e-6):
    """Central differences (f(x + eps·e_i) - f(x - eps·e_i)) / 2eps for every element i of x."""
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        original = x[i]
        x[i] = original + eps
        above = f(x)
        x[i] = original - eps
        below = f(x)
        x[i] = original  # put it back
        grad[i] = (above - below) / (2 * eps)
    return grad
