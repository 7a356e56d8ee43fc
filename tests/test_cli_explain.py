"""`jacobprop explain` and `jacobprop check`: output, files, exit codes, one-line errors."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import jacobprop as jp
from jacobprop import cli
from jacobprop.explain import Trace

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_sine_source() -> str:
    """The README's example layer (Sine and its cache), exactly as a reader copies it."""
    text = README.read_text()
    block = re.search(r"```python\n(from typing import NamedTuple.*?)```", text, re.S).group(1)
    # Keep the definitions; drop the checking calls that follow them.
    return block.split("\nassert_layer_correct(")[0] + "\n"


@pytest.fixture
def layer_module(tmp_path, monkeypatch, request):
    """Write layer source to a module with a name unique to the test; return that name."""
    name = "user_layers_" + re.sub(r"\W", "_", request.node.name)

    def write(source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        return name

    monkeypatch.chdir(tmp_path)  # `check` searches the current directory, as a user runs it
    yield write
    sys.modules.pop(name, None)


def one_line_error(capsys, argv) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and out == "", (out, err)
    return err


# ---- explain ------------------------------------------------------------------------
def test_explain_prints_the_chain_of_the_issue(capsys):
    assert cli.main(["explain", "4-16-relu-3", "--loss", "ce", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "Backward pass of SoftmaxCrossEntropy" in out and "B = 2" in out
    for piece in ("Dense(4, 16, bias=True)", "ReLU()", "Dense(16, 3, bias=True)",
                  "G <- G @ dy_2/dx_2", "G @ dy_0/dvec(W)", "2.W: dL/dW = G^T X",
                  "0.b: dL/db = sum_i G_i", "reverse"):
        assert piece in out


def test_explain_json_is_the_trace_of_the_same_network(tmp_path, capsys):
    path = tmp_path / "trace.json"
    argv = ["explain", "3-5-tanh-2", "--loss", "mse", "--batch", "1", "--values", "--seed", "4",
            "--json", str(path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    trace = Trace.from_json(path.read_text())
    assert str(trace) == out
    assert trace.network == ["Dense(3, 5, bias=True)", "Tanh()", "Dense(5, 2, bias=True)"]
    # Rebuild what the command built: the same seed gives the same weights and data.
    rng = np.random.default_rng(4)
    net = cli.network_from_spec("3-5-tanh-2", rng=rng)
    x = rng.standard_normal((1, 3))
    t = jp.MSE().example_target((1, 2), rng=rng)
    assert trace.value == pytest.approx(net.value_and_grad(x, t, jp.MSE())[0], rel=1e-12)


def test_explain_without_loss_traces_the_jacobian(capsys):
    assert cli.main(["explain", "4-16-relu-3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Full Jacobian dy/dx = J_2 @ J_1 @ J_0")
    assert "plan ((J_2 @ J_1) @ J_0)" in out


def test_explain_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "jacobians.png"
    assert cli.main(["explain", "4-16-relu-3", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in capsys.readouterr().out


def test_explain_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    err = one_line_error(capsys, ["explain", "4-3", "--plot", str(tmp_path / "j.png")])
    assert "needs matplotlib" in err and "jacobprop[plot]" in err
    assert not (tmp_path / "j.png").exists()


@pytest.mark.parametrize("spec, says", [
    ("relu-3", "must start with the input width"),
    ("4", "has no layer"),
    ("4-foo-3", "'foo' in SPEC '4-foo-3' is neither"),
    ("4-0-3", "'0' in SPEC"),
    ("4-dense-3", "'dense' in SPEC"),  # Dense comes from two widths, not by name
])
def test_explain_bad_spec_is_one_line(spec, says, capsys):
    assert says in one_line_error(capsys, ["explain", spec])


def test_explain_loss_names_come_from_the_registry(capsys):
    err = one_line_error(capsys, ["explain", "4-3", "--loss", "hinge"])
    for name in jp.LOSSES:
        assert name.lower() in err
    for alias in ("ce", "sce", "bce", "MSE", "rmse", "BinaryCrossEntropy"):
        assert cli.main(["explain", "4-3", "--loss", alias, "--batch", "1"]) == 0
    capsys.readouterr()


def test_saved_model_is_explained(tmp_path, capsys):
    rng = np.random.default_rng(5)
    path = tmp_path / "model.npz"
    jp.save(jp.Sequential(jp.Dense(2, 3, rng=rng), jp.Sigmoid()), path)
    assert cli.main(["explain", str(path), "--batch", "1"]) == 0
    assert "Dense(2, 3, bias=True)" in capsys.readouterr().out
    err = one_line_error(capsys, ["explain", str(tmp_path / "missing.npz")])
    assert "no such file" in err
    path.write_bytes(b"not a model")
    err = one_line_error(capsys, ["explain", str(path)])
    assert "cannot load" in err


# ---- check --------------------------------------------------------------------------
def test_check_passes_the_readme_layer(layer_module, capsys):
    name = layer_module(readme_sine_source())
    assert cli.main(["check", f"{name}:Sine", "--examples", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    from jacobprop.testing import CHECKS

    for check in CHECKS:
        assert re.search(rf"^  ok +{re.escape(check)}", out, re.M), out
    assert "all checks passed" in out


def test_check_by_file_path_and_without_float32(layer_module, tmp_path, capsys):
    name = layer_module(readme_sine_source())
    argv = ["check", f"{tmp_path / name}.py:Sine", "--input-dim", "4", "--no-float32"]
    assert cli.main(argv) == 0
    assert "skipped  float32 vs float64" in capsys.readouterr().out


WRONG = """
class WrongSine(Sine):
    def _jacobian(self, cache):
        return jp.DiagonalJacobian(-np.cos(cache.x))   # the sign of the derivative is wrong


class Crashing(Sine):
    def _jacobian(self, cache):
        raise RuntimeError("no jacobian today")


class NeedsArguments(Sine):
    def __init__(self, frequency):
        super().__init__()
        self.frequency = frequency
"""


def test_check_failure_exits_1_with_the_worst_entry(layer_module, capsys):
    name = layer_module(readme_sine_source() + WRONG)
    assert cli.main(["check", f"{name}:WrongSine", "--seed", "1"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^  FAIL +jacobian vs finite differences", out, re.M)
    assert re.search(r"^  ok +forward", out, re.M)
    assert re.search(r"^  not run +dot test", out, re.M)
    found = re.search(r"analytic (\S+), numeric (\S+)", out)
    analytic, numeric = float(found.group(1)), float(found.group(2))
    assert analytic == pytest.approx(-numeric, rel=1e-6)  # the flipped sign, side by side


def test_check_crash_in_the_layer_is_a_failure_not_a_traceback(layer_module, capsys):
    name = layer_module(readme_sine_source() + WRONG)
    assert cli.main(["check", f"{name}:Crashing", "--examples", "1"]) == 1
    out = capsys.readouterr().out
    assert "failed: RuntimeError: no jacobian today" in out
    assert re.search(r"^  ERROR +the layer raised .* on input 1 of 1", out, re.M)
    assert re.search(r"^  not run +jacobian vs finite differences", out, re.M)


def test_check_of_a_registered_layer_with_parameters(capsys):
    assert cli.main(["check", "jacobprop:Dense", "--input-dim", "2", "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "Dense(2, " in out and "(no parameters)" not in out


@pytest.mark.parametrize("target, says", [
    ("no_such_module_xyz:Sine", "no such module 'no_such_module_xyz'"),
    ("{mod}:Nope", "has no class 'Nope'"),
    ("{mod}:SineCache", "is not a jacobprop Layer subclass"),
    ("{mod}:np", "is not a jacobprop Layer subclass"),
    ("{mod}", "expected MODULE:CLASS"),
    ("missing/file.py:Sine", "no such file"),
    ("{mod}_broken:Sine", "importing"),
    ("{mod}:NeedsArguments", "cannot build the layer: NeedsArguments.example(3, rng=...) raised"
                             " TypeError"),
])
def test_check_bad_input_is_one_line_and_exit_2(target, says, layer_module, tmp_path, capsys):
    name = layer_module(readme_sine_source() + WRONG)
    (tmp_path / f"{name}_broken.py").write_text("import no_such_dependency_xyz\n")
    err = one_line_error(capsys, ["check", target.format(mod=name)])
    assert says in err
    sys.modules.pop(f"{name}_broken", None)


def test_bare_command_lists_the_new_commands(capsys):
    err = one_line_error(capsys, [])
    assert "bench, explain, check" in err
    assert cli.main(["explain", "--help"]) == 0
    assert "4-16-relu-3 --loss ce --batch 2" in capsys.readouterr().out
    assert cli.main(["check", "--help"]) == 0
    assert "MODULE:CLASS" in capsys.readouterr().out


def test_trace_json_from_the_cli_is_plain_json(tmp_path, capsys):
    path = tmp_path / "t.json"
    assert cli.main(["explain", "2-2", "--json", str(path)]) == 0
    capsys.readouterr()
    doc = json.loads(path.read_text())
    assert doc["mode"] == "jacobian" and doc["steps"][0]["kind"] == "shared"
