"""jacobprop: backpropagation made explicit, with structured per-layer Jacobians.

    import jacobprop as jp
    net = jp.Sequential(jp.Dense(4, 16, rng=rng), jp.ReLU(), jp.Dense(16, 3, rng=rng))
    value, grads = net.value_and_grad(x, t, jp.SoftmaxCrossEntropy())
    J = net.jacobian(x)            # dy/dx as a structured operator, (B, 3, 4)
    report = jp.gradcheck(net, x, t, jp.SoftmaxCrossEntropy())
"""

from importlib.metadata import PackageNotFoundError, version

from .checks import (
    CheckEntry,
    GradcheckReport,
    TaylorReport,
    check_layer,
    dottest,
    gradcheck,
    numerical_jacobian,
    taylor_test,
)
from .derivatives import ggn, hessian, ntk
from .errors import GradcheckError, ShapeError
from .io import ModelFileError, load, save
from .jacobian import (
    BatchNormJacobian,
    ConvJacobian,
    CoupledJacobian,
    DiagonalJacobian,
    DiagonalLowRankJacobian,
    GeneralJacobian,
    IdentityJacobian,
    Jacobian,
    KroneckerJacobian,
    PatchesJacobian,
    PoolJacobian,
    SelectionJacobian,
    SharedJacobian,
    SoftmaxJacobian,
    as_jacobian,
)
from .layers import (
    ELU,
    GELU,
    LAYERS,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    Identity,
    Layer,
    LayerNorm,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Residual,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
    register_layer,
)
from .losses import LOSSES, MSE, RMSE, BinaryCrossEntropy, Loss, SoftmaxCrossEntropy, register_loss
from .network import Sequential
from .optim import SGD, Adam, Optimizer
from .scipy_bridge import least_squares, minimize
from .training import Callback, EarlyStopping, FitContext, History, NonFiniteError, fit

try:
    __version__ = version("jacobprop")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "ShapeError",
    "GradcheckError",
    "Jacobian",
    "GeneralJacobian",
    "SharedJacobian",
    "DiagonalJacobian",
    "IdentityJacobian",
    "SoftmaxJacobian",
    "KroneckerJacobian",
    "ConvJacobian",
    "PatchesJacobian",
    "SelectionJacobian",
    "PoolJacobian",
    "DiagonalLowRankJacobian",
    "CoupledJacobian",
    "BatchNormJacobian",
    "as_jacobian",
    "Layer",
    "LAYERS",
    "register_layer",
    "Dense",
    "Identity",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "Softplus",
    "Softmax",
    "GELU",
    "SiLU",
    "ELU",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "Flatten",
    "LayerNorm",
    "BatchNorm",
    "Dropout",
    "Residual",
    "Loss",
    "LOSSES",
    "register_loss",
    "MSE",
    "RMSE",
    "SoftmaxCrossEntropy",
    "BinaryCrossEntropy",
    "Sequential",
    "ntk",
    "ggn",
    "hessian",
    "gradcheck",
    "check_layer",
    "numerical_jacobian",
    "dottest",
    "taylor_test",
    "GradcheckReport",
    "CheckEntry",
    "TaylorReport",
    "Optimizer",
    "SGD",
    "Adam",
    "fit",
    "History",
    "Callback",
    "EarlyStopping",
    "FitContext",
    "NonFiniteError",
    "minimize",
    "least_squares",
    "save",
    "load",
    "ModelFileError",
]
