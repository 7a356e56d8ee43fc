"""Structured batched Jacobian operators and their algebra.

A `Jacobian` stands for B blocks of shape `(m, n)`, one per sample (numerator
layout: row = output, column = input), so its `shape` is `(B, m, n)`; `@`
between two operators returns the cheapest structured result it can. The
package is split along its seams, and every name is re-exported here so
`from jacobprop.jacobian import X` works whichever module holds `X`:

| module       | what it holds                                                          |
|--------------|------------------------------------------------------------------------|
| `base.py`    | `Jacobian` (dispatch, `OWED`), `as_jacobian`, composition, helpers     |
| `basic.py`   | general, shared, diagonal, identity, softmax, Kronecker and transposed |
|              | operators                                                              |
| `spatial.py` | convolution, patches, selection, pooling and diagonal plus low rank    |
|              | operators, the conv geometry                                           |
| `coupled.py` | the batch-coupled operators (BatchNorm in train mode, their products,  |
|              | sums and dense form) and `coupled_dense`                               |

`chain_cost` and `multiply_chain` live in `jacobprop.plan`, which imports this
package; they resolve lazily here for the older import path.
"""

from __future__ import annotations

# `base` first: it ends by importing `basic`, which subclasses `Jacobian`. The private
# names are re-exported because other jacobprop modules import them from here.
from .base import (
    Jacobian,
    _array_of_layout,  # noqa: F401
    _blocks_to_sparse,  # noqa: F401
    _check_composable,  # noqa: F401
    _compose,  # noqa: F401
    _dense_size,  # noqa: F401
    _taken_size,  # noqa: F401
    as_jacobian,
)
from .basic import (
    DiagonalJacobian,
    GeneralJacobian,
    IdentityJacobian,
    KroneckerJacobian,
    SharedJacobian,
    SoftmaxJacobian,
    _TransposedJacobian,  # noqa: F401
    softmax_block_product,
)
from .coupled import (
    BatchNormJacobian,
    CoupledJacobian,
    CoupledProduct,
    CoupledSum,
    DenseCoupledJacobian,
    coupled_dense,
)
from .spatial import (
    ConvGeometry,
    ConvJacobian,
    DiagonalLowRankJacobian,
    PatchesJacobian,
    PoolJacobian,
    SelectionJacobian,
    channel_rows,
    from_channel_rows,
    pool_windows,
)

__all__ = [
    "Jacobian",
    "GeneralJacobian",
    "SharedJacobian",
    "DiagonalJacobian",
    "IdentityJacobian",
    "SoftmaxJacobian",
    "KroneckerJacobian",
    "DiagonalLowRankJacobian",
    "as_jacobian",
    "softmax_block_product",
    "ConvGeometry",
    "ConvJacobian",
    "PatchesJacobian",
    "SelectionJacobian",
    "PoolJacobian",
    "channel_rows",
    "from_channel_rows",
    "pool_windows",
    "CoupledJacobian",
    "BatchNormJacobian",
    "CoupledProduct",
    "CoupledSum",
    "DenseCoupledJacobian",
    "coupled_dense",
]

def __getattr__(name):
    # `from jacobprop.jacobian import chain_cost, multiply_chain` predates
    # `plan.py`, which imports this package, so the names resolve lazily here.
    if name in ("chain_cost", "multiply_chain"):
        from .. import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
