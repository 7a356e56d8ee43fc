"""Plans for chains of Jacobian products: the order, its predicted flops and peak bytes.

`J_L @ ... @ J_1` can be multiplied in any parenthesization; which one is
cheapest depends on the structure (class) and shape of each factor, never on
the values. A plan is therefore computed from `(class, shape)` pairs only and
cached, so a network that is asked for its Jacobian again with the same
shapes pays for the search once (the search is O(L^3) in Python).

The cost of one product is what `jacobian._compose` will do: first the left
operator's `_matmul` rule, then the right one's `_rmatmul`, else a dense
stack through `_apply` / `_rapply`. Each operator class states these costs
next to its product rules (`_matmul_cost`, `_rmatmul_cost`, `_apply_cost`,
`_rapply_cost`, `_stored_items`); a class without them is costed as dense
blocks by the `Jacobian` defaults, an upper bound, so an operator kind the
model does not know is planned safely instead of failing. A class whose cost
depends on more than its shape (a convolution's kernel, a pool's window, a
low-rank update's rank) states `_plan_shape()`: its shape followed by those
sizes, which the plan's cache key then includes. For the predicted peak a
class may also state `_apply_temporary(shape, k)` / `_rapply_temporary(shape,
k)` (entries its products allocate besides their result, e.g. im2col columns)
and `_forward_items(shape)` (what its layer's cache keeps beyond the input);
all three default to 0.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .jacobian import GeneralJacobian, Jacobian, _check_composable, _compose

__all__ = ["ChainPlan", "plan_chain", "chain_cost", "multiply_chain", "product_estimate",
           "ORDERS"]

ORDERS = ("auto", "forward", "reverse")


def check_order(order, *, where: str) -> None:
    """Refuse a product order other than "auto", "forward" or "reverse"."""
    if order not in ORDERS:
        raise ValueError(f"{where}: `order` must be one of {ORDERS}, got {order!r}")


#: "auto" takes a mixed parenthesization over a fixed order only if it is
#: predicted to save more than this fraction of the work.
_MIXED_MARGIN = 0.05


class ChainPlan(NamedTuple):
    """How a chain of operators is multiplied, and what that is predicted to cost.

    Attributes
    ----------
    order : str
        The order asked for: "auto", "forward" or "reverse".
    chosen : str
        What the tree amounts to: "forward" (from the inputs), "reverse" (from
        the outputs) or "mixed" (any other parenthesization).
    tree : int or tuple
        The parenthesization: a leaf index into the chain, or a pair of trees.
    flops : int
        Predicted floating-point operations of all products (all pieces).
    peak_bytes : int
        Predicted peak memory of the products: the factors, the intermediates
        alive at once and the result (for a network Jacobian also the forward
        pass and, when computed in pieces, the assembled result).
    batch : int
        Samples of the whole request.
    piece : int
        Samples per piece (`batch` when computed in one go).
    """

    order: str
    chosen: str
    tree: object
    flops: int
    peak_bytes: int
    batch: int
    piece: int

    @property
    def pieces(self) -> int:
        return -(-self.batch // self.piece) if self.piece else 0

    def describe(self) -> str:
        """One line for reports: `order=auto -> reverse, 1.2 MFLOP, peak 3.4 MiB`."""
        text = (f"order={self.order} -> {self.chosen}, {self.flops / 1e6:.3g} MFLOP, "
                f"peak {self.peak_bytes / 2**20:.3g} MiB")
        if self.pieces > 1:
            text += f", {self.pieces} pieces of {self.piece} samples"
        return text


def product_estimate(left, right) -> tuple[type, int, int]:
    """`(result class, flops, temporary entries)` of `left @ right` for `(class, shape)` items.

    Mirrors `jacobian._compose`: a structured rule of either side if it has
    one, else one dense stack, materializing the cheaper side first when
    neither is already dense.
    """
    (lcls, lshape), (rcls, rshape) = left, right
    found = lcls._matmul_cost(lshape, rcls, rshape)
    if found is NotImplemented:
        found = rcls._rmatmul_cost(rshape, lcls, lshape)
    if found is not NotImplemented:
        return found[0], int(found[1]), 0
    if issubclass(lcls, GeneralJacobian):
        return (GeneralJacobian, int(rcls._rapply_cost(rshape, lshape[1])),
                rcls._rapply_temporary(rshape, lshape[1]))
    if issubclass(rcls, GeneralJacobian):
        return (GeneralJacobian, int(lcls._apply_cost(lshape, rshape[2])),
                lcls._apply_temporary(lshape, rshape[2]))
    rsize, lsize = _dense_items(rshape), _dense_items(lshape)
    if rsize <= lsize:
        return (GeneralJacobian, int(lcls._apply_cost(lshape, rshape[2]) + rsize),
                rsize + lcls._apply_temporary(lshape, rshape[2]))
    return (GeneralJacobian, int(rcls._rapply_cost(rshape, lshape[1]) + lsize),
            lsize + rcls._rapply_temporary(rshape, lshape[1]))


def _forward_cache_items(cls, shape) -> int:
    return int(cls._forward_items(shape))


def _dense_items(shape) -> int:
    return shape[0] * shape[1] * shape[2]


def _product_shape(left, right):
    return (left[1][0], left[1][1], right[1][2])


def _items(ops) -> tuple:
    return tuple((type(op), _plan_shape(op)) for op in ops)


def _plan_shape(op) -> tuple:
    """`op.shape`, followed by the sizes its class's costs need beyond it (if any).

    A convolution's work per entry depends on its kernel, a pool's on its
    window, a low-rank update's on its rank: such a class states
    `_plan_shape()` as `(B, m, n, *sizes)` and reads the extra sizes in its own
    cost methods. Every other rule reads only the first three entries.
    """
    return tuple(op._plan_shape())


def plan_chain(ops: list[Jacobian], order: str = "auto", *,
               forward: bool = False) -> ChainPlan:
    """The plan for `ops[0] @ ops[1] @ ... @ ops[-1]` (cached by classes and shapes).

    Parameters
    ----------
    ops : list of Jacobian
        Composable operators, output side first.
    order : {"auto", "forward", "reverse"}
        "reverse" multiplies left to right (starting from the outputs),
        "forward" right to left (from the inputs), "auto" picks the cheapest
        parenthesization by dynamic programming over the chain.
    forward : bool
        `ops` are a network's layer Jacobians: count in the peak the
        activations its forward pass keeps, predicted from the shapes as one
        `(B, width)` array per layer input plus the output.
    """
    check_order(order, where="plan_chain")
    if not ops:
        raise ValueError("plan_chain: need at least one operator")
    itemsize = max(np.dtype(op.dtype).itemsize for op in ops)
    return _plan_items(_items(ops), order, itemsize, forward)


@lru_cache(maxsize=512)
def _plan_items(items: tuple, order: str, itemsize: int, forward: bool = False) -> ChainPlan:
    if order == "auto":
        flops, tree = _best_tree(items)
        # A fixed order runs as one left- or right-deep sweep of big products;
        # a mixed tree multiplies dense stacks batch by batch. Take it only
        # for a real predicted saving (ties go to reverse, then forward).
        fixed = [_fixed_tree(items, name) for name in ("reverse", "forward")]
        fixed_flops, fixed_tree = min(fixed, key=lambda pair: pair[0])
        if fixed_flops * (1 - _MIXED_MARGIN) <= flops:
            flops, tree = fixed_flops, fixed_tree
    else:
        flops, tree = _fixed_tree(items, order)
    _, peak = _peak_items(tree, items)
    stored = sum(cls._stored_items(shape) for cls, shape in items)
    batch = items[0][1][0]
    if forward:
        stored += batch * (items[0][1][1] + sum(shape[2] for _, shape in items))
        # What a layer's cache keeps beyond its input (a convolution's im2col columns),
        # stated by its Jacobian's class as `_forward_items(shape)`.
        stored += sum(_forward_cache_items(cls, shape) for cls, shape in items)
    return ChainPlan(order, _tree_name(tree, len(items)), tree, flops,
                     (stored + peak) * itemsize, batch, batch)


def _fixed_tree(items, order):
    """`(flops, tree)` of the left-deep ("reverse") or right-deep ("forward") sweep."""
    count = len(items)
    indices = list(range(count)) if order == "reverse" else list(range(count - 1, -1, -1))
    item, total = items[indices[0]], 0
    for index in indices[1:]:
        pair = (item, items[index]) if order == "reverse" else (items[index], item)
        cls, cost, _ = product_estimate(*pair)
        total += cost
        item = (cls, _product_shape(*pair))
    return total, _fixed_tree_shape(count, order)


def _best_tree(items):
    count = len(items)
    # best[i][j] = (cost, item, tree) for items[i..j]
    best = [[None] * count for _ in range(count)]
    for i in range(count):
        best[i][i] = (0, items[i], i)
    for span in range(1, count):
        for i in range(count - span):
            j = i + span
            for split in range(i, j):
                lcost, litem, ltree = best[i][split]
                rcost, ritem, rtree = best[split + 1][j]
                cls, cost, _ = product_estimate(litem, ritem)
                total = lcost + rcost + cost
                if best[i][j] is None or total < best[i][j][0]:
                    best[i][j] = (total, (cls, _product_shape(litem, ritem)), (ltree, rtree))
    total, _, tree = best[0][count - 1]
    return total, tree


def _peak_items(tree, items):
    """`(result item, peak entries of intermediates)` while evaluating `tree`.

    The left subtree's result stays alive while the right one is computed;
    then both operands, any temporary dense side and the result coexist.
    """
    if isinstance(tree, int):
        return items[tree], 0
    litem, lpeak = _peak_items(tree[0], items)
    ritem, rpeak = _peak_items(tree[1], items)
    lheld = 0 if isinstance(tree[0], int) else litem[0]._stored_items(litem[1])
    rheld = 0 if isinstance(tree[1], int) else ritem[0]._stored_items(ritem[1])
    cls, _, temporary = product_estimate(litem, ritem)
    result = (cls, _product_shape(litem, ritem))
    held = lheld + rheld + temporary + cls._stored_items(result[1])
    return result, max(lpeak, lheld + rpeak, held)


def _tree_name(tree, count: int) -> str:
    if count == 1:
        return "single"
    if tree == _fixed_tree_shape(count, "reverse"):
        return "reverse"
    if tree == _fixed_tree_shape(count, "forward"):
        return "forward"
    return "mixed"


def _fixed_tree_shape(count, order):
    if order == "reverse":
        tree = 0
        for index in range(1, count):
            tree = (tree, index)
        return tree
    tree = count - 1
    for index in range(count - 2, -1, -1):
        tree = (index, tree)
    return tree


def chain_cost(ops: list[Jacobian], order: str = "auto") -> tuple[int, object]:
    """The predicted flops of `ops[0] @ ... @ ops[-1]` in `order` and its parenthesization.

    The tree is an int (a leaf index) or a pair of trees. See `plan_chain`.
    """
    check_order(order, where="chain_cost")
    plan = plan_chain(ops, order)
    return plan.flops, plan.tree


def multiply_chain(ops: list[Jacobian], order: str = "auto", *,
                   plan: ChainPlan | None = None) -> Jacobian:
    """`ops[0] @ ops[1] @ ... @ ops[-1]` in the given `order` (see `plan_chain`).

    The result carries the plan it was computed by as `result.plan`.
    """
    if not ops:
        raise ValueError("multiply_chain: need at least one operator")
    check_order(order, where="multiply_chain")
    for left, right in zip(ops[:-1], ops[1:], strict=True):
        _check_composable(left, right)
    if plan is None:
        plan = plan_chain(ops, order)
    return _multiply_planned(ops, plan)


def _multiply_planned(ops: list[Jacobian], plan: ChainPlan) -> Jacobian:
    """`multiply_chain` for operators known to compose (a network's own layers)."""
    result = _evaluate(plan.tree, ops)
    if len(ops) == 1:
        # Never label the caller's own operator with a plan: hand back a view.
        result = result._take(slice(None))
    result.plan = plan
    return result


def _evaluate(node, ops):
    if isinstance(node, int):
        return ops[node]
    return _compose(_evaluate(node[0], ops), _evaluate(node[1], ops))

