"""fit: it learns, it is reproducible, it loses nothing (non-finite steps, interrupts),
modes and state, callbacks and early stopping, progress output, clipping."""

from typing import NamedTuple

import numpy as np
import pytest

import jacobprop as jp
from jacobprop.training import clip_by_global_norm


def blobs(seed, n=60, features=2, classes=3, dtype=np.float64):
    """Well separated Gaussian blobs: a linearly separable problem."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.standard_normal((classes, features))
    labels = rng.integers(0, classes, size=n)
    x = centres[labels] + 0.3 * rng.standard_normal((n, features))
    return x.astype(dtype), labels


def mlp(seed, widths=(2, 8, 3), dtype=np.float64):
    rng = np.random.default_rng(seed)
    return jp.Sequential(jp.Dense(widths[0], widths[1], rng=rng, dtype=dtype), jp.Tanh(),
                         jp.Dense(widths[1], widths[2], rng=rng, dtype=dtype))


def snapshot(params):
    return {k: v.copy() for k, v in params.items()}


def same_arrays(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def same_state(a, b):
    return a["steps"] == b["steps"] and a["state"].keys() == b["state"].keys() and all(
        same_arrays(a["state"][k], b["state"][k]) for k in a["state"])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fit_separates_blobs(dtype):
    x, t = blobs(1, dtype=dtype)
    net = mlp(2, dtype=dtype)
    loss = jp.SoftmaxCrossEntropy()
    history = jp.fit(net, x, t, loss, optimizer=jp.Adam(0.05), epochs=30, batch_size=16,
                     rng=np.random.default_rng(3), validation=(x, t), progress=False)
    assert history.epochs == 30 and history.steps == 30 * 4
    assert history.loss[-1] < 0.2 * history.loss[0]
    assert history.val_accuracy[-1] == 1.0
    assert all(v.dtype == dtype for v in net.params.values())


def test_seeded_fit_is_bit_for_bit_reproducible_and_the_seed_matters():
    x, t = blobs(4)
    results = []
    for seed in (5, 5, 6):
        net = mlp(7)
        history = jp.fit(net, x, t, jp.SoftmaxCrossEntropy(),
                         optimizer=jp.SGD(0.1, momentum=0.9), epochs=3, batch_size=7,
                         rng=np.random.default_rng(seed), progress=False)
        results.append((snapshot(net.params), history.loss))
    assert same_arrays(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert not same_arrays(results[0][0], results[2][0])


@pytest.mark.parametrize("batch", [1, 60, 1000])
def test_batch_sizes_one_all_and_more_than_the_data(batch):
    x, t = blobs(8)
    history = jp.fit(mlp(9), x, t, jp.SoftmaxCrossEntropy(), optimizer=jp.SGD(0.05),
                     epochs=2, batch_size=batch, rng=np.random.default_rng(0), progress=False)
    assert history.steps == 2 * -(-60 // batch)


def test_epoch_loss_is_the_sample_weighted_mean_of_the_batch_losses():
    x, t = blobs(10, n=10)
    net = mlp(11)
    loss = jp.SoftmaxCrossEntropy()
    before = snapshot(net.params)
    rng = np.random.default_rng(12)
    order = np.random.default_rng(12).permutation(10)
    history = jp.fit(net, x, t, loss, optimizer=jp.SGD(0.0), epochs=1, batch_size=4,
                     rng=rng, progress=False)
    # lr 0: the parameters never move, so each batch loss is computable afterwards.
    assert same_arrays(before, net.params) and history.steps == 3
    batches = [order[0:4], order[4:8], order[8:10]]
    expected = sum(loss.value(net(x[b]), t[b]) * len(b) for b in batches) / 10
    assert history.loss[0] == pytest.approx(expected, rel=1e-14)


def diverging_run(epochs, blow_up_at, optimizer_class, dtype=np.float64):
    """SGD/Adam on a regression; the schedule jumps to a huge rate at step `blow_up_at`."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((40, 2)).astype(dtype)
    t = 1e3 * rng.standard_normal((40, 3)).astype(dtype)
    net = mlp(14, dtype=dtype)

    def schedule(step):
        return 1e308 if step == blow_up_at else 1e-3

    optimizer = optimizer_class(schedule)
    error = None
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            jp.fit(net, x, t, jp.MSE(), optimizer=optimizer, epochs=epochs, batch_size=8,
                   rng=np.random.default_rng(15), progress=False)
        except jp.NonFiniteError as caught:
            error = caught
    return net, optimizer, error


