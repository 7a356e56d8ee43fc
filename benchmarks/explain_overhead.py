"""What a trace costs: `net.explain` against the backward pass it traces, same process.

    PYTHONPATH=$PWD python benchmarks/explain_overhead.py     (from the repository root)

Medians of interleaved rounds; the ratio is to `value_and_grad(mode="jacobian")`,
the explicit backward pass that `explain` walks step by step (and to `jacobian`
for the trace without a loss).
"""

import statistics
import time

import numpy as np

import jacobprop as jp


def median_seconds(functions: dict, rounds: int = 31, inner: int = 5) -> dict:
    times = {name: [] for name in functions}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(inner):
                function()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in times.items()}


def paths(net, x, t, loss) -> dict:
    """The timed calls on one network, batch and target."""
    return {
        "value_and_grad vjp": lambda: net.value_and_grad(x, t, loss),
        "value_and_grad jacobian": lambda: net.value_and_grad(x, t, loss, mode="jacobian"),
        "explain(x, t, loss)": lambda: net.explain(x, t, loss),
        "str(explain(x, t, loss))": lambda: str(net.explain(x, t, loss)),
        "jacobian(x)": lambda: net.jacobian(x),
        "explain(x)": lambda: net.explain(x),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    loss = jp.SoftmaxCrossEntropy()
    for widths, batch in (((4, 16, 3), 2), ((64, 256, 256, 10), 32)):
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [jp.Dense(fan_in, fan_out, rng=rng), jp.ReLU()]
        net = jp.Sequential(*layers[:-1])
        x = rng.standard_normal((batch, widths[0]))
        t = rng.integers(0, widths[-1], size=batch)
        medians = median_seconds(paths(net, x, t, loss))
        label = "-".join(map(str, widths))
        print(f"MLP {label} (ReLU), B = {batch}")
        for name, seconds in medians.items():
            base = "jacobian(x)" if name == "explain(x)" else "value_and_grad jacobian"
            print(f"  {name:26s} {seconds * 1e6:10.1f} us   x{seconds / medians[base]:.2f}")


if __name__ == "__main__":
    main()
