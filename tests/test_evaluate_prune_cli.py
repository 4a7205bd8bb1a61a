"""evaluate's matrix, CSV, plot and CI gates; prune's sweep, masks and train-next --mask."""

import csv
import json

import pytest
import torch


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory, demo_dir):
    from cl_tool.cli import main

    d = tmp_path_factory.mktemp("two")
    a0, a, b = d / "a0.safetensors", d / "a.safetensors", d / "b.safetensors"
    for argv in (
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,64,10", "-o", a0],
        ["train-next", a0, "--data", f"{demo_dir}::limit=600", "--epochs", "2", "--device", "cpu", "-o", a],
        ["train-next", a, "--data", f"{demo_dir}::limit=600,rotate=90", "--epochs", "2", "--device", "cpu", "-o", b],
    ):
        with pytest.raises(SystemExit) as exc:
            main([str(x) for x in argv])
        assert exc.value.code == 0
    return d, a0, a, b


def test_matrix_csv_plot_and_names(cli, two_stage, demo_dir, tmp_path):
    d, a0, a, b = two_stage
    csv_path, png = tmp_path / "r.csv", tmp_path / "r.png"
    r = cli(
        "evaluate",
        a,
        b,
        "--data",
        f"old={demo_dir}::split=test",
        "--data",
        f"new={demo_dir}::split=test,rotate=90",
        "--device",
        "cpu",
        "--json",
        "--csv",
        csv_path,
        "--plot",
        png,
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["tasks"] == ["old", "new"] and len(res["accuracy"]) == 2
    R = res["accuracy"]
    assert res["summary"]["bwt"] == pytest.approx(R[1][0] - R[0][0])
    assert res["summary"]["average_accuracy"] == pytest.approx((R[1][0] + R[1][1]) / 2)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4 and {r["task"] for r in rows} == {"old", "new"}
    assert float(rows[0]["accuracy"]) == pytest.approx(R[0][0], abs=1e-6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gates(cli, two_stage, demo_dir):
    d, a0, a, b = two_stage
    tasks = [
        "--data",
        f"old={demo_dir}::split=test",
        "--data",
        f"new={demo_dir}::split=test,rotate=90",
        "--device",
        "cpu",
    ]
    r = cli("evaluate", a, b, *tasks, "--fail-under-acc", "0.99")
    assert r.code == 8 and "average accuracy" in r.error_line
    r = cli("evaluate", a, b, *tasks, "--fail-over-forgetting", "0.0001")
    assert r.code == 8 and "forgetting" in r.error_line
    r = cli("evaluate", a, b, *tasks, "--fail-under-acc", "0.01", "--fail-over-forgetting", "1.0")
    assert r.code == 0, r.err


def test_gate_verdict_is_in_the_json_also_when_it_fails(cli, two_stage, demo_dir):
    d, a0, a, b = two_stage
    tasks = ["--data", f"old={demo_dir}::split=test", "--data", f"new={demo_dir}::split=test,rotate=90"]
    r = cli("evaluate", a, b, *tasks, "--device", "cpu", "--json", "--fail-over-forgetting", "0.0001")
    assert r.code == 8
    res = json.loads(r.out)  # one document: the result, its gate verdicts and the error
    fgt = res["summary"]["average_forgetting"]
    assert fgt == pytest.approx(res["accuracy"][0][0] - res["accuracy"][1][0]) and fgt > 0.0001
    assert res["gates"] == [{"gate": "fail_over_forgetting", "value": fgt, "limit": 0.0001, "passed": False}]
    assert res["error"]["code"] == 8 and res["error"]["class"] == "GateFailed"
    assert res["error"]["message"] == r.error_line.removeprefix("Error: ")
    assert "--fail-over-forgetting" in res["error"]["message"]
    r = cli("evaluate", a, b, *tasks, "--device", "cpu", "--json", "--fail-under-acc", "0.01")
    res = json.loads(r.out)
    assert r.code == 0 and "error" not in res
    assert res["gates"] == [
        {"gate": "fail_under_acc", "value": res["summary"]["average_accuracy"], "limit": 0.01, "passed": True}
    ]


def test_results_on_stdout_logs_on_stderr(cli, two_stage, demo_dir):
    d, a0, a, b = two_stage
    tasks = ["--data", f"old={demo_dir}::split=test", "--data", f"new={demo_dir}::split=test,rotate=90"]
    r = cli("evaluate", a, b, *tasks, "--device", "cpu")
    assert r.code == 0, r.err
    assert "accuracy (rows: checkpoints, columns: tasks)" in r.out and "average forgetting" in r.out
    assert "accuracy (rows" not in r.err and "average forgetting" not in r.err
    assert "old: " in r.err or "split test" in r.err  # what each task read is a log line
    quiet = cli("-q", "evaluate", a, b, *tasks, "--device", "cpu")
    assert quiet.code == 0 and quiet.err == "" and quiet.out == r.out  # --quiet hides logs, not the result
    r = cli(
        "prune", a, "--by", "magnitude", "--data", f"{demo_dir}::split=test", "--sweep", "0.5,0.9", "--device", "cpu"
    )
    assert r.code == 0 and "accuracy vs sparsity" in r.out and "accuracy vs sparsity" not in r.err
    r = cli("evaluate", a, "missing.safetensors", *tasks, "--json")
    assert r.code == 3 and json.loads(r.out) == {
        "error": {"code": 3, "class": "BadInputError", "message": r.error_line.removeprefix("Error: ")}
    }
    r = cli("evaluate", a, *tasks, "--batch-size", "0", "--json")  # a usage error: still one JSON document
    assert r.code == 2 and json.loads(r.out)["error"]["class"] == "UsageError"


def test_siblings_get_the_matrix_without_forgetting(cli, two_stage, demo_dir, tmp_path):
    d, a0, a, b = two_stage
    b50, b80 = tmp_path / "b50.safetensors", tmp_path / "b80.safetensors"
    for path, level in ((b50, "0.5"), (b80, "0.8")):
        assert cli("prune", b, "--by", "magnitude", "--sparsity", level, "-o", path).code == 0
    tasks = ["--data", f"old={demo_dir}::split=test", "--data", f"new={demo_dir}::split=test,rotate=90"]
    r = cli("evaluate", b50, b80, *tasks, "--device", "cpu", "--json")
    res = json.loads(r.out)
    assert r.code == 0 and res["sequence"] is False and len(res["accuracy"]) == 2
    s = res["summary"]
    assert s["bwt"] is None and s["average_forgetting"] is None and s["learning_accuracy"] is None
    assert s["forgetting"] == [None, None]
    assert s["average_accuracy"] == pytest.approx(sum(res["accuracy"][1]) / 2)
    r = cli("evaluate", b50, b80, *tasks, "--device", "cpu")
    assert "forgetting" not in r.out and "BWT" not in r.out and "accuracy (rows" in r.out
    assert f"{b80} does not descend from {b50}" in r.err.replace("\n", " ")
    r = cli("evaluate", b50, b80, *tasks, "--device", "cpu", "--fail-over-forgetting", "0.5")
    assert r.code == 4 and "--fail-over-forgetting needs checkpoints that form a sequence" in r.error_line
    r = cli("evaluate", a, b50, *tasks, "--device", "cpu", "--json")  # a -> b -> b50: two generations, a sequence
    res = json.loads(r.out)
    assert res["sequence"] is True
    assert res["summary"]["bwt"] == pytest.approx(res["accuracy"][1][0] - res["accuracy"][0][0])


def test_sweep_and_masks(cli, two_stage, demo_dir, tmp_path):
    d, a0, a, b = two_stage
    png = tmp_path / "curve.png"
    r = cli(
        "prune",
        a,
        "--by",
        "magnitude",
        "--by",
        "signal",
        "--score-data",
        f"{demo_dir}::limit=200",
        "--data",
        f"{demo_dir}::split=test",
        "--sweep",
        "0.5,0.9,0.99",
        "--plot",
        png,
        "--device",
        "cpu",
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert set(res["curves"]) == {"magnitude", "signal"}
    for curve in res["curves"].values():
        accs = [p["accuracy"] for p in curve]
        assert [p["sparsity"] for p in curve] == [0.5, 0.9, 0.99]
        assert accs[-1] <= res["unpruned_accuracy"] + 0.05
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.safetensors"))  # a sweep writes no checkpoint

    mask, pruned = tmp_path / "m.safetensors", tmp_path / "p.safetensors"
    r = cli("prune", a, "--by", "magnitude", "--sparsity", "0.8", "-o", pruned, "--mask-out", mask)
    assert r.code == 0, r.err
    out = tmp_path / "next.safetensors"
    r = cli(
        "train-next",
        pruned,
        "--data",
        f"{demo_dir}::limit=300,rotate=90",
        "--device",
        "cpu",
        "--mask",
        mask,
        "--penalty",
        "none",
        "-o",
        out,
    )
    assert r.code == 0, r.err
    from safetensors.torch import load_file

    masks, w = load_file(str(mask)), load_file(str(out))
    for name, m in masks.items():
        assert torch.all(w[name][m == 0] == 0), name  # pruned weights stayed zero
        assert torch.count_nonzero(w[name][m == 1]) > 0
    from cl_tool.checkpoint import load_checkpoint

    rec = load_checkpoint(pruned).extra["pruning"]
    assert rec["by"] == "magnitude" and abs(rec["achieved_sparsity"] - 0.8) < 1e-3 and rec["per_layer"]


@pytest.mark.parametrize("bias_score", ["post-activation", "pre-activation"])
def test_the_authors_pruning_procedure_is_one_command_line(cli, two_stage, demo_dir, tmp_path, bias_score):
    """One global ranking over all tensors (biases, classifier) by the paper's signal (sum, l1) scored on a named split;
    the same masks whether the scores come from `importance --method signal` or are computed by prune itself."""
    from safetensors.torch import load_file

    from cl_tool.sidecar import load_sidecar

    d, a0, a, b = two_stage
    score = f"{demo_dir}::limit=200"
    common = ["--scope", "global", "--include-bias", "--include-classifier", "--sparsity", "0.9", "--device", "cpu"]
    paper = ["--signal-norm", "sum", "--signal-stat", "l1"]
    on_data = tmp_path / "on_data.safetensors"
    r = cli(
        "prune",
        a,
        "--by",
        "signal",
        *paper,
        "--bias-score",
        bias_score,
        "--score-data",
        score,
        *common,
        "-o",
        on_data,
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["source"]["bias_score"] == bias_score
    assert set(res["per_layer"]) == set(load_file(a))  # one ranking over every tensor, biases and classifier included
    side = tmp_path / "a.signal.safetensors"
    r = cli(
        "importance",
        a,
        "--method",
        "signal",
        *paper,
        "--bias-score",
        bias_score,
        "--data",
        score,
        "-o",
        side,
        "--device",
        "cpu",
    )
    assert r.code == 0, r.err
    assert load_sidecar(side).options == {"bias_score": bias_score, "signal_norm": "sum", "signal_stat": "l1"}
    stored = tmp_path / "stored.safetensors"
    r = cli("prune", a, "--by", "importance", "--importance", side, *common, "-o", stored)
    assert r.code == 0, r.err
    w1, w2 = load_file(on_data), load_file(stored)
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    default = tmp_path / "default.safetensors"
    r = cli("importance", a, "--method", "signal", "--data", score, "-o", default, "--device", "cpu")
    assert r.code == 0 and load_sidecar(default).options["signal_stat"] == "l2"  # the measured default: mean, l2
    assert load_sidecar(default).options["signal_norm"] == "mean"


def test_bias_score_is_ignored_with_a_note_where_it_does_not_apply(cli, two_stage, demo_dir, tmp_path):
    d, a0, a, b = two_stage
    r = cli(
        "importance",
        a,
        "--method",
        "mas",
        "--bias-score",
        "pre-activation",
        "--data",
        f"{demo_dir}::limit=50",
        "-o",
        tmp_path / "m.safetensors",
        "--device",
        "cpu",
    )
    assert r.code == 0, r.err
    assert "--bias-score" in r.err and "ignored" in r.err


def test_a_missing_score_data_folder_is_named_by_its_option(cli, two_stage, tmp_path):
    d, a0, a, b = two_stage
    out = tmp_path / "p.safetensors"
    r = cli("prune", a, "--by", "signal", "--score-data", tmp_path / "nope", "--sparsity", "0.5", "-o", out)
    assert r.code == 3 and "--score-data" in r.error_line and "nope" in r.error_line
    assert not out.exists()