@pytest.mark.parametrize("optimizer_class", [lambda lr: jp.SGD(lr, momentum=0.9), jp.Adam])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_finite_step_mid_epoch_is_named_and_rolled_back(optimizer_class, dtype):
    # 5 steps per epoch: step index 7 is epoch 2, step 3.
    net, optimizer, error = diverging_run(3, 7, optimizer_class, dtype)
    assert error is not None
    assert (error.epoch, error.step) == (2, 3)
    assert "epoch 2, step 3" in str(error)
    assert error.history.steps == 7 and error.history.stop_reason == "non-finite"
    assert optimizer.steps == 7
    assert all(np.isfinite(v).all() for v in net.params.values())
    assert all(np.isfinite(a).all() for s in optimizer.state.values() for a in s.values())
    again, again_optimizer, _ = diverging_run(3, 7, optimizer_class, dtype)
    assert same_arrays(net.params, again.params)
    assert same_state(optimizer.state_dict(), again_optimizer.state_dict())


@pytest.mark.parametrize("optimizer_class", [lambda lr: jp.SGD(lr, momentum=0.9), jp.Adam])
def test_non_finite_rollback_equals_a_run_that_stopped_before_the_bad_step(optimizer_class):
    net, optimizer, error = diverging_run(2, 5, optimizer_class)  # epoch 2, step 1
    assert (error.epoch, error.step) == (2, 1)
    clean_net, clean_optimizer, none = diverging_run(1, -1, optimizer_class)
    assert none is None
    assert same_arrays(net.params, clean_net.params)
    assert same_state(optimizer.state_dict(), clean_optimizer.state_dict())


def test_a_non_finite_loss_stops_with_the_epoch_and_step():
    x, _ = blobs(16, n=8)
    net = mlp(17)
    net[2].params["W"][...] = 1e300  # finite parameters, an overflowing loss
    before = snapshot(net.params)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(
            jp.NonFiniteError, match="loss is .* at epoch 1, step 1"):
        jp.fit(net, x, np.zeros((8, 3)), jp.MSE(), optimizer=jp.SGD(0.1), epochs=1,
               batch_size=4, rng=np.random.default_rng(0), progress=False)
    assert same_arrays(net.params, before)


class Interrupting(jp.SGD):
    """Raises KeyboardInterrupt inside the update of step `at`, after writing one key."""

    def __init__(self, lr, at):
        super().__init__(lr, momentum=0.5)
        self.at, self.calls = at, 0

    def _update(self, param, grad, state, lr, step):
        super()._update(param, grad, state, lr, step)
        self.calls += 1
        if step == self.at and self.calls % 4 == 2:  # half-way through the four keys
            raise KeyboardInterrupt


def test_keyboard_interrupt_mid_step_keeps_the_last_completed_step():
    x, t = blobs(18, n=20)
    runs = {}
    for at in (4, None):
        net, optimizer = mlp(19), Interrupting(0.1, at)
        try:
            jp.fit(net, x, t, jp.SoftmaxCrossEntropy(), optimizer=optimizer,
                   epochs=1 if at is None else 2, batch_size=20 // 3 + 1,
                   rng=np.random.default_rng(20), progress=False)
        except KeyboardInterrupt as interrupt:
            runs["history"] = interrupt.history
        runs[at] = (net, optimizer)
    interrupted, optimizer = runs[4]
    clean, clean_optimizer = runs[None]
    assert runs["history"].stop_reason == "interrupted"
    assert runs["history"].steps == 3 and runs["history"].loss  # epoch 1 completed
    assert optimizer.steps == clean_optimizer.steps == 3
    assert same_arrays(interrupted.params, clean.params)
    assert same_state(optimizer.state_dict(), clean_optimizer.state_dict())


def test_keyboard_interrupt_between_epochs_attaches_the_history():
    x, t = blobs(21)

    def stop(context):
        if context.epoch == 1:
            raise KeyboardInterrupt

    net = mlp(22)
    net.eval()
    with pytest.raises(KeyboardInterrupt) as caught:
        jp.fit(net, x, t, jp.SoftmaxCrossEntropy(), optimizer=jp.SGD(0.1), epochs=5,
               rng=np.random.default_rng(0), callbacks=[stop], progress=False)
    assert caught.value.history.epochs == 2
    assert net.training is False  # the mode it found


class ProbeCache(NamedTuple):
    x: np.ndarray
    training: bool


