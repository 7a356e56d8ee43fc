"""The `jacobprop` command: every subcommand on tiny sizes, the JSON schema, peers, errors.

No timing is asserted anywhere: only structure, correctness columns and exit codes.
"""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jacobprop as jp
from jacobprop import cli
from jacobprop.bench import (
    SCHEMA,
    SchemaError,
    models,
    peers,
    suites,
    timing,
    validate,
    workloads,
)
from jacobprop.bench.models import MLPSpec

TINY = ["--batch", "2", "--width", "4", "--repeats", "3", "--budget", "0.05", "--quiet"]


@pytest.fixture(autouse=True)
def _quick_measurements(monkeypatch):
    # The matmul peak is measured with 1024^3 products and every sample lasts
    # 20 ms; smaller ones keep the tests quick and change nothing asserted.
    original = timing.matmul_peak
    monkeypatch.setattr("jacobprop.bench.runner.matmul_peak",
                        lambda dtype: original(dtype, size=64, tries=1))
    monkeypatch.setattr(timing, "MIN_SAMPLE_SECONDS", 1e-3)


def run_json(tmp_path, argv, capsys=None):
    path = tmp_path / "out.json"
    code = cli.main(argv + ["--json", str(path)])
    doc = json.loads(path.read_text())
    return code, doc


def rows_by_path(doc):
    return {row["path"]: row for row in doc["rows"]}


# ---- the workloads ----------------------------------------------------------------
def test_grad_runs_every_path_and_the_json_validates(tmp_path):
    code, doc = run_json(tmp_path, ["bench", "grad", *TINY])
    assert code == 0
    validate(doc)
    rows = rows_by_path(doc)
    assert set(rows) == {"numpy-reference", "vjp", "jacobian", "jacobian-dense", "finite-diff"}
    for path, row in rows.items():
        assert row["status"] == "ok", (path, row["reason"])
        assert len(row["samples"]) == 3
        assert row["q1_s"] <= row["median_s"] <= row["q3_s"]
        assert row["deviation"] < 1e-6, (path, row["deviation"])
        assert row["peak_memory_bytes"] > 0
    assert rows["numpy-reference"]["ratio"] == 1.0
    assert doc["groups"][0]["baseline"] == "numpy-reference"
    assert doc["groups"][0]["config"]["n_params"] == (4 + 1) * 4 + (4 + 1) * 10


def test_grad_grid_is_the_cartesian_product_and_float32_works(tmp_path):
    argv = ["bench", "grad", *TINY, "--batch", "1,3", "--dtype", "float32",
            "--activation", "tanh,Sigmoid"]
    code, doc = run_json(tmp_path, argv)
    assert code == 0
    validate(doc)
    configs = {(g["config"]["batch"], g["config"]["activation"]) for g in doc["groups"]}
    assert configs == {(1, "Tanh"), (1, "Sigmoid"), (3, "Tanh"), (3, "Sigmoid")}
    for row in doc["rows"]:
        if row["path"] == "finite-diff":
            assert row["status"] == "skipped" and "float64" in row["reason"]
        else:
            assert row["status"] == "ok"
            assert row["deviation"] < 1e-4  # float32 against the float64 reference


def test_size_caps_skip_with_a_stated_reason(tmp_path):
    argv = ["bench", "grad", *TINY, "--max-dense-mb", "0.0001", "--fd-max-params", "10"]
    code, doc = run_json(tmp_path, argv)
    assert code == 0
    rows = rows_by_path(doc)
    assert rows["jacobian-dense"]["status"] == "skipped"
    assert "--max-dense-mb" in rows["jacobian-dense"]["reason"]
    assert rows["finite-diff"]["status"] == "skipped"
    assert "70 parameters > cap 10" in rows["finite-diff"]["reason"]


