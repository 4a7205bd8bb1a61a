"""The resumable state of train-next: its format, its checks, and a SIGTERM-then-resume run equal to an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from cl_tool.errors import BadInputError, IncompatibleError
from cl_tool.resume import ResumeState
from cl_tool.safetensors_io import save_tensors
from tests.conftest import run_subprocess


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    return {
        "epoch": 1,
        "batch": 2,
        "global_step": 7,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": None,
        "rng": torch.get_rng_state(),
        "si": {"W.weight": torch.ones(2, 3)},
        "epochs": [{"epoch": 1, "loss": 0.5}],
    }


def test_round_trip(tmp_path):
    io = ResumeState(tmp_path / "s.resume.safetensors", fingerprint="f" * 32, config={"lr": 0.1, "epochs": 3})
    assert io.load() is None
    saved = _state()
    io.save(saved)
    back = io.load()
    assert (back["epoch"], back["batch"], back["global_step"], back["epochs"]) == (1, 2, 7, [{"epoch": 1, "loss": 0.5}])
    assert all(torch.equal(back["model"][k], v) for k, v in saved["model"].items())
    assert torch.equal(back["rng"], saved["rng"]) and torch.equal(back["si"]["W.weight"], torch.ones(2, 3))
    for idx, entry in saved["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(back["optimizer"]["state"][idx][key]), torch.as_tensor(value))
    assert back["optimizer"]["param_groups"] == json.loads(
        json.dumps(saved["optimizer"]["param_groups"])
    )  # tuples come back as lists
    io.remove()
    assert not io.path.exists()


def test_cuda_generator_state_is_saved_and_restored_when_the_run_is_on_cuda(tmp_path, monkeypatch):
    """The CUDA generator state of the run's device round-trips through the file (torch.cuda's getter and setter
    replaced, as no GPU is here); a CPU run saves none, and a file without one (written before it was saved, or by a
    CPU run) restores the CPU generator alone."""
    from safetensors import safe_open

    from cl_tool.resume import restore_rng_states, rng_states

    cuda_state = torch.arange(16, dtype=torch.uint8)
    got, put = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: got.append(device) or cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: put.append((state, device)))
    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")
    io = ResumeState(tmp_path / "s.resume.safetensors", fingerprint="f" * 32, config={})
    io.save({**_state(), **rng_states(gpu)})
    assert got == [gpu]
    back = io.load()
    assert torch.equal(back["rng_cuda"], cuda_state)
    torch.manual_seed(123)
    restore_rng_states(back, gpu)
    assert torch.equal(torch.get_rng_state(), back["rng"]) and len(put) == 1
    assert torch.equal(put[0][0], cuda_state) and put[0][1] == gpu
    restore_rng_states(back, cpu)  # resumed on the CPU: the CUDA state is not applied
    assert len(put) == 1
    # a CPU run: no rng/cuda entry; loading gives None and restoring touches no CUDA generator
    io.save({**_state(), **rng_states(cpu)})
    with safe_open(str(io.path), "pt") as f:
        names = set(f.keys())
    assert "rng/cuda" not in names and "rng/torch" in names
    back = io.load()
    assert back["rng_cuda"] is None and len(got) == 1
    restore_rng_states(back, gpu)
    assert len(put) == 1


def test_a_state_of_another_run_is_refused(tmp_path):
    path = tmp_path / "s.resume.safetensors"
    ResumeState(path, fingerprint="f" * 32, config={"lr": 0.1}).save(_state())
    with pytest.raises(IncompatibleError, match="another input checkpoint"):
        ResumeState(path, fingerprint="0" * 32, config={"lr": 0.1}).load()
    with pytest.raises(IncompatibleError, match="other training options \\(lr\\)"):
        ResumeState(path, fingerprint="f" * 32, config={"lr": 0.2}).load()
    other = tmp_path / "other.safetensors"
    save_tensors(other, {"x": torch.zeros(1)}, {"cl_tool.model": "{}"}, force=False)
    with pytest.raises(BadInputError, match="not a cl-tool resume state"):
        ResumeState(other, fingerprint="f" * 32, config={}).load()


def test_sigterm_then_resume_equals_uninterrupted_run(anchored, demo_dir, tmp_path):
    args = [
        "train-next",
        anchored,
        "--data",
        f"{demo_dir}::permute=2,limit=480",
        "--epochs",
        "20",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--deterministic",
        "--lambda",
        "50",
        "--si-out",
    ]
    ref = tmp_path / "ref.safetensors"
    r = run_subprocess(*args, tmp_path / "ref.si.safetensors", "-o", ref)
    assert r.code == 0, r.err
    out = tmp_path / "out.safetensors"
    state = tmp_path / "out.resume.safetensors"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cl_tool",
            *map(str, args),
            tmp_path / "out.si.safetensors",
            "-o",
            out,
            "--checkpoint-every",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted; make the run longer"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "--resume" in err and state.exists() and not out.exists()
    r = run_subprocess(*args, tmp_path / "out.si.safetensors", "-o", out, "--checkpoint-every", "20", "--resume")
    assert r.code == 0, r.err
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    si_a, si_b = _weights(tmp_path / "ref.si.safetensors"), _weights(tmp_path / "out.si.safetensors")
    for k in si_a:
        torch.testing.assert_close(si_a[k], si_b[k], rtol=1e-6, atol=1e-9)
    assert not state.exists()  # removed after the successful finish
