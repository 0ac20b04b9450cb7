"""The engine's promises, each probed as a careless user would (issue 9): nothing is copied to the device behind
your back, dtypes never change silently, only numbers make tensors, a backward cannot corrupt other gradients, and
bad arguments to the basic building blocks fail with a message naming them."""

import math

import numpy as np
import pytest

import minimoe
import minimoe.functional as F
from minimoe import Function
from minimoe.nn import Linear
from minimoe.optim import SGD, Adam, AdamW
from minimoe.tasks import Tokenizer


# --------------------------------------------------------------------------------------------------------------
# host and device
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("operand", [np.ones(3, dtype=np.float32), [1.0, 2.0, 3.0]], ids=["ndarray", "list"])
def test_a_device_tensor_refuses_a_host_operand(operand):
    with minimoe.use_backend("fakegpu"):
        t = minimoe.ones(3)
        with pytest.raises(TypeError, match=r"add: a host .* meets a fakegpu tensor.*minimoe.tensor\(value\)"):
            t + operand
        with pytest.raises(TypeError, match="mul: a host"):
            operand * t
        assert (t + 2).numpy().tolist() == [3.0, 3.0, 3.0]  # Python numbers are not host arrays


def test_a_device_tensor_refuses_a_host_gradient():
    with minimoe.use_backend("fakegpu"):
        x = minimoe.ones(3, requires_grad=True)
        with pytest.raises(TypeError, match="gradient is a host ndarray.*lives on fakegpu"):
            (x * 2).backward(np.ones(3, dtype=np.float32))
        (x * 2).backward(minimoe.ones(3))
        assert x.grad.get().tolist() == [2.0, 2.0, 2.0]


def test_numpy_operands_are_fine_on_the_numpy_backend():
    t = minimoe.ones(3)
    assert (t + np.ones(3, dtype=np.float32)).tolist() == [2.0, 2.0, 2.0]


# --------------------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------------------

def test_mixing_float32_and_float64_raises():
    a, b = minimoe.ones(2, dtype="float32"), minimoe.ones(2, dtype="float64")
    with pytest.raises(TypeError, match=r"add: inputs of dtypes float32, float64 would be promoted silently"):
        a + b
    with pytest.raises(TypeError, match="mul: inputs of dtypes float32, float64"):
        a * np.ones(2)  # a float64 NumPy array is a float64 operand
    assert (a + b.astype("float32")).dtype == np.float32


def test_an_integer_tensor_in_a_float_op_raises():
    x, ids = minimoe.ones(3), minimoe.tensor([1, 2, 3])
    with pytest.raises(TypeError, match="mul: inputs of dtypes float32, int64"):
        x * ids
    with pytest.raises(TypeError, match=r"softmax: got int64 input\(s\), which would silently give a float64"):
        F.softmax(ids)
    with pytest.raises(TypeError, match="div: got int64"):
        ids / 2
    assert F.softmax(ids.astype("float32")).dtype == np.float32
    assert (ids + 1).dtype == np.int64  # integer arithmetic stays integer
    assert (x * (ids > 1)).tolist() == [0.0, 1.0, 1.0]  # a boolean mask may join a float op


def test_python_numbers_take_the_tensor_dtype():
    x = minimoe.ones(2, dtype="float32")
    assert (x * 0.1).dtype == (2 ** x).dtype == (x / 3).dtype == np.float32
    assert (x / np.int64(3)).dtype == (x * np.float64(0.5)).dtype == np.float32  # NumPy scalars are numbers too
    assert (x / np.array([1, 2])).tolist() == [1.0, 0.5] and (x / np.array([1, 2])).dtype == np.float32  # counts


# --------------------------------------------------------------------------------------------------------------
# only numbers make tensors
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [["a"], None, "text", [[1, 2], [3]], {"a": 1}, np.array(["x"]),
                                  np.array([object()])], ids=repr)
def test_tensor_refuses_what_is_not_numbers(data):
    with pytest.raises(TypeError, match="tensor: "):
        minimoe.tensor(data)


# --------------------------------------------------------------------------------------------------------------
# the backward contract: never write into g
# --------------------------------------------------------------------------------------------------------------

class _DoublesInPlace(Function):
    """y = 2x with a backward that breaks the contract."""

    def forward(self, x):
        return 2 * x

    def backward(self, g):
        g *= 2
        return g


def test_a_backward_that_writes_into_g_raises():
    x = minimoe.ones(3, requires_grad=True)
    y = x + 0  # Add hands its g to both inputs: an in-place backward downstream would change both
    with pytest.raises(RuntimeError, match=r"_doublesinplace.backward wrote into its upstream gradient g.*g \* 2"):
        (_DoublesInPlace()(y) + y).sum().backward()


def test_the_contract_is_in_the_docstring():
    assert "never write into `g`" in Function.__doc__


def test_a_user_gradient_array_is_not_made_read_only():
    x = minimoe.ones(3, requires_grad=True)
    upstream = np.ones(3, dtype=np.float32)
    (x * 2).backward(upstream)
    assert upstream.flags.writeable


# --------------------------------------------------------------------------------------------------------------
# arguments of the building blocks
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [({"lr": math.nan}, "lr"), ({"lr": math.inf}, "lr"), ({"lr": -1}, "lr"),
                                          ({"lr": "1e-3"}, "lr"), ({"eps": math.nan}, "eps"),
                                          ({"betas": (0.9, 1.0)}, r"betas\[1\]"), ({"betas": 0.9}, "betas"),
                                          ({"weight_decay": -0.1}, "weight_decay")])
def test_adamw_refuses_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=f"AdamW: {name}"):
        AdamW([minimoe.ones(2, requires_grad=True)], **kwargs)


def test_adam_and_sgd_refuse_nan():
    p = [minimoe.ones(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Adam: lr must be a finite number"):
        Adam(p, lr=math.nan)
    with pytest.raises(ValueError, match="SGD: momentum"):
        SGD(p, momentum=math.nan)


@pytest.mark.parametrize("ids", [[1.7], [True], ["3"], [np.float64(2.0)]], ids=repr)
def test_tokenizer_decode_refuses_what_is_not_an_integer(ids):
    with pytest.raises(TypeError, match="Tokenizer.decode: token ids must be integers"):
        Tokenizer().decode(ids)


def test_tokenizer_decode_takes_numpy_integers():
    tokenizer = Tokenizer()
    assert tokenizer.decode(np.array([5, 6])) == tokenizer.decode([5, 6])


@pytest.mark.parametrize("sizes", [(0, 3), (3, 0), (-1, 3), (2.5, 3), (True, 3)], ids=repr)
def test_linear_refuses_sizes_below_one(sizes):
    with pytest.raises(ValueError, match="Linear: (in|out)_features must be an integer ≥ 1"):
        Linear(*sizes)
