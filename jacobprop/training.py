"""`fit`: a training loop that loses nothing; its `History` and callbacks.

One step is the forward pass in train mode, the loss and its gradient, the
vjp chain back to the parameters (`net._call_vjp(cache, g, False)`: the loop
needs the cache for `net.update_state`), optional clipping by global norm,
and the optimizer's update. Every step is a transaction: the parameters and
the optimizer state are copied into buffers kept for the whole fit before the
update, so a step that makes a parameter non-finite, or a KeyboardInterrupt
landing half-way through the writes, is rolled back exactly to the last
completed step.

The inputs are validated once per fit (shape, dtype, targets), not per
batch: the loop then calls the private, already-validated paths.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ShapeError, check_positive_int, check_rng
from .losses import Loss, check_loss
from .network import Sequential
from .optim import Optimizer, _is_nonnegative

__all__ = [
    "fit",
    "History",
    "Callback",
    "EarlyStopping",
    "FitContext",
    "NonFiniteError",
    "clip_by_global_norm",
]


class NonFiniteError(FloatingPointError):
    """A training step made the loss or a parameter non-finite.

    Attributes
    ----------
    epoch, step : int
        Where it happened (both 1-based; `step` counts within the epoch).
    history : History
        The record up to the last completed epoch.
    """

    def __init__(self, message: str, *, epoch: int, step: int, history: History):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.history = history


@dataclass
class History:
    """What `fit` measured, one entry per completed epoch.

    Attributes
    ----------
    loss : list of float
        Training loss of each epoch: the batch losses averaged with the batch
        sizes as weights (their plain sum for `reduction="sum"`).
    val_loss : list of float
        Loss on `validation` after each epoch, in eval mode (empty without it).
    val_accuracy : list of float
        For classification losses (SoftmaxCrossEntropy, BinaryCrossEntropy):
        the fraction of validation samples (entries, for binary) classified right.
    seconds : list of float
        Wall time of each epoch's training steps (validation excluded).
    steps : int
        Optimizer steps completed.
    stop_reason : str
        "completed", "callback" (e.g. early stopping), "interrupted" or "non-finite".
    """

    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: int = 0
    stop_reason: str = "completed"

    @property
    def epochs(self) -> int:
        """Epochs completed."""
        return len(self.loss)

    def logs(self, epoch: int) -> dict[str, float]:
        """The figures of epoch `epoch` (0-based) by name."""
        logs = {"loss": self.loss[epoch]}
        if self.val_loss:
            logs["val_loss"] = self.val_loss[epoch]
        if self.val_accuracy:
            logs["val_accuracy"] = self.val_accuracy[epoch]
        return logs


@dataclass
class FitContext:
    """What a callback sees and may change.

    Attributes
    ----------
    net, optimizer, history : the objects being trained and recorded.
    epoch : int
        The epoch just completed (0-based) in `on_epoch_end`.
    logs : dict
        Its figures (`History.logs(epoch)`).
    stop_training : bool
        Set it to True to end the fit after this epoch.
    """

    net: Sequential
    optimizer: Optimizer
    history: History
    epoch: int = -1
    logs: dict = field(default_factory=dict)
    stop_training: bool = False


class Callback:
    """Hooks called by `fit`; override any of them. A plain callable `f(context)`
    passed in `callbacks` is called as `on_epoch_end`."""

    def on_fit_begin(self, context: FitContext) -> None:
        """Before the first epoch."""

    def on_epoch_end(self, context: FitContext) -> None:
        """After each epoch's steps and validation."""

    def on_fit_end(self, context: FitContext) -> None:
        """After the last epoch (also after an early stop; not after an error)."""


