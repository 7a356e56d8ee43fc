"""`jacobprop bench train`: training measured against scikit-learn, second-order least
squares against Adam, and the cost of one training step against hand-written NumPy.

Three parts, one run:

1. **digits** (needs scikit-learn, the `data` extra): the bundled 8x8 digits,
   pixels scaled to [0, 1], a stratified 75/25 split per seed; a 64-64-10
   ReLU network trained by `jp.fit` with Adam and by `MLPClassifier` with the
   same solver, learning rate, batch size and epochs (`alpha=0`, no early
   stop, no tolerance stop). Test accuracy and wall time per epoch, per seed.
   The initial weights differ: each library uses its own default (uniform
   `+-1/sqrt(fan_in)` here, Glorot there).
2. **sine**: a 1-8-8-1 tanh network fitted to `sin(x) + 0.1 noise` (200
   points) by `jp.least_squares(method="lm")` with the exact residual
   Jacobian, and by full-batch Adam from the same start. Final training MSE
   and function evaluations (lm: residual evaluations `nfev` plus Jacobian
   evaluations `njev`; Adam: one forward+backward per step).
3. **step**: one SGD step (forward, backward, update) of `Dense(w, w) -> ReLU ->
   Dense(w, 10)`, softmax cross-entropy, float64, timed with the interleaved
   method of `jacobprop bench` (`timing.measure_group`): the public
   `value_and_grad` + `SGD.step`, and the step inside `jp.fit` (per step over
   an epoch of 64 batches: shuffling, gathering, the rollback copy and the
   finiteness check included), each against a hand-written fused NumPy step
   (and a NumPy loop doing the same shuffling and gathering).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from .. import MSE, SGD, Adam, Dense, ReLU, Sequential, SoftmaxCrossEntropy, Tanh
from ..scipy_bridge import least_squares
from ..training import fit
from .models import softmax_cross_entropy_head
from .timing import Case, machine_info, measure_group

__all__ = ["PARTS", "TrainOptions", "run_train_bench", "format_train_report", "digits_comparison",
           "sine_comparison", "step_timing", "optimizer_agreement"]

STEP_BATCHES = 64  # steps per timed epoch in the loop paths
#: The parts of a run, in the order they run (`--parts`).
PARTS = ("digits", "sine", "step", "optim")


class TrainOptions:
    """Settings of one `jacobprop bench train` run (the CLI's options)."""

    def __init__(self, *, seeds: int = 5, epochs: int = 200, batch_size: int = 200,
                 lr: float = 1e-3, adam_steps: int = 5000, adam_lr: float = 1e-2,
                 repeats: int = 15, parts=PARTS):
        self.seeds, self.epochs, self.batch_size, self.lr = seeds, epochs, batch_size, lr
        self.adam_steps, self.adam_lr, self.repeats = adam_steps, adam_lr, repeats
        self.parts = tuple(parts)

    def as_dict(self) -> dict:
        return dict(vars(self), parts=list(self.parts))


# ---- 1. digits against scikit-learn ---------------------------------------------------------
def digits_comparison(options: TrainOptions, log=print) -> dict:
    """Accuracy and time per epoch of `jp.fit` and `MLPClassifier`, seed by seed."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        return {"skipped": "scikit-learn is not installed (pip install 'jacobprop[data]')"}
    import sklearn

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    rows = []
    for seed in range(options.seeds):
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=0.25, random_state=seed, stratify=y)
        row = {"seed": seed}

        def run_jacobprop(seed=seed, X_train=X_train, y_train=y_train, X_test=X_test,
                          y_test=y_test, row=row):
            rng = np.random.default_rng(seed)
            net = Sequential(Dense(64, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))
            start = time.perf_counter()
            history = fit(net, X_train, y_train, SoftmaxCrossEntropy(),
                          optimizer=Adam(options.lr), epochs=options.epochs,
                          batch_size=options.batch_size, rng=rng, progress=False)
            seconds = time.perf_counter() - start
            row["jacobprop"] = {
                "accuracy": float(np.mean(np.argmax(net(X_test), axis=1) == y_test)),
                "seconds_per_epoch": seconds / history.epochs,
                "final_train_loss": history.loss[-1],
            }

        def run_sklearn(seed=seed, X_train=X_train, y_train=y_train, X_test=X_test,
                        y_test=y_test, row=row):
            model = MLPClassifier(
                hidden_layer_sizes=(64,), activation="relu", solver="adam", alpha=0.0,
                batch_size=options.batch_size, learning_rate_init=options.lr,
                max_iter=options.epochs, shuffle=True, random_state=seed, tol=0.0,
                n_iter_no_change=options.epochs + 1, early_stopping=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                start = time.perf_counter()
                model.fit(X_train, y_train)
                seconds = time.perf_counter() - start
            row["sklearn"] = {
                "accuracy": float(model.score(X_test, y_test)),
                "seconds_per_epoch": seconds / model.n_iter_,
                "final_train_loss": float(model.loss_),
            }

        # Alternate which library runs first, so drift on a shared machine hits both.
        for run in ((run_jacobprop, run_sklearn) if seed % 2 == 0
                    else (run_sklearn, run_jacobprop)):
            run()
        rows.append(row)
        log(f"digits seed {seed}: jacobprop {row['jacobprop']['accuracy']:.4f} "
            f"sklearn {row['sklearn']['accuracy']:.4f}")
    summary = {}
    for name in ("jacobprop", "sklearn"):
        accuracies = [row[name]["accuracy"] for row in rows]
        summary[name] = {
            "mean_accuracy": float(np.mean(accuracies)),
            "std_accuracy": float(np.std(accuracies)),
            "median_seconds_per_epoch": float(np.median(
                [row[name]["seconds_per_epoch"] for row in rows])),
        }
    summary["accuracy_gap_points"] = 100 * (summary["jacobprop"]["mean_accuracy"]
                                            - summary["sklearn"]["mean_accuracy"])
    summary["epoch_time_ratio"] = (summary["jacobprop"]["median_seconds_per_epoch"]
                                   / summary["sklearn"]["median_seconds_per_epoch"])
    return {"sklearn_version": sklearn.__version__, "rows": rows, "summary": summary,
            "setup": {"train": int(round(0.75 * len(y))), "test": len(y) - int(
                round(0.75 * len(y))), "architecture": "64-64-10 ReLU", "optimizer": "Adam",
                "lr": options.lr, "batch_size": options.batch_size, "epochs": options.epochs}}


# ---- 2. noisy sine: Levenberg-Marquardt against Adam ------------------------------------------
def _sine_net(seed):
    rng = np.random.default_rng(1000 + seed)
    return Sequential(Dense(1, 8, rng=rng), Tanh(), Dense(8, 8, rng=rng), Tanh(),
                      Dense(8, 1, rng=rng))


#: lm evaluation budgets tried in turn (`max_nfev`); lm is deterministic, so the run with
#: budget k is the first k evaluations of an unbounded run.
LM_BUDGETS = (5, 10, 20, 50, 100, 200, 500, 1000)


def sine_comparison(options: TrainOptions, log=print) -> dict:
    """Adam's final MSE after `adam_steps` full-batch steps, and the smallest lm budget
    (from `LM_BUDGETS`) that gets below it, per seed."""
    rows = []
    for seed in range(options.seeds):
        rng = np.random.default_rng(seed)
        x = rng.uniform(-np.pi, np.pi, (200, 1))
        t = np.sin(x) + 0.1 * rng.standard_normal((200, 1))
        grid = np.linspace(-np.pi, np.pi, 1001)[:, None]

        net = _sine_net(seed)
        start = time.perf_counter()
        history = fit(net, x, t, MSE(), optimizer=Adam(options.adam_lr),
                      epochs=options.adam_steps, batch_size=x.shape[0],
                      rng=np.random.default_rng(seed), progress=False)
        adam = {"mse": float(np.mean((net(x) - t) ** 2)), "evaluations": history.steps,
                "seconds": time.perf_counter() - start,
                "clean_mse": float(np.mean((net(grid) - np.sin(grid)) ** 2))}

        lm = None
        for budget in LM_BUDGETS:
            net = _sine_net(seed)
            start = time.perf_counter()
            result = least_squares(net, x, t, method="lm", max_nfev=budget)
            lm = {"mse": float(np.mean((net(x) - t) ** 2)), "max_nfev": budget,
                  "nfev": int(result.nfev), "njev": int(result.njev),
                  "seconds": time.perf_counter() - start, "status": int(result.status),
                  "clean_mse": float(np.mean((net(grid) - np.sin(grid)) ** 2))}
            if lm["mse"] < adam["mse"] or result.status > 0:  # below Adam, or converged
                break
        rows.append({"seed": seed, "lm": lm, "adam": adam})
        log(f"sine seed {seed}: adam mse {adam['mse']:.5f} ({adam['evaluations']} evals), "
            f"lm mse {lm['mse']:.5f} ({lm['nfev']}+{lm['njev']} evals)")
    summary = {
        "lm_lower_in_all_seeds": all(r["lm"]["mse"] < r["adam"]["mse"] for r in rows),
        "lm_fewer_evaluations_in_all_seeds": all(
            r["lm"]["nfev"] + r["lm"]["njev"] < r["adam"]["evaluations"] for r in rows),
        "median_lm_mse": float(np.median([r["lm"]["mse"] for r in rows])),
        "median_adam_mse": float(np.median([r["adam"]["mse"] for r in rows])),
        "median_lm_evaluations": float(np.median(
            [r["lm"]["nfev"] + r["lm"]["njev"] for r in rows])),
    }
    return {"rows": rows, "summary": summary,
            "setup": {"architecture": "1-8-8-1 Tanh", "samples": 200, "noise": 0.1,
                      "adam_lr": options.adam_lr, "adam_steps": options.adam_steps,
                      "lm_budgets": list(LM_BUDGETS)}}


# ---- 3. one step against hand-written NumPy ----------------------------------------------------
def _fused_numpy_step(weights, x, labels, lr):
    """Forward, backward and SGD update of `Dense -> ReLU -> Dense` + softmax CE, in place."""
    W1, b1, W2, b2 = weights
    z = x @ W1.T
    z += b1
    a = np.maximum(z, 0, out=z)
    y = a @ W2.T
    y += b2
    value, p = softmax_cross_entropy_head(y, labels)
    g = p @ W2  # before W2 moves
    g *= a > 0
    W2 -= lr * (p.T @ a)
    b2 -= lr * p.sum(axis=0)
    W1 -= lr * (g.T @ x)
    b1 -= lr * g.sum(axis=0)
    return value


def step_timing(options: TrainOptions, log=print) -> dict:
    """Median time of one SGD step by each path, and the ratios to NumPy."""
    groups = []
    for batch, width in ((32, 128), (1, 16)):
        group = _step_group(batch, width, options.repeats)
        groups.append(group)
        log(f"step B={batch} width {width}: engine/numpy {group['engine_over_numpy']:.2f}, "
            f"fit/numpy loop {group['fit_over_numpy_loop']:.2f}")
    return {"groups": groups, "repeats": options.repeats, "lr": STEP_LR}


STEP_LR = 1e-4  # small: thousands of timed steps must not drift the weights far


def _step_group(batch: int, width: int, repeats: int) -> dict:
    rng = np.random.default_rng(batch * 1000 + width)
    net = Sequential(Dense(width, width, rng=rng), ReLU(), Dense(width, 10, rng=rng))
    fit_net = Sequential(Dense(width, width, rng=rng), ReLU(), Dense(width, 10, rng=rng))
    loss = SoftmaxCrossEntropy()
    X = rng.standard_normal((STEP_BATCHES * batch, width))
    T = rng.integers(0, 10, size=STEP_BATCHES * batch)
    x, t = X[:batch], T[:batch]
    weights = [value.copy() for value in net.params.values()]
    loop_weights = [value.copy() for value in net.params.values()]
    optimizer, fit_optimizer = SGD(STEP_LR), SGD(STEP_LR)
    params = net.params
    shuffle, fit_rng = np.random.default_rng(1), np.random.default_rng(1)

    def engine_step():
        _, grads = net.value_and_grad(x, t, loss)
        optimizer.step(params, grads)

    def numpy_loop():
        order = shuffle.permutation(X.shape[0])
        for begin in range(0, X.shape[0], batch):
            index = order[begin:begin + batch]
            _fused_numpy_step(loop_weights, X[index], T[index], STEP_LR)

    def fit_epoch():
        fit(fit_net, X, T, loss, optimizer=fit_optimizer, epochs=1, batch_size=batch,
            rng=fit_rng, progress=False)

    cases = [
        Case("numpy fused step", lambda: _fused_numpy_step(weights, x, t, STEP_LR)),
        Case("value_and_grad + SGD.step", engine_step),
        Case(f"numpy loop, epoch of {STEP_BATCHES}", numpy_loop),
        Case(f"jp.fit, epoch of {STEP_BATCHES}", fit_epoch),
    ]
    timings = measure_group(cases, repeats, budget_seconds=1.5)
    per_step = {}
    for case in cases:
        timing = timings[case.path]
        if isinstance(timing, str):
            raise RuntimeError(f"step timing: {case.path} failed: {timing}")
        per_step[case.path] = timing.median / (STEP_BATCHES if "epoch" in case.path else 1)
    numpy_step, engine, numpy_loop_step, fit_step = (per_step[c.path] for c in cases)
    return {
        "batch": batch, "width": width, "seconds_per_step": per_step,
        "engine_over_numpy": engine / numpy_step,
        "fit_over_numpy_loop": fit_step / numpy_loop_step,
        "fit_over_numpy_step": fit_step / numpy_step,
    }


# ---- 4. the optimizers against torch.optim ------------------------------------------------------
def optimizer_agreement(options: TrainOptions, log=print) -> dict:
    """Max abs difference of the parameters after 20 random steps, jacobprop vs torch.optim,
    for every optimizer setting, float64 and float32 (needs torch: the peers' venv)."""
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed (it is an optional peer)"}
    settings = [
        ("SGD", {}, "SGD", {}),
        ("SGD", {"momentum": 0.9, "weight_decay": 0.01}, "SGD",
         {"momentum": 0.9, "weight_decay": 0.01}),
        ("SGD", {"momentum": 0.9, "nesterov": True}, "SGD", {"momentum": 0.9, "nesterov": True}),
        ("Adam", {}, "Adam", {}),
        ("Adam", {"weight_decay": 0.1}, "Adam", {"weight_decay": 0.1}),
        ("Adam", {"weight_decay": 0.1, "decoupled": True}, "AdamW", {"weight_decay": 0.1}),
        ("Adam", {"betas": (0.3, 0.9)}, "Adam", {"betas": (0.3, 0.9)}),
    ]
    ours = {"SGD": SGD, "Adam": Adam}
    rows = []
    for dtype in (np.float64, np.float32):
        for index, (name, kwargs, torch_name, torch_kwargs) in enumerate(settings):
            rng = np.random.default_rng(index)
            start = {"a": rng.standard_normal((5, 7)).astype(dtype),
                     "b": rng.standard_normal(3).astype(dtype)}
            params = {k: v.copy() for k, v in start.items()}
            tensors = [torch.tensor(v.copy(), requires_grad=True) for v in start.values()]
            optimizer = ours[name](0.01, **kwargs)
            reference = getattr(torch.optim, torch_name)(tensors, lr=0.01, **torch_kwargs)
            worst = 0.0
            for _ in range(20):
                grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in start.items()}
                optimizer.step(params, grads)
                for tensor, grad in zip(tensors, grads.values(), strict=True):
                    tensor.grad = torch.tensor(grad)
                reference.step()
                for tensor, value in zip(tensors, params.values(), strict=True):
                    worst = max(worst, float(np.max(np.abs(tensor.detach().numpy() - value))))
            rows.append({"optimizer": repr(optimizer), "torch": torch_name,
                         "dtype": np.dtype(dtype).name, "max_abs_difference": worst,
                         "eps": float(np.finfo(dtype).eps)})
    log(f"optimizers: worst difference to torch "
        f"{max(r['max_abs_difference'] / r['eps'] for r in rows):.1f} eps")
    return {"torch_version": torch.__version__, "steps": 20, "rows": rows}


# ---- the run and its report ---------------------------------------------------------------------
def run_train_bench(options: TrainOptions, *, command: str = "", log=print) -> dict:
    """Every requested part, with the machine facts; a JSON-ready dict."""
    doc = {"command": command, "machine": machine_info(), "options": options.as_dict()}
    if "digits" in options.parts:
        doc["digits"] = digits_comparison(options, log)
    if "sine" in options.parts:
        doc["sine"] = sine_comparison(options, log)
    if "step" in options.parts:
        doc["step"] = step_timing(options, log)
    if "optim" in options.parts:
        doc["optim"] = optimizer_agreement(options, log)
    return doc


def _digits_lines(digits: dict) -> list[str]:
    out = []
    setup = digits["setup"]
    out.append(f"digits ({setup['train']} train / {setup['test']} test), "
               f"{setup['architecture']}, Adam lr {setup['lr']}, batch "
               f"{setup['batch_size']}, {setup['epochs']} epochs; scikit-learn "
               f"{digits['sklearn_version']}")
    out.append(f"{'seed':>4}  {'jp acc':>7}  {'sk acc':>7}  {'jp ms/epoch':>11}  "
               f"{'sk ms/epoch':>11}")
    for row in digits["rows"]:
        jp_, sk = row["jacobprop"], row["sklearn"]
        out.append(f"{row['seed']:>4}  {jp_['accuracy']:7.4f}  {sk['accuracy']:7.4f}  "
                   f"{1e3 * jp_['seconds_per_epoch']:11.3f}  "
                   f"{1e3 * sk['seconds_per_epoch']:11.3f}")
    s = digits["summary"]
    out.append(f"mean accuracy: jacobprop {s['jacobprop']['mean_accuracy']:.4f} "
               f"(sd {s['jacobprop']['std_accuracy']:.4f}), scikit-learn "
               f"{s['sklearn']['mean_accuracy']:.4f} "
               f"(sd {s['sklearn']['std_accuracy']:.4f}); gap "
               f"{s['accuracy_gap_points']:+.2f} points "
               f"[target: within 1 point: "
               f"{'met' if abs(s['accuracy_gap_points']) <= 1 else 'MISSED'}]")
    out.append(f"median time per epoch: jacobprop "
               f"{1e3 * s['jacobprop']['median_seconds_per_epoch']:.3f} ms, "
               f"scikit-learn {1e3 * s['sklearn']['median_seconds_per_epoch']:.3f} ms; "
               f"ratio {s['epoch_time_ratio']:.2f} [target: <= 1: "
               f"{'met' if s['epoch_time_ratio'] <= 1 else 'MISSED'}]")
    return out


def _sine_lines(sine: dict) -> list[str]:
    out = []
    setup = sine["setup"]
    out.append(f"noisy sine ({setup['samples']} points, noise sd {setup['noise']}), "
               f"{setup['architecture']}: full-batch Adam (lr {setup['adam_lr']}, "
               f"{setup['adam_steps']} steps) vs least_squares(lm) with the smallest "
               f"max_nfev of {setup['lm_budgets']} that gets below Adam's MSE")
    out.append(f"{'seed':>4}  {'adam mse':>9}  {'adam evals':>10}  {'lm mse':>9}  "
               f"{'lm nfev+njev':>12}  {'adam clean':>10}  {'lm clean':>9}  "
               f"{'adam s':>6}  {'lm s':>6}")
    for row in sine["rows"]:
        lm, adam = row["lm"], row["adam"]
        out.append(f"{row['seed']:>4}  {adam['mse']:9.6f}  {adam['evaluations']:>10}  "
                   f"{lm['mse']:9.6f}  {str(lm['nfev']) + '+' + str(lm['njev']):>12}  "
                   f"{adam['clean_mse']:10.6f}  {lm['clean_mse']:9.6f}  "
                   f"{adam['seconds']:6.2f}  {lm['seconds']:6.2f}")
    out.append("(clean: MSE against the noiseless sin on 1001 grid points)")
    s = sine["summary"]
    met = s["lm_lower_in_all_seeds"] and s["lm_fewer_evaluations_in_all_seeds"]
    out.append(f"lm below Adam in every seed: {s['lm_lower_in_all_seeds']}; with fewer "
               f"evaluations in every seed: {s['lm_fewer_evaluations_in_all_seeds']} "
               f"[target: {'met' if met else 'MISSED'}]")
    return out


def _step_lines(step: dict) -> list[str]:
    out = []
    out.append(f"one SGD step, Dense(w, w) -> ReLU -> Dense(w, 10), float64, medians of "
               f"{step['repeats']} interleaved rounds (microseconds per step)")
    for group in step["groups"]:
        out.append(f"B={group['batch']} width {group['width']}:")
        for path, seconds in group["seconds_per_step"].items():
            out.append(f"  {path:32s} {1e6 * seconds:9.2f}")
        verdict = ""
        if (group["batch"], group["width"]) == (32, 128):
            verdict = (f" [target: <= 1.25: "
                       f"{'met' if group['engine_over_numpy'] <= 1.25 else 'MISSED'}]")
        out.append(f"  engine step / numpy step {group['engine_over_numpy']:.2f}{verdict}; "
                   f"fit step / numpy loop step {group['fit_over_numpy_loop']:.2f}; "
                   f"fit step / numpy step {group['fit_over_numpy_step']:.2f}")
    return out


def _optim_lines(agreement: dict) -> list[str]:
    out = []
    out.append(f"optimizers vs torch.optim {agreement['torch_version']}: max abs "
               f"difference of the parameters over {agreement['steps']} random steps "
               "(lr 0.01, starting from N(0, 1))")
    for row in agreement["rows"]:
        out.append(f"  {row['dtype']:8s} {row['optimizer']:84s} vs {row['torch']:6s} "
                   f"{row['max_abs_difference']:.2e} "
                   f"({row['max_abs_difference'] / row['eps']:.1f} eps)")
    return out


#: Each part's name in the report (also for "skipped") and the lines of its section.
_REPORT_SECTIONS = {"digits": ("digits", _digits_lines), "sine": ("noisy sine", _sine_lines),
                    "step": ("one SGD step", _step_lines),
                    "optim": ("optimizers vs torch.optim", _optim_lines)}


def format_train_report(doc: dict) -> str:
    """The text report: per-seed tables, summaries and the targets' verdicts."""
    out = [f"# {doc['command'] or 'jacobprop bench train'}"]
    machine = doc["machine"]
    out.append(f"# machine: {machine['cpu']}, {machine['cores']} cores, load "
               f"{machine['load_average']}, numpy {machine['numpy']}, env {machine['env']}")
    for part in PARTS:
        results = doc.get(part)
        if results is None:
            continue
        title, lines = _REPORT_SECTIONS[part]
        out.append("")
        if "skipped" in results:
            out.append(f"{title}: skipped: {results['skipped']}")
        else:
            out.extend(lines(results))
    return "\n".join(out) + "\n"