def test_a_wrong_fast_path_shows_in_the_deviation_column(tmp_path, monkeypatch, capsys):
    honest = jp.Sequential.value_and_grad

    def off_by_one_percent(self, *args, **kwargs):
        value, grads = honest(self, *args, **kwargs)
        return value, {key: 1.01 * grad for key, grad in grads.items()}

    monkeypatch.setattr(jp.Sequential, "value_and_grad", off_by_one_percent)
    path = tmp_path / "out.json"
    argv = ["bench", "grad", "--batch", "2", "--width", "4", "--repeats", "3",
            "--budget", "0.05", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = rows_by_path(json.loads(path.read_text()))
    assert rows["vjp"]["deviation"] == pytest.approx(0.01, rel=1e-6)
    # The reference row compares itself with the (now wrong) engine, and its own
    # directional finite difference still vouches for it.
    assert rows["numpy-reference"]["deviation"] == pytest.approx(0.01 / 1.01, rel=1e-6)
    assert rows["numpy-reference"]["extra"]["directional_fd_deviation"] < 1e-6
    table = capsys.readouterr().out
    vjp_line = next(line for line in table.splitlines() if line.strip().startswith("vjp"))
    assert vjp_line.rstrip().endswith("!")


def test_finite_difference_path_matches_the_engine_and_restores_the_parameters():
    net, x, labels, loss = models.build_mlp(MLPSpec(3, 4), rng=np.random.default_rng(1))
    before = {key: value.copy() for key, value in net.params.items()}
    value, grads = workloads._central_differences(net, x, labels, loss)
    want_value, want_grads = net.value_and_grad(x, labels, loss)
    assert value == want_value
    assert models.relative_deviation(grads, want_grads) < 1e-7
    for key, param in net.params.items():
        np.testing.assert_array_equal(param, before[key])


def test_jacobian_workload_reports_costs_and_matches_finite_differences(tmp_path):
    code, doc = run_json(tmp_path, ["bench", "jacobian", *TINY, "--depth", "3"])
    assert code == 0
    validate(doc)
    rows = rows_by_path(doc)
    assert set(rows) == {"forward", "reverse", "auto"}
    net, x, _, _ = models.build_mlp(MLPSpec(2, 4, depth=3), rng=np.random.default_rng(0))
    costs = doc["groups"][0]["extra"]["cost_estimate"]
    for order, row in rows.items():
        assert row["status"] == "ok"
        assert row["deviation"] < 1e-6
        assert costs[order] == net.jacobian_cost(x, order)
        assert row["extra"]["cost_estimate"] == costs[order]
    assert rows["auto"]["ratio"] == 1.0
    assert doc["groups"][0]["extra"]["plan"].startswith("order=auto -> ")


def test_plain_bench_is_the_default_suite():
    parser = cli.build_parser()
    plan, output = cli.plan_from_args(parser.parse_args(["bench"]), ["bench"])
    default = suites.SUITES["default"]
    assert plan.suite == "default"
    assert plan.groups == list(default.groups)
    assert plan.repeats == default.repeats
    assert {workload for workload, _, _ in plan.groups} == {"grad", "jacobian", "gradcheck"}
    assert output.json_path is None and not output.quiet


def test_common_options_count_before_and_after_the_workload_name():
    parser = cli.build_parser()
    argv = ["bench", "--seed", "3", "--quiet", "grad", "--fd-max-params", "7"]
    plan, output = cli.plan_from_args(parser.parse_args(argv), argv)
    assert (plan.seed, output.quiet, plan.limits.fd_max_params, plan.repeats) == (3, True, 7, 9)
    argv = ["bench", "--repeats", "4", "jacobian"]
    assert cli.plan_from_args(parser.parse_args(argv), argv)[0].repeats == 4


def test_targets_suite_holds_every_target_configuration():
    groups = [(w, s) for suite in ("targets", "jacobians")
              for w, s, _ in suites.SUITES[suite].groups]
    for target in suites.TARGETS:
        assert (target.workload, target.spec) in groups, target.name
    assert suites.GRADCHECK_TARGET.n_params == 6922


def test_target_evaluation_reads_the_right_rows():
    spec = MLPSpec(32, 128)
    groups = [{"index": 0, "workload": "grad", "config": spec.as_dict()}]
    rows = [
        {"group": 0, "path": "numpy-reference", "status": "ok", "median_s": 2.0},
        {"group": 0, "path": "vjp", "status": "ok", "median_s": 2.4},
        {"group": 0, "path": "jacobian", "status": "ok", "median_s": 4.0},
    ]
    results = {r["name"]: r for r in suites.evaluate_targets(groups, rows)}
    vjp = results["vjp / NumPy reference, B=32 width 128"]
    assert vjp["measured"] == pytest.approx(1.2) and vjp["met"] is True
    jac = results["jacobian mode / vjp, B=32 width 128"]
    assert jac["measured"] == pytest.approx(4.0 / 2.4) and jac["met"] is False
    assert len(results) == 2  # the other targets' groups did not run


# ---- method ---------------------------------------------------------------------------
def test_repeats_are_interleaved_round_robin(monkeypatch):
    monkeypatch.setattr(timing, "MIN_SAMPLE_SECONDS", 0.0)
    calls = []
    cases = [timing.Case(name, (lambda name=name: calls.append(name))) for name in "abc"]
    result = timing.measure_group(cases, repeats=3, budget_seconds=1e9)
    assert [len(result[name].samples) for name in "abc"] == [3, 3, 3]
    # After the warm-up calls: one call per path per round, the order rotated each round.
    assert calls[-9:] == list("abc" "bca" "cab")


def test_a_crashing_path_is_an_error_row_not_a_crash():
    def broken():
        raise RuntimeError("boom")

    result = timing.measure_group([timing.Case("ok", lambda: 1), timing.Case("bad", broken)],
                                  repeats=3)
    assert result["bad"] == "RuntimeError: boom"
    assert len(result["ok"].samples) == 3


def test_slow_paths_take_fewer_rounds_spread_evenly():
    assert timing._rounds_for(3, 9) == {0, 4, 8}
    assert timing._rounds_for(9, 9) == set(range(9))


@pytest.mark.parametrize("activation", sorted(models.REFERENCE_ACTIVATIONS))
def test_numpy_reference_computes_the_engines_loss_and_gradients(activation):
    spec = MLPSpec(5, 6, depth=3, activation=activation, in_features=4, classes=3)
    net, x, labels, loss = models.build_mlp(spec, rng=np.random.default_rng(1))
    value, grads = net.value_and_grad(x, labels, loss)
    ref_value, ref_pairs = models.reference_value_and_grad(models.dense_weights(net), x,
                                                           labels, activation)
    assert ref_value == pytest.approx(value, rel=1e-13)
    keys = [key for key in grads if key.endswith(".W")]
    for key, (dW, db) in zip(keys, ref_pairs, strict=True):
        np.testing.assert_allclose(dW, grads[key], rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(db, grads[key[:-1] + "b"], rtol=1e-11, atol=1e-14)


def test_relative_deviation_is_normwise():
    want = [np.array([1.0, -4.0]), np.array([0.5])]
    got = [np.array([1.0, -4.2]), np.array([0.5])]
    assert models.relative_deviation(got, want) == pytest.approx(0.2 / 4.0)


# ---- the schema -------------------------------------------------------------------------
def test_schema_validator_rejects_broken_documents(tmp_path):
    _, doc = run_json(tmp_path, ["bench", "grad", *TINY])
    validate(doc)
    missing = copy.deepcopy(doc)
    del missing["schema_version"]
    with pytest.raises(SchemaError, match="missing required key 'schema_version'"):
        validate(missing)
    wrong_type = copy.deepcopy(doc)
    wrong_type["rows"][1]["median_s"] = "fast"
    with pytest.raises(SchemaError, match=r"\$\.rows\[1\]\.median_s: expected number or null"):
        validate(wrong_type)
    bad_status = copy.deepcopy(doc)
    bad_status["rows"][0]["status"] = "great"
    with pytest.raises(SchemaError, match="expected one of"):
        validate(bad_status)
    extra = copy.deepcopy(doc)
    extra["groups"][0]["surprise"] = 1
    with pytest.raises(SchemaError, match="unexpected key 'surprise'"):
        validate(extra)


def test_recorded_results_follow_the_schema():
    recorded = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.json"))
    assert recorded, "benchmarks/ should hold the recorded results"
    for path in recorded:
        validate(json.loads(path.read_text()))


def test_print_schema_is_the_shipped_schema(capsys):
    assert cli.main(["bench", "--print-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(SCHEMA))


# ---- peers ----------------------------------------------------------------------------
def test_missing_peer_is_one_clear_line(tmp_path, monkeypatch, capsys):
    real_import = importlib.import_module

    def no_jax(name, *args, **kwargs):
        if name == "jax" or name.startswith("jax."):
            raise ModuleNotFoundError("No module named 'jax'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(peers.importlib, "import_module", no_jax)
    code, doc = run_json(tmp_path, ["bench", "grad", *TINY, "--against", "jax"])
    assert code == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "peer 'jax' is not installed (pip install jax); skipping"
    ]
    assert "Traceback" not in err
    assert doc["missing_peers"] == ["peer 'jax' is not installed (pip install jax); skipping"]
    assert "jax" not in rows_by_path(doc)


# ---- the command line itself ------------------------------------------------------------
def test_version_in_process_and_as_module(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jacobprop {jp.__version__}"
    done = subprocess.run([sys.executable, "-m", "jacobprop", "--version"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0
    assert done.stdout.strip() == f"jacobprop {jp.__version__}"


def test_help_has_examples(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "jacobprop bench grad --batch" in out


def test_table_states_machine_and_method(capsys):
    assert cli.main(["bench", "jacobian", "--batch", "2", "--width", "3", "--repeats", "3",
                     "--budget", "0.05"]) == 0
    out = capsys.readouterr().out
    for needle in ("machine :", "versions: Python", "numpy", "scipy", "BLAS", "interleaved",
                   "median", "tracemalloc", "x base", "max rel dev", "GFLOP/s"):
        assert needle in out, needle


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["bench", "grad", "--batch", "0"], "positive integers, got '0'"),
        (["bench", "grad", "--width", "8,x"], "positive integers, got '8,x'"),
        (["bench", "grad", "--activation", "Swish"], "unknown activation 'Swish'"),
        (["bench", "jacobian", "--dtype", "float16"], "unsupported dtype 'float16'"),
        (["bench", "grad", "--against", "mxnet"], "unknown peer 'mxnet'"),
        (["bench", "--suite", "nope"], "invalid choice: 'nope'"),
        (["bench", "--repeats", "-3"], "expected one positive integer, got '-3'"),
        (["bench", "grad", "--json", "/nonexistent-dir/out.json"], "does not exist"),
        (["bench", "--suite", "targets", "grad"], "cannot be combined"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["bench", "--batch", "abc"], "--batch is an option of a workload; give it after"),
        (["bench", "--dtype=float32", "grad"], "--dtype is an option of a workload"),
        (["bench", "-q", "--in-features", "4", "jacobian"], "'jacobprop bench grad --in-f"),
        ([], "choose a command"),
        (["bench", "train", "--seeds", "0"], "--seeds: expected one positive integer"),
        (["bench", "train", "--step-repeats", "-1"], "expected one positive integer"),
        (["bench", "train", "--parts", "digits,nope"], "--parts must name some of digits"),
        (["bench", "train", "--parts", ","], "--parts must name some of digits"),
        (["bench", "cnn", "--digits", "--epochs", "0"], "--epochs: expected one positive"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, hint, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert hint in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_grid_options_are_the_ones_only_a_workload_takes():
    parser = cli.build_parser()
    suite_keys = set(vars(parser.parse_args(["bench"])))
    for workload in ("grad", "jacobian", "gradcheck"):
        workload_keys = set(vars(parser.parse_args(["bench", workload]))) - suite_keys
        grid_options = cli.bench._GRID_OPTIONS
        assert workload_keys == {option[2:].replace("-", "_") for option in grid_options}


def test_json_path_that_is_a_directory_is_a_user_error(tmp_path, capsys):
    assert cli.main(["bench", "grad", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert cli.main(["bench", "grad", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'jacobprop[plot]'" in err
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradcheck_workload_runs_every_mode(tmp_path, dtype):
    argv = ["bench", "gradcheck", *TINY, "--depth", "3", "--in-features", "3", "--dtype", dtype]
    code, doc = run_json(tmp_path, argv)
    validate(doc)
    rows = rows_by_path(doc)
    assert set(rows) == {"full", "fast", "richardson", "taylor"}
    for path, row in rows.items():
        assert row["status"] == "ok", (path, row["reason"])
        assert row["extra"].get("check_ok", True), path
    assert code == 0


