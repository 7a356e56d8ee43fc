"""Layers, one module per family; importing this package registers them all."""

from .activations import Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Softplus, Tanh
from .base import LAYERS, Layer, register_layer
from .dense import Dense

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
]