class EarlyStopping(Callback):
    """Stop when the monitored figure has not improved for `patience` epochs.

    Parameters
    ----------
    patience : int
        Epochs without improvement tolerated before stopping.
    restore_best : bool
        At the end of the fit, put back the parameters of the best epoch
        (Keras' `restore_best_weights`); the optimizer state stays as it is.
    monitor : str, optional
        "val_loss" when the fit has validation data, else "loss"; or
        "val_accuracy" (then larger is better).
    min_delta : float
        An improvement smaller than this does not count.

    Attributes
    ----------
    best_epoch : int or None
        0-based epoch of the best figure seen.
    stopped_epoch : int or None
        0-based epoch after which it stopped the fit.
    """

    def __init__(self, patience: int, restore_best: bool = True, *,
                 monitor: str | None = None, min_delta: float = 0.0):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping: `patience` must be an integer >= 0, "
                             f"got {patience!r}")
        if monitor not in (None, "loss", "val_loss", "val_accuracy"):
            raise ValueError("EarlyStopping: `monitor` must be 'loss', 'val_loss' or "
                             f"'val_accuracy', got {monitor!r}")
        self.patience = patience
        self.restore_best = bool(restore_best)
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.on_fit_begin(None)

    def on_fit_begin(self, context):
        self.best = None
        self.best_epoch = None
        self.stopped_epoch = None
        self._wait = 0
        self._best_params = None

    def on_epoch_end(self, context):
        monitor = self.monitor or ("val_loss" if "val_loss" in context.logs else "loss")
        if monitor not in context.logs:
            raise ValueError(f"EarlyStopping: monitors {monitor!r}, which this fit does not "
                             f"record (it has {sorted(context.logs)})")
        value = context.logs[monitor]
        sign = -1.0 if monitor == "val_accuracy" else 1.0
        if self.best is None or sign * (value - self.best) < -self.min_delta:
            self.best, self.best_epoch, self._wait = value, context.epoch, 0
            if self.restore_best:
                self._best_params = {k: v.copy() for k, v in context.net.params.items()}
            return
        self._wait += 1
        if self._wait >= self.patience:  # _wait is >= 1 here, so patience 0 stops at once
            self.stopped_epoch = context.epoch
            context.stop_training = True

    def on_fit_end(self, context):
        if self.restore_best and self._best_params is not None:
            for key, value in context.net.params.items():
                value[...] = self._best_params[key]


