"""`cl-tool info` on every kind of file cl-tool writes, `--for`, `--verify`, `--sparsity`, `--json`, and damaged files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest


def _run(argv):
    from cl_tool.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(x) for x in argv])
    assert exc.value.code == 0, argv


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_dir):
    d = tmp_path_factory.mktemp("info")
    f = {k: d / f"{k}.safetensors" for k in ("a0", "a", "b", "b50", "other")}
    f["a_imp"], f["other_imp"], f["mask"] = (
        d / "a.importance.safetensors",
        d / "other.importance.safetensors",
        d / "b50.mask.safetensors",
    )
    data = f"{demo_dir}::limit=64"
    common = ["--epochs", "1", "--batch-size", "32", "--device", "cpu"]
    for argv in (
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,16,10", "-o", f["a0"]],
        ["train-next", f["a0"], "--data", f"A={data}", *common, "-o", f["a"]],
        ["importance", f["a"], "--data", f"A={data}", "--method", "fisher", "--device", "cpu"],
        ["train-next", f["a"], "--data", f"B={data},permute=1", *common, "--lambda", "200", "-o", f["b"]],
        [
            "prune",
            f["b"],
            "--by",
            "importance",
            "--importance",
            f["a_imp"],
            "--sparsity",
            "0.5",
            "-o",
            f["b50"],
            "--mask-out",
            f["mask"],
        ],
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,16,10", "--seed", "7", "-o", f["other"]],
        ["importance", f["other"], "--method", "magnitude"],
    ):
        _run(argv)
    # a timm folder (config.json + model.safetensors); info reads only the config and the header
    import torch
    from safetensors.torch import save_file

    timm_dir = d / "timm_model"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text(
        json.dumps(
            {
                "architecture": "resnet18",
                "num_classes": 7,
                "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            }
        )
    )
    save_file(
        {
            "fc.weight": torch.ones(7, 4),
            "fc.bias": torch.zeros(7),
            "bn.running_mean": torch.zeros(4, dtype=torch.float16),
        },
        str(timm_dir / "model.safetensors"),
    )
    f["timm"] = timm_dir
    return d, f


def _info(cli, *args):
    r = cli("info", *args, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_checkpoint(cli, files):
    d, f = files
    (i,) = _info(cli, f["b50"])
    assert i["kind"] == "checkpoint" and i["path"] == str(f["b50"]) and i["problems"] == []
    assert (
        i["model"]["arch"] == "mlp"
        and i["model"]["kwargs"] == {"sizes": "784,16,10"}
        and i["model"]["input_shape"] == [1, 28, 28]
    )
    assert i["model"]["num_classes"] == 10 and i["model"]["mean"] == [0.0] and i["model"]["std"] == [1.0]
    assert i["parameters"]["trainable"] == 784 * 16 + 16 + 16 * 10 + 10 and i["parameters"]["classifier"] == [
        "net.3.weight",
        "net.3.bias",
    ]
    assert i["tensors"]["by_dtype"]["float32"]["values"] == i["parameters"]["trainable"]
    assert i["tensors"]["by_dtype"]["float32"]["bytes"] == 4 * i["parameters"]["trainable"]
    from cl_tool.checkpoint import load_checkpoint

    ck = load_checkpoint(f["b50"])
    assert i["fingerprint"] == {
        "recorded": ck.fingerprint,
        "computed": None,
        "verified": None,
    }  # header only: not checked
    assert [h["command"] for h in i["history"]] == ["init", "train-next", "train-next", "prune"]
    assert (
        i["history"][2]["data"] == "B"
        and i["history"][2]["penalty"] == "stabilized"
        and i["history"][2]["lambda"] == 200
    )
    assert [(x["generations"], x["fingerprint"]) for x in i["lineage"][:3]] == [
        (1, load_checkpoint(f["b"]).fingerprint),
        (2, load_checkpoint(f["a"]).fingerprint),
        (3, load_checkpoint(f["a0"]).fingerprint),
    ]
    assert i["pruning"]["by"] == "importance" and i["pruning"]["source"]["generations"] == 1
    assert "sparsity" not in i


def test_checkpoint_human_output(cli, files):
    d, f = files
    r = cli("info", f["b50"])
    assert r.code == 0 and r.err == ""  # the description is the result: stdout; nothing to log
    for text in (
        "cl-tool checkpoint",
        "mlp",
        "1x28x28",
        "10 classes",
        "12,730 trainable",
        "float32",
        "history",
        "lineage",
        "stabilized",
        "prune",
        "--verify",
    ):
        assert text in r.out, text
    assert cli("-q", "info", f["b50"]).out == r.out  # --quiet drops logs, never the result


def test_verify_and_sparsity(cli, files):
    d, f = files
    (i,) = _info(cli, f["b50"], "--verify", "--sparsity")
    assert i["fingerprint"]["verified"] is True and i["fingerprint"]["computed"] == i["fingerprint"]["recorded"]
    sp = i["sparsity"]
    assert sp["tensors"]["net.1.weight"]["zeros"] == round(0.5 * 784 * 16)
    assert sp["zeros"] >= round(0.5 * 784 * 16)
    r = cli("info", f["b50"], "--sparsity")
    assert r.code == 0 and "net.1.weight" in r.out and "0.5000" in r.out


def test_verify_detects_edited_tensors(cli, files, tmp_path):
    from safetensors.torch import load_file, save_file

    from cl_tool.safetensors_io import read_header

    d, f = files
    _, meta = read_header(f["b"])
    t = load_file(str(f["b"]))
    t["net.3.bias"] = t["net.3.bias"] + 1
    edited = tmp_path / "edited.safetensors"
    save_file(t, str(edited), meta)
    assert cli("info", edited).code == 0  # header only: nothing to notice
    r = cli("info", edited, "--verify")
    assert r.code == 3 and "do not match its recorded fingerprint" in r.error_line and "Traceback" not in r.err


def test_sidecar_and_for(cli, files):
    d, f = files
    from cl_tool.checkpoint import load_checkpoint

    (i,) = _info(cli, f["a_imp"])
    assert i["kind"] == "sidecar" and i["method"] == "fisher" and i["options"] == {"fisher_labels": "empirical"}
    assert i["data"]["name"] == "A" and i["samples"] == 64 and len(i["tasks"]) == 1 and i["decay"] == 1.0
    assert i["belongs_to"] == {"fingerprint": load_checkpoint(f["a"]).fingerprint, "checkpoint": str(f["a"])}
    assert "for" not in i
    cases = {
        "a": (True, 0, "itself"),
        "b": (True, 1, "1 generation back"),
        "b50": (True, 2, "2 generations back"),
        "a0": (False, None, "records no ancestors"),
        "other": (False, None, "belongs to another checkpoint"),
    }
    for target, (usable, gen, phrase) in cases.items():
        (i,) = _info(cli, f["a_imp"], "--for", f[target])
        rel = i["for"]
        assert (rel["usable"], rel["generations"]) == (usable, gen), (target, rel)
        assert phrase in rel["reason"] and rel["checkpoint"] == str(f[target])
    (i,) = _info(cli, f["other_imp"], "--for", f["b"], "--verify")
    assert (
        i["for"]["usable"] is False
        and "recorded ancestors" in i["for"]["reason"]
        and "judged by" not in i["for"]["reason"]
    )
    assert i["values_checked"] is True
    r = cli("info", f["a_imp"], "--for", f["b50"])
    assert r.code == 0 and "for " + str(f["b50"]) + ": yes" in r.out.replace("\n", " ")


def test_mask(cli, files):
    d, f = files
    (i,) = _info(cli, f["mask"], "--sparsity", "--verify", "--for", f["b50"])
    from cl_tool.checkpoint import load_checkpoint

    assert i["kind"] == "mask" and i["by"] == "importance" and i["scope"] == "global" and i["requested_sparsity"] == 0.5
    assert i["pruned_from"]["fingerprint"] == load_checkpoint(f["b"]).fingerprint
    assert i["sparsity"]["tensors"]["net.1.weight"]["zeros"] == round(0.5 * 784 * 16) and i["values_checked"] is True
    assert i["for"]["usable"] is True and i["for"]["generations"] == 1


def test_resume_state(cli, files, demo_dir, tmp_path, monkeypatch):
    import cl_tool.training as training

    d, f = files
    real, calls = training.lr_at, []

    def lr_at(cfg, step, total):  # SIGTERM during step 2: train-next writes its resumable state and exits 143
        calls.append(step)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg, step, total)

    monkeypatch.setattr(training, "lr_at", lr_at)
    out = tmp_path / "r.safetensors"
    r = cli(
        "train-next",
        f["a"],
        "--data",
        f"R={demo_dir}::limit=64",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--checkpoint-every",
        "1",
        "-o",
        out,
    )
    assert r.code == 143, r.err
    state = tmp_path / "r.resume.safetensors"
    assert state.exists()
    from cl_tool.checkpoint import load_checkpoint

    (i,) = _info(cli, state, "--for", f["a"])
    assert i["kind"] == "resume" and i["input_fingerprint"] == load_checkpoint(f["a"]).fingerprint
    assert i["data"] == "R" and i["config"]["penalty"] == "stabilized" and i["position"]["global_step"] >= 1
    assert i["tensor_groups"]["model"] == 4 and i["for"]["usable"] is True
    (i,) = _info(cli, state, "--for", f["b"])
    assert i["for"]["usable"] is False and "exit 4" in i["for"]["reason"]
    r = cli("info", state)
    assert r.code == 0 and "resumable training state" in r.out


def test_timm_folder(cli, files):
    d, f = files
    (i,) = _info(cli, f["timm"], "--sparsity")
    assert i["kind"] == "timm-folder" and i["model"]["arch"] == "resnet18" and i["model"]["num_classes"] == 7
    assert i["model"]["input_shape"] == [3, 32, 32] and i["model"]["source"] == "timm"
    assert i["tensors"]["count"] == 3 and set(i["tensors"]["by_dtype"]) == {"float32", "float16"}
    assert i["tensors"]["by_dtype"]["float16"]["bytes"] == 8
    assert (
        i["sparsity"]["tensors"]["fc.bias"]["fraction"] == 1.0 and i["sparsity"]["tensors"]["fc.weight"]["zeros"] == 0
    )
    (i,) = _info(cli, f["timm"], "--verify")
    from cl_tool.checkpoint import load_checkpoint

    assert i["fingerprint"]["computed"] == load_checkpoint(f["timm"]).fingerprint
    (i,) = _info(cli, f["a_imp"], "--for", f["timm"])  # a timm folder records no fingerprint: computed from its tensors
    assert i["for"]["usable"] is False and load_checkpoint(f["timm"]).fingerprint in i["for"]["reason"]


def test_several_paths_json_is_one_list(cli, files):
    d, f = files
    infos = _info(cli, f["a"], f["a_imp"], f["mask"], f["timm"])
    assert [i["kind"] for i in infos] == ["checkpoint", "sidecar", "mask", "timm-folder"]


def test_for_needs_a_file_it_applies_to(cli, files):
    d, f = files
    r = cli("info", f["a"], "--for", f["b"])
    assert r.code == 2 and "--for" in r.error_line
    r = cli("info", f["a_imp"], "--for", f["a_imp"])
    assert r.code == 3 and "not a cl-tool checkpoint" in r.error_line


def _damaged(d, f, tmp_path):
    from safetensors.torch import save_file

    from cl_tool.safetensors_io import read_header

    out = {}
    raw = f["b"].read_bytes()
    out["truncated"] = tmp_path / "trunc.safetensors"
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    out["random"] = tmp_path / "random.safetensors"
    out["random"].write_bytes(os.urandom(4096))
    out["empty"] = tmp_path / "empty.safetensors"
    out["empty"].write_bytes(b"")
    out["missing"] = tmp_path / "missing.safetensors"
    import torch

    out["foreign"] = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(out["foreign"]))
    _, meta = read_header(f["b"])
    from safetensors.torch import load_file

    out["bad-history"] = tmp_path / "hist.safetensors"
    save_file(load_file(str(f["b"])), str(out["bad-history"]), {**meta, "cl_tool.history": "[{not json"})
    out["bad-model"] = tmp_path / "model.safetensors"
    save_file(load_file(str(f["b"])), str(out["bad-model"]), {**meta, "cl_tool.model": json.dumps({"arch": "mlp"})})
    _, smeta = read_header(f["a_imp"])
    out["bad-sidecar"] = tmp_path / "sc.importance.safetensors"
    save_file(
        load_file(str(f["a_imp"])), str(out["bad-sidecar"]), {k: v for k, v in smeta.items() if k != "fingerprint"}
    )
    out["folder"] = tmp_path / "not_a_model"
    out["folder"].mkdir()
    return out


def test_damaged_files_exit_3_with_one_sentence(cli, files, tmp_path):
    d, f = files
    for what, path in _damaged(d, f, tmp_path).items():
        r = cli("info", path)
        assert r.code == 3, (what, r.err)
        assert "Traceback" not in r.err and r.out == "", what
        assert r.err.strip().splitlines() == [r.error_line], (what, r.err)
        assert str(path) in r.error_line, (what, r.error_line)
        r = cli("info", f["a"], path, "--json")
        assert r.code == 3, what  # one JSON document: the error, no partial description
        assert json.loads(r.out)["error"] == {
            "code": 3,
            "class": "BadInputError",
            "message": r.error_line.removeprefix("Error: "),
        }, what


def test_header_only_info_imports_no_torch(files):
    d, f = files
    argv = ["info", *(str(f[k]) for k in ("b50", "a_imp", "mask", "timm")), "--for", str(f["b"]), "--json"]
    probe = (
        "import sys\nfrom cl_tool.cli import main\n"
        f"try:\n    main({argv!r})\n"
        "except SystemExit as exc:\n    print('CODE=' + str(exc.code), file=sys.stderr)\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'timm', 'datasets') if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "CODE=0" in proc.stderr, proc.stderr
    assert "HEAVY=\n" in proc.stderr, proc.stderr
    assert len(json.loads(proc.stdout)) == 4