class Probe(jp.Layer):
    """Identity that reports its mode through the cache and counts update_state calls."""

    def __init__(self):
        super().__init__()
        self.updates = []

    def _forward(self, x):
        return x, ProbeCache(x, self.training)

    def _jacobian(self, cache):
        return jp.IdentityJacobian(*cache.x.shape, cache.x.dtype)

    def update_state(self, cache):
        self.updates.append(cache.training)


def test_train_mode_for_steps_eval_for_validation_and_the_mode_is_restored():
    x, t = blobs(23, n=12)
    probe = Probe()
    rng = np.random.default_rng(24)
    net = jp.Sequential(jp.Dense(2, 3, rng=rng), probe)
    net.eval()
    modes = []

    def record(context):
        modes.append(context.net[1].training)

    jp.fit(net, x, t, jp.SoftmaxCrossEntropy(), optimizer=jp.SGD(0.1), epochs=2,
           batch_size=5, rng=rng, validation=(x, t), callbacks=[record], progress=False)
    assert probe.updates == [True] * 6  # update_state once per step, with train-mode caches
    assert modes == [False, False]  # validation just ran in eval mode
    assert net.training is False and probe.training is False


def test_validation_accuracy_only_for_classification_losses():
    rng = np.random.default_rng(25)
    x = rng.standard_normal((10, 2))
    net = mlp(26)
    history = jp.fit(net, x, rng.standard_normal((10, 3)), jp.MSE(), optimizer=jp.SGD(0.01),
                     epochs=2, rng=rng, validation=(x, np.zeros((10, 3))), progress=False)
    assert len(history.val_loss) == 2 and history.val_accuracy == []
    history = jp.fit(net, x, (rng.uniform(size=(10, 3)) > 0.5).astype(float),
                     jp.BinaryCrossEntropy(), optimizer=jp.SGD(0.01), epochs=1, rng=rng,
                     validation=(x, np.ones((10, 3))), progress=False)
    expected = np.mean(net(x) > 0)
    assert history.val_accuracy == [pytest.approx(expected)]


class FakeNet:
    def __init__(self):
        self.params = {"w": np.zeros(2)}


def test_early_stopping_counts_patience_and_restores_the_best_parameters():
    stopper = jp.EarlyStopping(patience=2)
    context = jp.FitContext(FakeNet(), jp.SGD(), jp.History())
    stopper.on_fit_begin(context)
    for epoch, value in enumerate([3.0, 2.0, 2.5, 2.6, 1.0]):
        context.net.params["w"][...] = epoch
        context.epoch, context.logs = epoch, {"loss": value}
        stopper.on_epoch_end(context)
        if context.stop_training:
            break
    assert (stopper.best_epoch, stopper.stopped_epoch) == (1, 3)
    stopper.on_fit_end(context)
    assert np.array_equal(context.net.params["w"], [1.0, 1.0])


def test_early_stopping_with_patience_zero_stops_at_the_first_epoch_without_improvement():
    stopper = jp.EarlyStopping(patience=0, restore_best=False)
    context = jp.FitContext(FakeNet(), jp.SGD(), jp.History())
    stopper.on_fit_begin(context)
    for epoch, value in enumerate([3.0, 2.0, 2.5, 1.0]):
        context.epoch, context.logs = epoch, {"loss": value}
        stopper.on_epoch_end(context)
        if context.stop_training:
            break
    assert (stopper.best_epoch, stopper.stopped_epoch) == (1, 2)


def test_early_stopping_in_a_fit_keeps_the_best_validation_epoch():
    rng = np.random.default_rng(27)
    x, t = rng.standard_normal((30, 2)), rng.integers(0, 3, size=30)  # noise: overfits
    xv, tv = rng.standard_normal((30, 2)), rng.integers(0, 3, size=30)
    net = mlp(28, widths=(2, 32, 3))
    recorded = []
    stopper = jp.EarlyStopping(patience=3)
    history = jp.fit(net, x, t, jp.SoftmaxCrossEntropy(), optimizer=jp.Adam(0.05),
                     epochs=200, batch_size=10, rng=rng, validation=(xv, tv),
                     callbacks=[lambda c: recorded.append(snapshot(c.net.params)), stopper],
                     progress=False)
    assert history.stop_reason == "callback" and history.epochs < 200
    assert stopper.best_epoch == int(np.argmin(history.val_loss))
    assert history.epochs == stopper.best_epoch + 4
    assert same_arrays(net.params, recorded[stopper.best_epoch])


def test_clip_by_global_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_by_global_norm(grads, 10.0) == 5.0 and grads["a"][0] == 3.0
    assert clip_by_global_norm(grads, 1.0) == 5.0
    norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
    assert norm == pytest.approx(1.0, rel=1e-6) and norm <= 1.0


