"""The three workloads of `jacobprop bench`: grad, jacobian and gradcheck.

Each builder turns one `MLPSpec` into a `Group`: the paths to time (`Case`),
the one the others are compared with (the baseline) and what the
correctness column measures against.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field, replace
from itertools import pairwise

import numpy as np

from .. import Dense, numerical_jacobian
from .models import (
    REFERENCE_ACTIVATIONS,
    MLPSpec,
    build_mlp,
    dense_weights,
    forward_flops,
    grad_flops,
    reference_value_and_grad,
    relative_deviation,
)
from .peers import PeerMissing, PeerUnsupported, grad_callable, torch_gradcheck_callable
from .timing import Case

__all__ = ["Group", "JACOBIAN_ORDERS", "Limits", "grad_group", "gradcheck_group"]

JACOBIAN_ORDERS = ("forward", "reverse", "auto")
#: A workload counts as matmul-bound (and gets a fraction-of-peak column) when
#: the smallest GEMM dimension among batch and hidden width is at least this.
MATMUL_BOUND_MIN_DIM = 32


@dataclass
class Limits:
    """Size caps of the expensive paths (the CLI's --max-dense-mb, --fd-max-params)."""

    max_dense_bytes: int = 256 * 2**20
    fd_max_params: int = 4000


@dataclass
class Group:
    """One configuration of one workload: the rows that share a baseline."""

    workload: str
    spec: MLPSpec
    baseline: str
    against: str
    cases: list[Case]
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def matmul_bound(self) -> bool:
        return min(self.spec.batch, self.spec.width) >= MATMUL_BOUND_MIN_DIM


def _peer_case(path, peer, build):
    """A Case from `build()`, or a skipped one saying why the peer cannot run."""
    try:
        return build()
    except (PeerMissing, PeerUnsupported) as error:
        return Case(path, skip=str(error), peer=peer)


def _float64_twin(net, spec, seed):
    """The same network in float64 (the parameters upcast), for reference results."""
    if spec.dtype == "float64":
        return net
    twin, _, _, _ = build_mlp(replace(spec, dtype="float64"), rng=np.random.default_rng(seed))
    for key, value in net.params.items():
        twin.params[key][...] = value
    return twin


def _engine_pairs(net, grads):
    """Engine grads dict -> `[(dW, db), ...]` in Dense order."""
    return [
        (grads[f"{index}.W"], grads[f"{index}.b"])
        for index, layer in enumerate(net)
        if isinstance(layer, Dense)
    ]


def _flatten(value, pairs):
    return [np.asarray(value)] + [array for pair in pairs for array in pair]


# ---- grad -------------------------------------------------------------------------
def grad_group(spec: MLPSpec, *, seed: int = 0, peers=(), limits: Limits | None = None):
    """Loss + gradients of the MLP by every path; baseline: the hand-written NumPy MLP."""
    limits = limits or Limits()
    net, x, labels, loss = build_mlp(spec, rng=np.random.default_rng(seed))
    weights = dense_weights(net)
    flops = grad_flops(spec)
    has_reference = spec.activation in REFERENCE_ACTIVATIONS
    twin = _float64_twin(net, spec, seed)
    x64 = x.astype(np.float64)
    if has_reference:
        w64 = [(W.astype(np.float64), b.astype(np.float64)) for W, b in weights]
        truth = reference_value_and_grad(w64, x64, labels, spec.activation)
        against = "float64 hand-written NumPy reference"
    else:
        value, grads = twin.value_and_grad(x64, labels, loss)
        truth = (value, _engine_pairs(twin, grads))
        against = "float64 jacobprop vjp (no hand-written reference for this activation)"
    want = _flatten(*truth)

    def check_pairs(result):
        value, pairs = result
        return relative_deviation(_flatten(value, pairs), want), against

    def check_engine(result):
        value, grads = result
        return check_pairs((value, _engine_pairs(net, grads)))

    cases = []
    if has_reference:
        def reference():
            return reference_value_and_grad(weights, x, labels, spec.activation)

        check = check_pairs
        if spec.dtype == "float64":
            # The reference is the truth of the other rows; its own row compares it
            # with the engine's float64 vjp (an independent implementation) and
            # records a directional central difference as a second opinion.
            engine_value, engine_grads = twin.value_and_grad(x64, labels, loss)
            engine = _flatten(engine_value, _engine_pairs(twin, engine_grads))
            check = _reference_check(engine, _directional_check(weights, x, labels,
                                                                spec.activation, seed))
        cases.append(Case("numpy-reference", reference, check, flops=flops))
    else:
        cases.append(Case("numpy-reference",
                          skip=f"no hand-written reference for {spec.activation}"))
    cases.append(Case("vjp", lambda: net.value_and_grad(x, labels, loss), check_engine,
                      flops=flops))
    cases.append(Case("jacobian", lambda: net.value_and_grad(x, labels, loss, mode="jacobian"),
                      check_engine, flops=flops))
    dense_bytes = _dense_block_bytes(spec)
    skip = None
    if dense_bytes > limits.max_dense_bytes:
        skip = (f"Kronecker weight blocks need {dense_bytes / 2**20:.0f} MiB "
                f"> cap {limits.max_dense_bytes / 2**20:.0f} MiB (--max-dense-mb)")
    cases.append(Case("jacobian-dense",
                      lambda: net.value_and_grad(x, labels, loss, mode="jacobian", dense=True),
                      check_engine, skip=skip, flops=flops))
    skip = None
    if spec.n_params > limits.fd_max_params:
        skip = (f"{spec.n_params} parameters > cap {limits.fd_max_params} "
                f"(--fd-max-params)")
    elif spec.dtype != "float64":
        skip = "finite differences are meaningful in float64 only"
    cases.append(Case("finite-diff", lambda: _central_differences(net, x, labels, loss),
                      check_engine, skip=skip, flops=2 * spec.n_params * forward_flops(spec)))
    for peer in peers:
        cases.append(_peer_case(peer, peer, lambda peer=peer: _grad_peer_case(
            peer, spec, weights, x, labels, check_pairs, flops)))
    baseline = "numpy-reference" if has_reference else "vjp"
    return Group("grad", spec, baseline, against, cases)


def _grad_peer_case(peer, spec, weights, x, labels, check_pairs, flops):
    run, convert, traced = grad_callable(peer, spec, weights, x, labels)
    return Case(peer, run, lambda out: check_pairs(convert(out)), flops=flops,
                traced=traced, peer=peer)


def _dense_block_bytes(spec: MLPSpec) -> int:
    """Bytes of the largest dense Kronecker weight block, `B * out * (out * in)`."""
    sizes = spec.sizes
    itemsize = np.dtype(spec.dtype).itemsize
    return max(spec.batch * b * b * a * itemsize for a, b in pairwise(sizes))


def _reference_check(engine, directional):
    """The reference row's check: against the engine's vjp, plus the directional FD."""

    def check(result):
        fd_deviation, _ = directional(result)
        deviation = relative_deviation(_flatten(*result), engine)
        return deviation, "float64 jacobprop vjp", {"directional_fd_deviation": fd_deviation}

    return check


def _directional_check(weights, x, labels, activation, seed):
    """Correctness of the reference itself: `<grad, d>` against a central difference.

    `d` is a random unit direction over all parameters; the step is
    `eps^(1/3)`, the balance of truncation and rounding error.
    """
    rng = np.random.default_rng(seed + 1)
    direction = [(rng.standard_normal(W.shape), rng.standard_normal(b.shape)) for W, b in weights]
    norm = np.sqrt(sum(np.sum(dW**2) + np.sum(db**2) for dW, db in direction))
    direction = [(dW / norm, db / norm) for dW, db in direction]
    step = np.finfo(np.float64).eps ** (1 / 3)

    def moved(sign):
        return [(W + sign * step * dW, b + sign * step * db)
                for (W, b), (dW, db) in zip(weights, direction, strict=True)]

    plus = reference_value_and_grad(moved(+1), x, labels, activation)[0]
    minus = reference_value_and_grad(moved(-1), x, labels, activation)[0]
    numeric = (plus - minus) / (2 * step)

    def check(result):
        _, pairs = result
        analytic = sum(float(np.vdot(g, d)) for pair, dpair in zip(pairs, direction, strict=True)
                       for g, d in zip(pair, dpair, strict=True))
        return abs(analytic - numeric) / max(abs(numeric), 1e-300), \
            "central difference along a random direction"

    return check


def _central_differences(net, x, labels, loss):
    """`(L, grads)` with every gradient entry from a central difference of the loss.

    Each parameter array goes through `jacobprop.numerical_jacobian` as one
    flat point (`per_sample=False`): two loss evaluations per entry, step
    `eps^(1/3) max(1, |p_k|)`. The live parameter is overwritten by each
    trial point and restored afterwards.
    """
    value = loss.value(net(x), labels)
    grads = {}
    for key, param in net.params.items():
        original = param.copy()

        def loss_at(point, param=param):
            param[...] = point
            return loss.value(net(x), labels)

        try:
            grads[key] = numerical_jacobian(loss_at, original, per_sample=False).reshape(
                param.shape)
        finally:
            param[...] = original
    return value, grads


# ---- gradcheck --------------------------------------------------------------------
def gradcheck_group(spec: MLPSpec, *, seed: int = 0, peers=()):
    """The checker's modes on every parameter (and x); baseline: the full check.

    The correctness column is the check's own worst relative error (analytic
    against numeric); for the Taylor test, how far the observed order of the
    remainder is from 2, relative. A failed check is reported as such.
    """
    checks = importlib.import_module("jacobprop.checks")
    net, x, labels, loss = build_mlp(spec, rng=np.random.default_rng(seed))

    def rng():
        return np.random.default_rng(seed)

    # The checker certifies float32 only against tolerances chosen for float32
    # (its differences still run in float64); these are the ones it suggests.
    tolerances = {} if spec.dtype == "float64" else {"rtol": 1e-3, "atol": 1e-5}
    modes = {
        "full": lambda: checks.gradcheck(net, x, labels, loss, rng=rng(), **tolerances),
        "fast": lambda: checks.gradcheck(net, x, labels, loss, fast=True, rng=rng(),
                                         **tolerances),
        "richardson": lambda: checks.gradcheck(net, x, labels, loss, richardson=True,
                                               rng=rng(), **tolerances),
        "taylor": lambda: checks.taylor_test(net, x, labels, loss, rng=rng()),
    }
    cases = [Case(mode, fn, _report_check) for mode, fn in modes.items()]
    weights = dense_weights(net)
    for peer in peers:
        if peer != "torch":
            cases.append(Case(peer, skip=f"peer {peer!r} has no gradient checker here",
                              peer=peer))
            continue
        cases.append(_peer_case(peer, peer, lambda: Case(
            "torch", torch_gradcheck_callable(spec, weights, x, labels),
            _torch_verdict, traced=False, peer="torch")))
    against = "the check's own worst relative error"
    return Group("gradcheck", spec, "full", against, cases)


def _torch_verdict(ok):
    return (None if ok else float("inf")), "torch.autograd.gradcheck verdict"


def _report_check(report):
    """`(deviation, what)` from a gradcheck or Taylor report; inf when the check failed."""
    if not report.ok:
        return float("inf"), "the check failed"
    order = getattr(report, "order", None)
    if order is not None:
        if not math.isfinite(order):
            return None, "Taylor order not measurable (loss linear along the direction)"
        return abs(order - 2.0) / 2.0, "observed Taylor order against 2"
    errors = [entry.max_rel_error for entry in report.entries
              if not math.isnan(entry.max_rel_error)]
    return (max(errors) if errors else None), "the check's own worst relative error"

