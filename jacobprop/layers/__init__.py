"""Layers, one module per family; importing this package registers them all."""

from .activations import (
    ELU,
    GELU,
    Identity,
    LeakyReLU,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
)
from .base import LAYERS, Layer, register_layer
from .conv import Conv2D
from .dense import Dense
from .dropout import Dropout
from .norm import BatchNorm, LayerNorm
from .pooling import AvgPool2D, Flatten, MaxPool2D
from .residual import Residual

__all__ = [
    "LAYERS",
    "Layer",
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
]
