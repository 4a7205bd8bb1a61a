"""PNG plots: valid files, atomic and non-destructive writes, missing matplotlib."""

import sys

import pytest

pytest.importorskip("matplotlib")

from cl_tool.errors import EnvironmentProblem, OutputError
from cl_tool.plots import plot_accuracy_matrix, plot_lambda_sweep, plot_prune_curves

PNG = b"\x89PNG\r\n\x1a\n"
R = [[0.90, 0.10, 0.05], [0.70, 0.95, 0.10], [0.60, 0.80, 0.97]]


def _is_png(path):
    data = path.read_bytes()
    return len(data) > len(PNG) and data.startswith(PNG)


def test_accuracy_matrix_png(tmp_path):
    out = tmp_path / "acc.png"
    plot_accuracy_matrix(R, ["s0", "s1", "s2"], ["A", "B", "C"], out)
    assert _is_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["acc.png"]  # no temporary left behind


def test_accuracy_matrix_percent_and_non_square(tmp_path):
    out = tmp_path / "acc.png"
    plot_accuracy_matrix([[90.0, 12.5, 3.0]], ["after A"], ["A", "B", "C"], out, title="one stage")
    assert _is_png(out)


def test_prune_curves_png(tmp_path):
    out = tmp_path / "prune.png"
    curves = {"ewc": [(0.0, 0.9), (0.5, 0.85), (0.9, 0.6)], "magnitude": [(0.9, 0.4), (0.0, 0.9), (0.5, 0.8)]}
    plot_prune_curves(curves, out, title="ViT-Ti")
    assert _is_png(out)


@pytest.mark.parametrize("lambdas", [[100.0, 1e4, 1e3], [0.0, 10.0, 1e6]], ids=["log", "with-zero"])
def test_lambda_sweep_png(tmp_path, lambdas):
    out = tmp_path / "lam.png"
    plot_lambda_sweep(lambdas, {"A": [0.5, 0.9, 0.7], "B": [0.95, None, 0.9]}, out, title="resnet18")
    assert _is_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["lam.png"]
    with pytest.raises(ValueError):
        plot_lambda_sweep([1.0, 2.0], {"A": [0.5]}, tmp_path / "short.png")


def test_existing_file_needs_force(tmp_path):
    out = tmp_path / "acc.png"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError):
        plot_accuracy_matrix(R, ["s0", "s1", "s2"], ["A", "B", "C"], out)
    with pytest.raises(OutputError):
        plot_prune_curves({"ewc": [(0.0, 0.9)]}, out)
    with pytest.raises(OutputError):
        plot_lambda_sweep([1.0, 10.0], {"A": [0.5, 0.6]}, out)
    assert out.read_bytes() == b"keep me"
    plot_prune_curves({"ewc": [(0.0, 0.9)]}, out, force=True)
    assert _is_png(out)


def test_name_count_mismatch(tmp_path):
    with pytest.raises(ValueError):
        plot_accuracy_matrix(R, ["s0", "s1"], ["A", "B", "C"], tmp_path / "x.png")


def test_missing_matplotlib(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(EnvironmentProblem, match="pip install 'cl-tool\\[plot\\]'"):
        plot_prune_curves({"ewc": [(0.0, 0.9)]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