def clip_by_global_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale `grads` in place so that `sqrt(sum_k |g_k|^2) <= max_norm`; return the norm
    before clipping (as `torch.nn.utils.clip_grad_norm_`, with its `1e-6` guard)."""
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total


# ---- the loop ----------------------------------------------------------------------------
def fit(net: Sequential, X, T, loss: Loss, *, optimizer: Optimizer, epochs: int,
        batch_size: int = 32, rng: np.random.Generator | None = None, validation=None,
        progress: bool | None = None, callbacks=(), clip_norm: float | None = None) -> History:
    """Train `net` on `(X, T)` with minibatches; return the `History`.

    Parameters
    ----------
    net : Sequential
        Trained in place (train mode during steps, eval mode for validation,
        back to the mode it was in at the end).
    X : ndarray `(N, n)`
    T : targets for `loss` (`(N, m)`, or labels `(N,)`)
    loss : Loss
    optimizer : Optimizer
        `SGD`, `Adam`, ... (its state persists across fits: a second fit resumes).
    epochs : int
        Passes over the data.
    batch_size : int
        Samples per step; the last batch of an epoch holds the remainder.
    rng : numpy.random.Generator, optional
        The only source of the shuffling (a fresh unseeded one when omitted):
        the same seed, network and data give the same parameters bit for bit.
    validation : (X_val, T_val), optional
        Evaluated after every epoch in eval mode.
    progress : bool, optional
        True: show progress (a tqdm bar when tqdm is installed, a plain line
        otherwise) on stderr; False: silent; None: only when stderr is a
        terminal and the `CI` environment variable is unset.
    callbacks : sequence of Callback or callables `f(context)`
    clip_norm : float, optional
        Clip the gradient to this global norm before each update.

    Returns
    -------
    History

    Raises
    ------
    NonFiniteError
        A step made the loss or a parameter non-finite; every parameter and
        the optimizer state are those of the last finite step.
    KeyboardInterrupt
        Re-raised with `.history` attached; the network keeps the last
        completed step.
    """
    plan = _plan(net, X, T, loss, optimizer, epochs, batch_size, rng, validation, clip_norm)
    callbacks = [_as_callback(c) for c in callbacks]
    history = History()
    context = FitContext(net, optimizer, history)
    was_training = net.training
    bar = _Progress.create(progress, epochs, plan.steps_per_epoch)
    transaction = _Transaction(net.params, optimizer)
    try:
        for callback in callbacks:
            callback.on_fit_begin(context)
        for epoch in range(epochs):
            net.train()
            _run_epoch(plan, epoch, history, transaction, bar)
            if plan.validation is not None:
                net.eval()
                value, accuracy = _evaluate(net, loss, *plan.validation)
                history.val_loss.append(value)
                if accuracy is not None:
                    history.val_accuracy.append(accuracy)
            context.epoch, context.logs = epoch, history.logs(epoch)
            bar.end_epoch(context.logs)
            for callback in callbacks:
                callback.on_epoch_end(context)
            if context.stop_training:
                history.stop_reason = "callback"
                break
        for callback in callbacks:
            callback.on_fit_end(context)
    except KeyboardInterrupt as interrupt:
        transaction.rollback_if_open()
        history.stop_reason = "interrupted"
        interrupt.history = history
        raise
    except NonFiniteError:
        history.stop_reason = "non-finite"
        raise
    finally:
        bar.close()
        net.train(was_training)
    return history


class _Plan:
    """Everything `fit` validated once: data in the network's dtype, sizes, the loop's
    calls bound to locals."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def _plan(net, X, T, loss, optimizer, epochs, batch_size, rng, validation, clip_norm):
    if not isinstance(net, Sequential):
        raise TypeError(f"fit: `net` must be a jacobprop Sequential, got {type(net).__name__} "
                        "(wrap a single layer: jp.Sequential(layer))")
    check_loss(loss, where="fit")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"fit: `optimizer` must be a jacobprop Optimizer (jp.SGD, jp.Adam), "
                        f"got {type(optimizer).__name__}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_positive_int(value, where="fit", name=name)
    rng = check_rng(rng, where="fit")
    if clip_norm is not None and not (_is_nonnegative(clip_norm) and clip_norm > 0):
        raise ValueError(f"fit: `clip_norm` must be a positive number, got {clip_norm!r}")
    optimizer._check(net.params, net.params)  # the grads of every step share this layout
    X, T = _validated_data(net, loss, X, T, "X", "T")
    if X.shape[0] == 0:
        raise ValueError(f"fit: `X` holds no samples (shape {X.shape})")
    if validation is not None:
        try:
            X_val, T_val = validation
        except (TypeError, ValueError):
            raise TypeError("fit: `validation` must be a pair (X_val, T_val)") from None
        validation = _validated_data(net, loss, X_val, T_val, "validation X", "validation T")
        if validation[0].shape[0] == 0:
            raise ValueError(f"fit: the validation set holds no samples "
                             f"(shape {validation[0].shape})")
    return _Plan(
        net=net, loss=loss, optimizer=optimizer, X=X, T=T, batch_size=int(batch_size),
        rng=rng, validation=validation, clip_norm=clip_norm,
        steps_per_epoch=-(-X.shape[0] // int(batch_size)),
    )


def _validated_data(net, loss, X, T, x_name, t_name):
    """X in the network's dtype `(N, n)` and T as the loss takes it, checked once."""
    dtype = net.dtype or np.float64
    X = net._check_input(X, where=f"fit: `{x_name}` for Sequential layer 0")
    if X.dtype != dtype:
        X = X.astype(dtype)
    X = np.ascontiguousarray(X)
    if not np.isfinite(X).all():
        row = int(np.argwhere(~np.isfinite(X))[0][0])
        raise ValueError(f"fit: `{x_name}` has non-finite entries (first in sample {row})")
    # A probe forward of one sample in eval mode checks the width and gives m
    # without touching any state (forward passes never mutate a layer).
    mode = net.training
    try:
        net.eval()
        probe = net(X[:1]) if X.shape[0] else None
    finally:
        net.train(mode)
    T = T if isinstance(T, np.ndarray) else np.asarray(T)
    if T.shape[:1] != X.shape[:1]:
        raise ShapeError(f"fit: `{t_name}` must have one target per sample of `{x_name}` "
                         f"({X.shape[0]}), got shape {T.shape}")
    if probe is not None:
        shape = (X.shape[0], probe.shape[1])
        T = loss._validated_target(np.empty(shape, dtype=probe.dtype), T)
    if T.dtype.kind == "f" and T.dtype != dtype:  # float64 targets would promote the gradient
        T = T.astype(dtype)
    return X, T


def _run_epoch(plan, epoch, history, transaction, bar):
    net, loss, optimizer = plan.net, plan.loss, plan.optimizer
    X, T, batch_size = plan.X, plan.T, plan.batch_size
    params = net.params
    order = plan.rng.permutation(X.shape[0])
    mean = loss.reduction == "mean"
    total = 0.0
    start = time.perf_counter()
    for step, begin in enumerate(range(0, X.shape[0], batch_size), start=1):
        index = order[begin:begin + batch_size]
        xb, tb = X[index], T[index]
        y, cache = net._call_forward(xb)
        value, g = loss._call_value_and_grad(y, tb)
        if not math.isfinite(value):
            raise NonFiniteError(
                f"fit: the loss is {value} at epoch {epoch + 1}, step {step}; the parameters "
                f"and optimizer state are those of the last finite step "
                f"({history.steps} steps done)", epoch=epoch + 1, step=step, history=history)
        grads = net._call_vjp(cache, g, False)[1]
        if plan.clip_norm is not None:
            clip_by_global_norm(grads, plan.clip_norm)
        transaction.begin()
        # The layout was checked once in `_plan`; grads come from the net with the same keys.
        optimizer._apply(params, grads, optimizer.current_lr())
        bad = transaction.first_non_finite()
        if bad is not None:
            transaction.rollback_if_open()
            raise NonFiniteError(
                f"fit: the update at epoch {epoch + 1}, step {step} made parameter {bad!r} "
                f"non-finite; the parameters and optimizer state were restored to the last "
                f"finite step ({history.steps} steps done)",
                epoch=epoch + 1, step=step, history=history)
        transaction.commit()
        net.update_state(cache)
        history.steps += 1
        total += value * tb.shape[0] if mean else value
        bar.update(value)
    history.seconds.append(time.perf_counter() - start)
    history.loss.append(total / X.shape[0] if mean else total)


class _Transaction:
    """Copies of the parameters and optimizer state taken before each update, so a bad
    or interrupted update is undone exactly.

    The buffers are allocated once per fit and kept as `(saved, live)` pairs, so a
    step costs one `copyto` per array and no dict lookups. The optimizers update
    their state arrays in place; a new state dict (the first step, a
    `load_state_dict`) is noticed by identity and gets new buffers.
    """

    def __init__(self, params: dict[str, np.ndarray], optimizer: Optimizer):
        self._keys = list(params)
        self._live = list(params.values())
        self._pairs = [(np.empty_like(value), value) for value in self._live]
        self._optimizer = optimizer
        self._state = None  # the optimizer's state dict the buffers below copy
        self._state_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._saved_steps = 0
        self._had_state = False
        self._open = False

    def begin(self) -> None:
        for saved, live in self._pairs:
            np.copyto(saved, live)
        optimizer = self._optimizer
        state = optimizer.state
        self._had_state = bool(state)
        if state:
            if state is not self._state:
                self._state = state
                self._state_pairs = [(np.empty_like(array), array)
                                     for arrays in state.values() for array in arrays.values()]
            for saved, live in self._state_pairs:
                np.copyto(saved, live)
        self._saved_steps = optimizer.steps
        self._open = True

    def first_non_finite(self) -> str | None:
        for key, value in zip(self._keys, self._live, strict=True):
            # vdot propagates inf/nan in one BLAS call without a temporary; only when it
            # overflows (or meets inf/nan) does the exact elementwise check run.
            if not math.isfinite(np.vdot(value, value)) and not np.isfinite(value).all():
                return key
        return None

    def commit(self) -> None:
        self._open = False

    def rollback_if_open(self) -> None:
        if not self._open:
            return
        for saved, live in self._pairs:
            np.copyto(live, saved)
        optimizer = self._optimizer
        if self._had_state:
            for saved, live in self._state_pairs:
                np.copyto(live, saved)
        else:  # the state was created by the update being undone
            optimizer.state = {}
        optimizer.steps = self._saved_steps
        self._open = False


def _evaluate(net, loss, X, T) -> tuple[float, float | None]:
    """Loss (and accuracy for classification losses) on the whole set, eval mode."""
    y = net._call_forward(X)[0]
    value = loss._call_value(y, T)
    return value, loss._accuracy(y, T)


def _as_callback(callback) -> Callback:
    if isinstance(callback, Callback):
        return callback
    if callable(callback):
        adapter = Callback()
        adapter.on_epoch_end = callback
        return adapter
    raise TypeError(f"fit: each callback must be a jp.Callback or a callable, "
                    f"got {type(callback).__name__}")


# ---- progress ----------------------------------------------------------------------------
class _Progress:
    """Silent, a tqdm bar, or a plain line rewritten with a carriage return."""

    @staticmethod
    def create(progress, epochs, steps_per_epoch) -> _Progress:
        stream = sys.stderr
        if progress is None:
            progress = (hasattr(stream, "isatty") and stream.isatty()
                        and not os.environ.get("CI"))
        if not progress:
            return _Progress()
        try:
            import tqdm
        except ImportError:
            return _PlainProgress(stream, epochs, steps_per_epoch)
        return _TqdmProgress(tqdm.tqdm, stream, epochs, steps_per_epoch)

    def update(self, value: float) -> None:
        """One step done with batch loss `value`."""

    def end_epoch(self, logs: dict[str, Any]) -> None:
        """An epoch done with these figures."""

    def close(self) -> None:
        """The fit ended (any way)."""


class _PlainProgress(_Progress):
    def __init__(self, stream, epochs, steps_per_epoch):
        self.stream, self.epochs, self.steps = stream, epochs, steps_per_epoch
        self.epoch, self.step, self.start, self.shown = 1, 0, time.perf_counter(), 0.0

    def update(self, value):
        self.step += 1
        now = time.perf_counter()
        if now - self.shown > 0.2 or self.step == self.steps:
            rate = self.step / max(now - self.start, 1e-9)
            self.stream.write(f"\repoch {self.epoch}/{self.epochs} step {self.step}/"
                              f"{self.steps} loss {value:.4g} {rate:.0f} steps/s")
            self.stream.flush()
            self.shown = now

    def end_epoch(self, logs):
        figures = " ".join(f"{k} {v:.4g}" for k, v in logs.items())
        self.stream.write(f"\repoch {self.epoch}/{self.epochs} {figures}\n")
        self.epoch, self.step, self.start = self.epoch + 1, 0, time.perf_counter()

    def close(self):
        self.stream.flush()


class _TqdmProgress(_Progress):
    """One bar over the whole fit; the epoch in its description, the figures after it."""

    def __init__(self, tqdm, stream, epochs, steps_per_epoch):
        self.bar = tqdm(total=epochs * steps_per_epoch, desc=f"epoch 1/{epochs}", unit="step",
                        file=stream, leave=True)
        self.epochs, self.epoch, self.figures = epochs, 1, {}

    def update(self, value):
        self.bar.update(1)
        if self.bar.n % 16 == 0:  # formatting the postfix costs more than a small step
            self.bar.set_postfix({**self.figures, "loss": f"{value:.4g}"}, refresh=False)

    def end_epoch(self, logs):
        self.figures = {k: f"{v:.4g}" for k, v in logs.items()}
        self.epoch += 1
        if self.epoch <= self.epochs:
            self.bar.set_description(f"epoch {self.epoch}/{self.epochs}", refresh=False)
        self.bar.set_postfix(self.figures)

    def close(self):
        self.bar.close()
