"""A failure leaves nothing behind; no non-finite weights get out; closed pipes end quietly.

Each failing run checks: the documented exit code, one ``Error:`` sentence, no traceback, the inputs
byte-identical and no new file (log, resume state, SI file, temporary file) in the folder it writes to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import snapshot_dir

REPO = Path(__file__).resolve().parent.parent


def _fails_cleanly(cli, d: Path, demo: Path, argv, code: int, phrase: str):
    before, before_demo = snapshot_dir(d), snapshot_dir(demo)
    r = cli(*argv)
    assert r.code == code, f"exit {r.code}, expected {code}\n{r.err}"
    assert len([ln for ln in r.err.splitlines() if ln.startswith("Error:")]) == 1 and phrase in r.error_line, r.err
    assert "Traceback" not in r.err
    assert snapshot_dir(d) == before, sorted(set(snapshot_dir(d)) ^ set(before))
    assert snapshot_dir(demo) == before_demo
    return r


def _signal_at_step(monkeypatch, signum, step: int):
    """Deliver ``signum`` to this process at the start of training step ``step`` (1-based)."""
    import cl_tool.training as training

    real, calls = training.lr_at, []

    def lr_at(cfg, s, total):
        calls.append(s)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(cfg, s, total)

    monkeypatch.setattr(training, "lr_at", lr_at)


def test_divergence_leaves_no_log_state_si_or_temporary_file(cli, ws, demo_dir):
    d, ck = ws
    data = f"{demo_dir}::limit=64"
    imp = d / "m.importance.safetensors"
    assert cli("importance", ck, "--data", data, "--method", "fisher", "--device", "cpu").code == 0
    argv = [
        "train-next",
        ck,
        "--data",
        f"{data},permute=1",
        "--batch-size",
        "8",
        "--penalty",
        "ewc",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--lambda",
        "1e6",
        "--device",
        "cpu",
        "-o",
        d / "b.safetensors",
        "--log-json",
        d / "log.jsonl",
        "--checkpoint-every",
        "1",
        "--si-out",
        d / "b.si.safetensors",
    ]
    _fails_cleanly(cli, d, demo_dir, argv, 5, "Training diverged")
    assert imp.exists()


def test_weights_that_overflow_on_the_last_step_are_never_written(cli, ws, demo_dir):
    """The loss of every step is finite, but the last update sends the weights to infinity: exit 5, nothing written."""
    d, ck = ws
    argv = [
        "train-next",
        ck,
        "--data",
        f"{demo_dir}::limit=8",
        "--batch-size",
        "8",
        "--optimizer",
        "sgd",
        "--lr",
        "10",
        "--momentum",
        "3e38",
        "--nesterov",
        "--penalty",
        "none",
        "--device",
        "cpu",
        "-o",
        d / "b.safetensors",
        "--log-json",
        d / "log.jsonl",
    ]
    _fails_cleanly(cli, d, demo_dir, argv, 5, "NaN or infinite values")


def test_bad_labels_found_after_the_start_leave_nothing(cli, ws, demo_dir, tmp_path):
    import datasets

    d, ck = ws
    bad = tmp_path / "bad"
    datasets.Dataset.from_dict({"pixels": [[0.5] * 784] * 4, "label": [0, 1, 2, 12]}).save_to_disk(str(bad))
    argv = [
        "train-next",
        ck,
        "--data",
        bad,
        "--device",
        "cpu",
        "-o",
        d / "b.safetensors",
        "--log-json",
        d / "log.jsonl",
        "--checkpoint-every",
        "1",
    ]
    _fails_cleanly(cli, d, bad, argv, 4, "outside the model's 10 classes")


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_interruption_without_checkpointing_leaves_nothing(cli, ws, demo_dir, monkeypatch, signum, code):
    d, ck = ws
    _signal_at_step(monkeypatch, signum, 3)
    argv = [
        "train-next",
        ck,
        "--data",
        f"{demo_dir}::limit=64",
        "--batch-size",
        "8",
        "--penalty",
        "none",
        "--device",
        "cpu",
        "-o",
        d / "b.safetensors",
        "--log-json",
        d / "log.jsonl",
        "--si-out",
        d / "si.safetensors",
    ]
    _fails_cleanly(cli, d, demo_dir, argv, code, "nothing was written")


def test_a_resumed_run_logs_each_epoch_once(cli, ws, demo_dir, monkeypatch):
    """Interrupted in epoch 2 (epoch 1 already logged), then resumed: the log has epochs 1, 2, 3 exactly once."""
    d, ck = ws
    argv = [
        "train-next",
        ck,
        "--data",
        f"{demo_dir}::limit=64",
        "--batch-size",
        "16",
        "--epochs",
        "3",
        "--penalty",
        "none",
        "--device",
        "cpu",
        "-o",
        d / "b.safetensors",
        "--log-json",
        d / "log.jsonl",
        "--checkpoint-every",
        "1",
    ]
    _signal_at_step(monkeypatch, signal.SIGTERM, 6)  # 4 steps per epoch: step 6 is in epoch 2
    r = cli(*argv)
    assert r.code == 143, r.err
    assert not (d / "log.jsonl").exists() and not (d / "b.safetensors").exists()
    assert (d / "b.resume.safetensors").exists()
    monkeypatch.undo()
    r = cli(*argv, "--resume")
    assert r.code == 0, r.err
    epochs = [json.loads(line)["epoch"] for line in (d / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert not (d / "b.resume.safetensors").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".cl-tool-tmp-")]


def test_resume_without_a_state_does_not_replace_a_finished_output(cli, ws, demo_dir):
    d, ck = ws
    argv = [
        "train-next",
        ck,
        "--data",
        f"{demo_dir}::limit=32",
        "--penalty",
        "none",
        "--device",
        "cpu",
        "-o",
        d / "b.safetensors",
    ]
    assert cli(*argv).code == 0
    _fails_cleanly(cli, d, demo_dir, argv + ["--resume"], 6, "already exists")
    assert cli(*argv, "--resume", "--force").code == 0


def test_a_closed_stdout_is_not_an_error(ws, demo_dir):
    """`cl-tool ... --json >&-`: the result cannot be printed, the command still does its work and exits 0."""
    d, ck = ws
    proc = subprocess.run(
        [sys.executable, "-m", "cl_tool", "importance", str(ck), "--method", "magnitude", "--json"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        timeout=300,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Error" not in proc.stderr and "Traceback" not in proc.stderr
    assert (d / "m.importance.safetensors").exists()


def test_a_reader_that_goes_away_ends_the_command_quietly(ws, demo_dir):
    """stdout and stderr both pipes whose reader has gone: exit 141 (as SIGPIPE would), outputs complete, no message."""
    d, ck = ws
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "cl_tool",
                "prune",
                str(ck),
                "--by",
                "magnitude",
                "--sparsity",
                "0.5",
                "-o",
                str(d / "p.safetensors"),
                "--json",
            ],
            stdout=write_end,
            stderr=write_end,
            cwd=REPO,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    from cl_tool.checkpoint import load_checkpoint

    assert load_checkpoint(d / "p.safetensors").spec.arch == "mlp"
