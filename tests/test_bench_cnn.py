"""`jacobprop bench cnn`: the hand-written baseline agrees with the engine; the CLI runs."""

from __future__ import annotations

import io

import numpy as np

import jacobprop as jp
from jacobprop import cli
from jacobprop.bench.cnn import CNNSpec, _weights, build_cnn, reference_value_and_grad, run_cnn


def test_numpy_baseline_matches_the_engine():
    spec = CNNSpec("small", (1, 8, 8), (3, 4), 5)
    rng = np.random.default_rng(0)
    net = build_cnn(spec, rng=rng)
    x, labels = rng.standard_normal((5, 64)), rng.integers(0, 10, 5)
    value, grads = net.value_and_grad(x, labels, jp.SoftmaxCrossEntropy())
    ref_value, ref_grads = reference_value_and_grad(_weights(net), x, labels, (1, 8, 8))
    assert abs(value - ref_value) <= 1e-13 * abs(value)
    for key, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grads[key], ref, rtol=1e-11, atol=1e-14)


def test_the_table_has_every_path_and_exact_gradients():
    out = io.StringIO()
    rows = run_cnn(["small"], ["float64"], repeats=3, budget=0.01, stdout=out)
    assert {row["path"] for row in rows} == {"numpy-im2col", "vjp", "jacobian"}
    assert all(row["deviation"] < 1e-12 for row in rows)
    assert "small 1x8x8 ch 8,16 B=256 float64" in out.getvalue()


def test_usage_errors_exit_2(capsys):
    assert cli.main(["bench", "cnn", "--config", "imagenet"]) == 2
    assert "unknown --config 'imagenet'" in capsys.readouterr().err
    assert cli.main(["bench", "cnn", "--json", "out.json"]) == 2