def test_fit_with_clipping_bounds_every_update():
    x, t = blobs(29, n=8)
    net = mlp(30)
    before = snapshot(net.params)
    jp.fit(net, x, t, jp.SoftmaxCrossEntropy(), optimizer=jp.SGD(1.0), epochs=1,
           batch_size=8, rng=np.random.default_rng(0), clip_norm=1e-3, progress=False)
    moved = np.sqrt(sum(np.sum((net.params[k] - before[k]) ** 2) for k in before))
    assert 0 < moved <= 1e-3 * (1 + 1e-12)


def test_progress_output(capsys, monkeypatch):
    x, t = blobs(31, n=8)
    kwargs = dict(optimizer=jp.SGD(0.1), epochs=2, batch_size=4, rng=np.random.default_rng(0))
    jp.fit(mlp(32), x, t, jp.SoftmaxCrossEntropy(), progress=None, **kwargs)  # not a tty
    jp.fit(mlp(32), x, t, jp.SoftmaxCrossEntropy(), progress=False, **kwargs)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # tqdm not installed
    jp.fit(mlp(32), x, t, jp.SoftmaxCrossEntropy(), progress=True, **kwargs)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2 loss" in err


@pytest.mark.parametrize("change, error, match", [
    (dict(X=np.zeros((60, 3))), jp.ShapeError, r"shape \(B, 2\), got \(60, 3\)"),
    (dict(T=np.zeros(59, dtype=int)), jp.ShapeError, "one target per sample"),
    (dict(T=np.full(60, 7)), ValueError, "out of range"),
    (dict(X=np.full((60, 2), np.nan)), ValueError, "non-finite"),
    (dict(X=np.zeros((0, 2)), T=np.zeros(0, dtype=int)), ValueError, "no samples"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(clip_norm="1"), ValueError, "`clip_norm` must be a positive number, got '1'"),
    (dict(clip_norm=True), ValueError, "`clip_norm` must be a positive number, got True"),
    (dict(clip_norm=0.0), ValueError, "`clip_norm` must be a positive number, got 0.0"),
    (dict(batch_size=1.5), ValueError, "batch_size"),
    (dict(rng=3), TypeError, "rng"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
    (dict(validation=np.zeros(3)), TypeError, "validation"),
])
def test_bad_arguments_are_refused_before_training(change, error, match):
    x, t = blobs(33)
    net = mlp(34)
    before = snapshot(net.params)
    kwargs = dict(X=x, T=t, optimizer=jp.SGD(0.1), epochs=1, rng=np.random.default_rng(0),
                  progress=False)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        jp.fit(net, kwargs.pop("X"), kwargs.pop("T"), jp.SoftmaxCrossEntropy(), **kwargs)
    assert same_arrays(net.params, before)


def test_bench_train_command_runs_and_refuses_bad_options(capsys):
    from jacobprop.cli import main

    assert main(["bench", "train", "--parts", "sine,digits", "--seeds", "1", "--epochs", "2",
                 "--adam-steps", "20", "-q"]) == 0
    out = capsys.readouterr().out
    assert "noisy sine" in out and "lm below Adam" in out and "digits (1348 train" in out
    assert main(["bench", "train", "--parts", "nope"]) == 2
    assert main(["bench", "train", "--seeds", "0"]) == 2
    assert "--seeds: expected one positive integer, got '0'" in capsys.readouterr().err
    assert main(["bench", "train", "--json", "/no/such/folder/train.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fit_trains_batchnorm_running_statistics_through_the_state_rule():
    rng = np.random.default_rng(21)
    X = rng.normal(3.0, 2.0, size=(64, 4))  # far from the initial running mean 0, variance 1
    t = rng.integers(0, 2, size=64)
    net = jp.Sequential(jp.BatchNorm(4), jp.Dense(4, 2, rng=rng))
    bn = net[0]
    net(X)  # a plain forward writes nothing
    assert np.all(bn.running_mean == 0) and np.all(bn.running_var == 1)
    jp.fit(net, X, t, jp.SoftmaxCrossEntropy(), optimizer=jp.SGD(0.1), epochs=3,
           batch_size=16, rng=np.random.default_rng(0), progress=False)
    # 12 momentum-0.1 updates pull the running statistics most of the way to the data's
    assert np.all(np.abs(bn.running_mean - X.mean(axis=0)) < 0.4 * np.abs(X.mean(axis=0)))
    assert np.all(bn.running_var > 1.5)
    assert net[0].training  # fit gives back the mode it found
