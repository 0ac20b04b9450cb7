"""minimoe: DeepSeek's two ideas — sparse Mixture-of-Experts and reasoning grown by rewards — from scratch in
NumPy/CuPy, small enough to read and to train on a laptop.

    import minimoe
    import minimoe.functional as F

    x = minimoe.tensor([[1.0, 2.0]], requires_grad=True)
    F.softmax(x).max().backward()
"""

from . import backend
from .autograd import (Function, ShapeError, Tensor, arange, enable_grad, full, get_default_dtype,
                       is_grad_enabled, no_grad, ones, ones_like, rand, randn, set_default_dtype, tensor, zeros,
                       zeros_like)
from .backend import (BackendUnavailableError, available_backends, device_rng, get_array_module, get_backend,
                      manual_seed, set_backend, to_host, use_backend)
from . import functional  # noqa: E402  (attaches the operators to Tensor)
from . import nn, optim  # noqa: E402
from .gradcheck import GradcheckError, gradcheck  # noqa: E402
from .validation import ConfigError  # noqa: E402

__version__ = "0.1.0"
