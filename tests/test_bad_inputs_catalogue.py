"""A catalogue of bad inputs for every command: one clear sentence, the documented exit code, no traceback,
no output file, inputs untouched.

Each case builds its broken input inside the test's folder, runs the command in-process and checks:
the exit code, a key phrase of the ``Error: ...`` line, no "Traceback" on stderr, and that the test folder
(inputs and would-be outputs) and the shared demo data are byte-identical before and after the run.
Kept tiny (MLP 784-64-10, a few samples) so the whole file runs in seconds on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import snapshot_dir

# --------------------------------------------------------------------------------------------------------------
# helpers


class Ctx:
    """The test's folder ``d`` with a copy ``ck`` of the small MLP, and builders for broken inputs."""

    def __init__(self, d: Path, ck: Path, demo: Path, cli, good_sidecar: Path):
        self.d, self.ck, self.demo, self.cli, self._good_sidecar = d, ck, demo, cli, good_sidecar
        self.out = d / "out.safetensors"

    @property
    def data(self) -> str:
        return f"{self.demo}::limit=16"

    def file(self, name: str, data: bytes) -> Path:
        p = self.d / name
        p.write_bytes(data)
        return p

    def tensors_and_meta(self, path: Path | None = None):
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = path or self.ck
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
        return load_file(str(path)), meta

    def ckpt_with(self, name: str, edit_tensors: Callable | None = None, edit_meta: Callable | None = None) -> Path:
        """A copy of the checkpoint with its tensors and/or metadata edited (keeping the cl-tool metadata otherwise)."""
        tensors, meta = self.tensors_and_meta()
        return self._write_edited(name, tensors, meta, edit_tensors, edit_meta)

    def _write_edited(
        self, name: str, tensors, meta, edit_tensors: Callable | None, edit_meta: Callable | None
    ) -> Path:
        """Apply the edits (an edit returning None keeps its input) and write a safetensors file ``name``."""
        from safetensors.torch import save_file

        if edit_tensors:
            new = edit_tensors(dict(tensors))
            tensors = tensors if new is None else new
        if edit_meta:
            new = edit_meta(dict(meta))
            meta = meta if new is None else new
        p = self.d / name
        save_file(tensors, str(p), metadata=meta)
        return p

    def model_meta(self, name: str, **changes) -> Path:
        def edit(meta):
            model = json.loads(meta["cl_tool.model"])
            model.update(changes)
            meta["cl_tool.model"] = json.dumps(model)
            return meta

        return self.ckpt_with(name, edit_meta=edit)

    def sidecar(self, name: str = "good.importance.safetensors") -> Path:
        """A valid magnitude sidecar of ``ck`` (computed once per module; ``ck`` is a copy of the same checkpoint)."""
        p = self.d / name
        shutil.copy(self._good_sidecar, p)
        return p

    def sidecar_with(self, name: str, edit_tensors: Callable | None = None, edit_meta: Callable | None = None) -> Path:
        good = self.sidecar(".tmp-good.importance.safetensors")
        tensors, meta = self.tensors_and_meta(good)
        good.unlink()
        return self._write_edited(name, tensors, meta, edit_tensors, edit_meta)

    def raw_safetensors(self, name: str, header: bytes, body: bytes = b"\0" * 16, length: int | None = None) -> Path:
        n = len(header) if length is None else length
        return self.file(name, struct.pack("<Q", n) + header + body)

    def dataset(self, name: str, ds) -> Path:
        import datasets

        datasets.disable_progress_bars()
        p = self.d / "data" / name
        ds.save_to_disk(str(p))
        return p

    def link(self, name: str, target: Path, hard: bool = False) -> Path:
        p = self.d / name
        (os.link if hard else os.symlink)(target, p)
        return p

    def fifo(self, name: str) -> Path:
        p = self.d / name
        os.mkfifo(p)
        return p

    def timm_folder(self, name: str, config) -> Path:
        """A timm-style folder: config.json (a dict, or raw text) + model.safetensors (never read when the config is refused)."""
        p = self.d / name
        p.mkdir()
        (p / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        shutil.copy(self.ck, p / "model.safetensors")
        return p

    def imagefolder(self, name: str, bad: bytes, bad_name: str = "broken.png") -> Path:
        """An imagefolder with two good PNGs per class and one file ``bad_name`` holding ``bad``."""
        from PIL import Image

        from cl_tool.demo import make_images

        images, _ = make_images(4, seed=3)
        root = self.d / "data" / name
        for i, img in enumerate(images):
            cls = root / f"{i % 2}"  # classes named as the model's ("0".."9")
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(cls / f"{i}.png")
        (root / "0" / bad_name).write_bytes(bad)
        return root

    def jsonl(self, name: str, n: int = 4) -> Path:
        p = self.d / name
        p.write_text("".join(json.dumps({"pixels": [0.5] * 784, "label": i % 10}) + "\n" for i in range(n)))
        return p

    def arrays(self, name: str, images, labels, column: str = "pixels") -> Path:
        import datasets

        return self.dataset(name, datasets.Dataset.from_dict({column: images, "label": labels}))


@pytest.fixture(scope="module")
def good_sidecar(small_mlp, tmp_path_factory):
    from cl_tool.cli import main

    p = tmp_path_factory.mktemp("sidecar") / "m.importance.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["-q", "importance", str(small_mlp), "--method", "magnitude", "-o", str(p)])
    assert exc.value.code == 0
    return p


@pytest.fixture
def ctx(tmp_path, small_mlp, demo_dir, cli, good_sidecar):
    d = tmp_path / "ws"
    d.mkdir()
    ck = d / "m.safetensors"
    shutil.copy(small_mlp, ck)
    return Ctx(d, ck, demo_dir, cli, good_sidecar)


def expect_failure(ctx: Ctx, argv, code: int, phrase: str):
    """Run ``argv``; assert exit code, phrase, no traceback, nothing written or changed."""
    before, before_demo = snapshot_dir(ctx.d), snapshot_dir(ctx.demo)
    r = ctx.cli(*argv)
    assert r.code == code, f"exit {r.code}, expected {code}\n{r.err}"
    assert r.error_line.startswith("Error: "), r.err
    assert phrase.lower() in r.error_line.lower(), f"{phrase!r} not in {r.error_line!r}"
    assert "Traceback" not in r.err, r.err
    after = snapshot_dir(ctx.d)
    assert after == before, f"files appeared or changed: {sorted(set(after) ^ set(before)) or 'contents changed'}"
    assert snapshot_dir(ctx.demo) == before_demo
    assert not any(p.name.startswith(".cl-tool-tmp-") for p in ctx.d.rglob("*"))
    return r


def _pickle_bytes() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"net.1.weight": torch.zeros(64, 784)}, buf)
    return buf.getvalue()


def _demo(n: int, **kw):
    from cl_tool.demo import make_dataset

    return make_dataset(n, **kw)


def _torch():
    import torch

    return torch


def _empty_parquet(c: Ctx) -> Path:
    p = c.d / "e.parquet"
    _demo(4).select([]).to_parquet(str(p))
    return p


def _flat(n: int, value: float = 0.0):
    return [[value] * n for _ in range(4)]


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _nan_weight(t):
    t = dict(t)
    w = t["net.1.weight"].clone()
    w[0, 0] = float("nan")
    t["net.1.weight"] = w
    return t


def _inf_bias(t):
    return {**t, "net.3.bias": t["net.3.bias"] - float("inf")}


T = "train-next"


def _tn(c: Ctx, *extra) -> list:
    """A quick train-next command line on the catalogue's checkpoint."""
    return [T, c.ck, "--data", c.data, "--device", "cpu", "--penalty", "none", *extra]


_TIMM_OK = {
    "architecture": "resnet18",
    "num_classes": 10,
    "pretrained_cfg": {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.5]},
}


# --------------------------------------------------------------------------------------------------------------
# the catalogue: (id, expected exit code, key phrase, build argv from Ctx)

P = "prune"
CASES: list[tuple[str, int, str, Callable[[Ctx], list]]] = [
    # ---- checkpoint files: missing, empty, a directory, not safetensors, damaged layouts ----
    (
        "ckpt-missing-importance",
        3,
        "does not exist",
        lambda c: ["importance", c.d / "nope.safetensors", "--method", "magnitude"],
    ),
    (
        "ckpt-missing-evaluate",
        3,
        "does not exist",
        lambda c: ["evaluate", c.d / "nope.safetensors", "--data", c.data, "--device", "cpu"],
    ),
    (
        "ckpt-missing-prune",
        3,
        "does not exist",
        lambda c: [P, c.d / "nope.safetensors", "--by", "magnitude", "--sparsity", "0.5", "-o", c.out],
    ),
    (
        "ckpt-empty-train-next",
        3,
        "is empty (0 bytes)",
        lambda c: ["train-next", c.file("e.safetensors", b""), "--data", c.data, "--device", "cpu", "-o", c.out],
    ),
    (
        "ckpt-empty-importance",
        3,
        "is empty (0 bytes)",
        lambda c: ["importance", c.file("e.safetensors", b""), "--method", "magnitude"],
    ),
    (
        "ckpt-is-a-directory",
        3,
        "not a timm model folder",
        lambda c: (
            (c.d / "folder.safetensors").mkdir()
            or [P, c.d / "folder.safetensors", "--by", "magnitude", "--sparsity", "0.5", "-o", c.out]
        ),
    ),
    (
        "ckpt-random-bytes-train-next",
        3,
        "not a safetensors file",
        lambda c: [
            "train-next",
            c.file("r.safetensors", os.urandom(4096)),
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-too-short",
        3,
        "too short",
        lambda c: ["importance", c.file("s.safetensors", b"\x01\x02\x03"), "--method", "magnitude"],
    ),
    (
        "ckpt-truncated-train-next",
        3,
        "truncated",
        lambda c: [
            "train-next",
            c.file("t.safetensors", c.ck.read_bytes()[:-100]),
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-header-length-past-end",
        3,
        "header says",
        lambda c: [
            P,
            c.raw_safetensors("h.safetensors", b'{"a": 1}', length=10_000),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-header-length-zero",
        3,
        "invalid header length 0",
        lambda c: [
            "evaluate",
            c.raw_safetensors("z.safetensors", b"{}", length=0),
            "--data",
            c.data,
            "--device",
            "cpu",
        ],
    ),
    (
        "ckpt-header-invalid-json",
        3,
        "not valid JSON",
        lambda c: ["importance", c.raw_safetensors("j.safetensors", b'{"a": [1, 2'), "--method", "magnitude"],
    ),
    (
        "ckpt-header-not-an-object",
        3,
        "not a JSON object",
        lambda c: [
            P,
            c.raw_safetensors("l.safetensors", b"[1, 2, 3]"),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-tensor-past-end",
        3,
        "extends past the end",
        lambda c: [
            P,
            c.raw_safetensors(
                "o.safetensors", json.dumps({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}).encode()
            ),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-tensor-unknown-dtype",
        3,
        "header entry of tensor 'w' is invalid",
        lambda c: [
            "evaluate",
            c.raw_safetensors(
                "u.safetensors", json.dumps({"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}).encode()
            ),
            "--data",
            c.data,
            "--device",
            "cpu",
        ],
    ),
    (
        "ckpt-metadata-not-strings",
        3,
        "malformed metadata",
        lambda c: [
            P,
            c.raw_safetensors("m.safetensors.bad", json.dumps({"__metadata__": {"a": 1}}).encode()),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-pt-pickle-renamed",
        3,
        "not a safetensors file",
        lambda c: [
            "train-next",
            c.file("pickle.safetensors", _pickle_bytes()),
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
        ],
    ),
    # ---- checkpoint contents: tensors that do not match the metadata, bad metadata ----
    (
        "ckpt-wrong-tensor-shape",
        4,
        "has shape [3, 3]",
        lambda c: [
            "evaluate",
            c.ckpt_with("shape.safetensors", lambda t: {**t, "net.1.weight": _torch().zeros(3, 3)}),
            "--data",
            c.data,
            "--device",
            "cpu",
        ],
    ),
    (
        "ckpt-wrong-tensor-dtype",
        4,
        "dtype torch.int64",
        lambda c: [
            P,
            c.ckpt_with("dtype.safetensors", lambda t: {**t, "net.1.weight": t["net.1.weight"].long()}),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-missing-tensor",
        4,
        "lacks tensor 'net.1.bias'",
        lambda c: [
            "importance",
            c.ckpt_with("miss.safetensors", lambda t: {k: v for k, v in t.items() if k != "net.1.bias"}),
            "--method",
            "magnitude",
        ],
    ),
    (
        "ckpt-extra-tensor",
        4,
        "does not have",
        lambda c: [
            "train-next",
            c.ckpt_with("extra.safetensors", lambda t: {**t, "head.weight": _torch().zeros(2)}),
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-unknown-architecture",
        3,
        "Unknown architecture 'no_such_net_xyz'",
        lambda c: [
            "evaluate",
            c.model_meta("arch.safetensors", arch="no_such_net_xyz"),
            "--data",
            c.data,
            "--device",
            "cpu",
        ],
    ),
    (
        "ckpt-metadata-missing",
        3,
        "no cl-tool model metadata",
        lambda c: [
            P,
            c.ckpt_with("nometa.safetensors", edit_meta=lambda m: {}),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-model-metadata-not-json",
        3,
        "not JSON",
        lambda c: [
            "importance",
            c.ckpt_with("mj.safetensors", edit_meta=lambda m: {**m, "cl_tool.model": "{arch: mlp"}),
            "--method",
            "magnitude",
        ],
    ),
    (
        "ckpt-model-metadata-wrong-mean",
        3,
        "invalid normalisation",
        lambda c: [
            "evaluate",
            c.model_meta("mean.safetensors", mean=[0.1, 0.2, 0.3]),
            "--data",
            c.data,
            "--device",
            "cpu",
        ],
    ),
    (
        "ckpt-model-metadata-zero-std",
        3,
        "invalid normalisation",
        lambda c: ["evaluate", c.model_meta("std.safetensors", std=[0.0]), "--data", c.data, "--device", "cpu"],
    ),
    (
        "ckpt-model-metadata-bad-kwargs",
        3,
        "cannot be built",
        lambda c: [
            P,
            c.model_meta("kw.safetensors", kwargs={"sizes": "784,abc,10"}),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "ckpt-is-a-sidecar",
        3,
        "is an importance sidecar, not a checkpoint",
        lambda c: ["evaluate", c.sidecar(), "--data", c.data, "--device", "cpu"],
    ),
    # ---- importance sidecars ----
    (
        "sidecar-of-another-checkpoint-prune",
        4,
        "belongs to another checkpoint",
        lambda c: [
            P,
            c.ck,
            "--by",
            "importance",
            "--importance",
            c.sidecar_with("o.importance.safetensors", edit_meta=lambda m: {**m, "fingerprint": "0" * 16}),
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "sidecar-nan-train-next",
        3,
        "contains NaN or Inf",
        lambda c: [
            "train-next",
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--importance",
            c.sidecar_with(
                "nan.importance.safetensors",
                lambda t: {**t, "net.1.weight": t["net.1.weight"].index_fill(0, _torch().tensor([0]), float("nan"))},
            ),
        ],
    ),
    (
        "sidecar-inf-prune",
        3,
        "contains NaN or Inf",
        lambda c: [
            P,
            c.ck,
            "--by",
            "importance",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
            "--importance",
            c.sidecar_with("inf.importance.safetensors", lambda t: {**t, "net.3.bias": t["net.3.bias"] + float("inf")}),
        ],
    ),
    (
        "sidecar-negative-accumulate",
        3,
        "negative values",
        lambda c: [
            "importance",
            c.ck,
            "--method",
            "magnitude",
            "-o",
            c.d / "new.importance.safetensors",
            "--accumulate",
            c.sidecar_with("neg.importance.safetensors", lambda t: {**t, "net.1.bias": -t["net.1.bias"] - 1}),
        ],
    ),
    (
        "sidecar-missing-fingerprint",
        3,
        "lacks the metadata key 'fingerprint'",
        lambda c: [
            "train-next",
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--importance",
            c.sidecar_with(
                "nofp.importance.safetensors", edit_meta=lambda m: {k: v for k, v in m.items() if k != "fingerprint"}
            ),
        ],
    ),
    (
        "sidecar-tasks-malformed",
        3,
        "malformed metadata",
        lambda c: [
            "importance",
            c.ck,
            "--method",
            "magnitude",
            "-o",
            c.d / "new.importance.safetensors",
            "--accumulate",
            c.sidecar_with("tasks.importance.safetensors", edit_meta=lambda m: {**m, "tasks": '{"not": "a list"}'}),
        ],
    ),
    (
        "sidecar-wrong-shape",
        4,
        "has shape [2, 2]",
        lambda c: [
            "train-next",
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--importance",
            c.sidecar_with("shape.importance.safetensors", lambda t: {**t, "net.1.weight": _torch().ones(2, 2)}),
        ],
    ),
    (
        "sidecar-is-a-checkpoint",
        3,
        "is a checkpoint, not an importance sidecar",
        lambda c: [P, c.ck, "--by", "importance", "--importance", c.ck, "--sparsity", "0.5", "-o", c.out],
    ),
    (
        "sidecar-importance-file-missing",
        3,
        "does not exist",
        lambda c: [
            "train-next",
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--importance",
            c.d / "none.importance.safetensors",
        ],
    ),
    (
        "mask-is-not-a-mask",
        3,
        "not a cl-tool mask file",
        lambda c: [
            "train-next",
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--penalty",
            "none",
            "--mask",
            c.sidecar(),
        ],
    ),
    # ---- datasets ----
    (
        "data-path-missing",
        3,
        "does not exist",
        lambda c: [
            "importance",
            c.ck,
            "--data",
            c.d / "no_such_dataset",
            "--device",
            "cpu",
            "-o",
            c.d / "i.safetensors",
        ],
    ),
    (
        "data-no-image-column",
        3,
        "no image column",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.dataset("noimg", _demo(8).remove_columns("image"))],
    ),
    (
        "data-no-label-column-train-next",
        3,
        "no label column",
        lambda c: [
            "train-next",
            c.ck,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--data",
            c.dataset("nolab", _demo(8).remove_columns("label")),
        ],
    ),
    (
        "data-label-too-large-importance",
        4,
        "outside the model's 10 classes",
        lambda c: [
            "importance",
            c.ck,
            "--device",
            "cpu",
            "-o",
            c.d / "i.safetensors",
            "--data",
            c.arrays("big", _flat(784), [1, 2, 3, 12]),
        ],
    ),
    (
        "data-label-negative-train-next",
        4,
        "negative label -1",
        lambda c: [
            "train-next",
            c.ck,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--data",
            c.arrays("neg", _flat(784), [0, -1, 2, 3]),
        ],
    ),
    (
        "data-label-too-large-evaluate",
        4,
        "outside the model's 10 classes",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.dataset("fifteen", _demo(30, classes=15, seed=2))],
    ),
    (
        "data-label-not-integer",
        3,
        "not an integer class id",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.arrays("flt", _flat(784), [0.0, 1.5, 2.0, 3.0])],
    ),
    (
        "data-empty-saved-dataset",
        3,
        "empty dataset",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.dataset("empty", _demo(4).select([]))],
    ),
    (
        "data-empty-parquet",
        3,
        "has no samples",
        lambda c: ["importance", c.ck, "--device", "cpu", "-o", c.d / "i.safetensors", "--data", _empty_parquet(c)],
    ),
    (
        "data-empty-slice",
        3,
        "has no samples in the chosen split/slice",
        lambda c: [
            P,
            c.ck,
            "--by",
            "signal",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
            "--score-data",
            f"{c.demo}::split=train[5:5]",
        ],
    ),
    (
        "data-flat-array-wrong-length",
        3,
        "has 100 values, but the model needs 1x28x28",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.arrays("short", _flat(100), [0, 1, 2, 3])],
    ),
    (
        "data-nan-pixels",
        3,
        "NaN or infinite pixel values",
        lambda c: [
            "train-next",
            c.ck,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--data",
            c.arrays("nan", [[0.5] * 783 + [float("nan")]] * 4, [0, 1, 2, 3]),
        ],
    ),
    (
        "data-text-in-image-column",
        3,
        "not a regular array of numbers",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.arrays("txt", ["abc"] * 4, [0, 1, 2, 3])],
    ),
    (
        "data-unsupported-file-type",
        3,
        "unsupported file type '.txt'",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.file("d.txt", b"1,2,3\n")],
    ),
    (
        "data-corrupt-parquet",
        3,
        "could not be read as a dataset",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.file("d.parquet", b"not parquet" * 10)],
    ),
    (
        "data-unknown-split",
        2,
        "--split nosuch is not in",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", f"{c.demo}::split=nosuch"],
    ),
    (
        "data-image-column-missing",
        3,
        "--image-column 'pix' is not a column",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.data, "--image-column", "pix"],
    ),
    (
        "data-unknown-inline-key",
        2,
        "unknown per-task key 'colour'",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", f"{c.demo}::colour=red"],
    ),
    # ---- outputs ----
    (
        "out-equals-input-prune",
        6,
        "is also an input",
        lambda c: [P, c.ck, "--by", "magnitude", "--sparsity", "0.5", "-o", c.ck, "--force"],
    ),
    (
        "out-equals-input-train-next",
        6,
        "is also an input",
        lambda c: ["train-next", c.ck, "--data", c.data, "--device", "cpu", "-o", c.ck, "--force"],
    ),
    (
        "out-equals-accumulate-importance",
        6,
        "is also an input",
        lambda c: [
            "importance",
            c.ck,
            "--method",
            "magnitude",
            "--accumulate",
            c.sidecar("a.importance.safetensors"),
            "-o",
            c.d / "a.importance.safetensors",
            "--force",
        ],
    ),
    (
        "out-exists-init",
        6,
        "already exists",
        lambda c: ["init", "--arch", "mlp", "-o", c.file("x.safetensors", b"precious")],
    ),
    (
        "out-exists-importance-default",
        6,
        "already exists",
        lambda c: c.file("m.importance.safetensors", b"precious") and ["importance", c.ck, "--method", "magnitude"],
    ),
    (
        "out-exists-evaluate-csv",
        6,
        "already exists",
        lambda c: ["evaluate", c.ck, "--data", c.data, "--device", "cpu", "--csv", c.file("r.csv", b"precious")],
    ),
    ("out-exists-demo-data", 6, "already exists", lambda c: (c.d / "demo").mkdir() or ["demo-data", c.d / "demo"]),
    (
        "out-is-a-directory",
        6,
        "is a directory",
        lambda c: (c.d / "outdir").mkdir() or ["init", "--arch", "mlp", "-o", c.d / "outdir"],
    ),
    (
        "out-folder-missing",
        6,
        "does not exist",
        lambda c: [P, c.ck, "--by", "magnitude", "--sparsity", "0.5", "-o", c.d / "a" / "b" / "p.safetensors"],
    ),
    (
        "out-same-as-mask-out",
        6,
        "both name",
        lambda c: [P, c.ck, "--by", "magnitude", "--sparsity", "0.5", "-o", c.out, "--mask-out", c.out],
    ),
    (
        "out-csv-same-as-plot",
        6,
        "both name",
        lambda c: [
            "evaluate",
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "--csv",
            c.d / "r.png",
            "--plot",
            c.d / "r.png",
        ],
    ),
    # ---- option values ----
    (
        "opt-sparsity-negative",
        2,
        "--sparsity must be in [0, 1)",
        lambda c: [P, c.ck, "--by", "magnitude", "--sparsity", "-0.1", "-o", c.out],
    ),
    (
        "opt-sparsity-one",
        2,
        "--sparsity must be in [0, 1)",
        lambda c: [P, c.ck, "--by", "magnitude", "--sparsity", "1", "-o", c.out],
    ),
    (
        "opt-sparsity-nan",
        2,
        "--sparsity must be a finite number",
        lambda c: [P, c.ck, "--by", "magnitude", "--sparsity", "nan", "-o", c.out],
    ),
    ("opt-sparsity-text", 2, "--sparsity", lambda c: [P, c.ck, "--by", "magnitude", "--sparsity", "lots", "-o", c.out]),
    (
        "opt-sweep-value-one",
        2,
        "--sweep values must be in [0, 1)",
        lambda c: [P, c.ck, "--by", "magnitude", "--sweep", "0.5,1.0", "--data", c.data],
    ),
    (
        "opt-lambda-negative",
        2,
        "--lambda must be a non-negative number",
        lambda c: ["train-next", c.ck, "--data", c.data, "--device", "cpu", "--lambda", "-1", "-o", c.out],
    ),
    (
        "opt-lambda-nan",
        2,
        "--lambda must be a finite number",
        lambda c: ["train-next", c.ck, "--data", c.data, "--device", "cpu", "--lambda", "nan", "-o", c.out],
    ),
    (
        "opt-lr-zero",
        2,
        "--lr must be a positive number",
        lambda c: ["train-next", c.ck, "--data", c.data, "--device", "cpu", "--lr", "0", "-o", c.out],
    ),
    (
        "opt-lr-negative",
        2,
        "--lr must be a positive number",
        lambda c: ["train-next", c.ck, "--data", c.data, "--device", "cpu", "--lr", "-0.1", "-o", c.out],
    ),
    (
        "opt-batch-size-zero-train-next",
        2,
        "--batch-size must be at least 1",
        lambda c: ["train-next", c.ck, "--data", c.data, "--device", "cpu", "--batch-size", "0", "-o", c.out],
    ),
    (
        "opt-batch-size-zero-importance",
        2,
        "--batch-size must be at least 1",
        lambda c: ["importance", c.ck, "--data", c.data, "--device", "cpu", "--batch-size", "0"],
    ),
    (
        "opt-batch-size-zero-evaluate",
        2,
        "--batch-size must be at least 1",
        lambda c: ["evaluate", c.ck, "--data", c.data, "--batch-size", "0"],
    ),
    (
        "opt-limit-zero",
        2,
        "--limit must be at least 1",
        lambda c: ["evaluate", c.ck, "--data", c.demo, "--limit", "0", "--device", "cpu"],
    ),
    (
        "opt-unknown-device-train-next",
        2,
        "--device tpu is not a device name",
        lambda c: ["train-next", c.ck, "--data", c.data, "--device", "tpu", "-o", c.out],
    ),
    (
        "opt-unknown-device-evaluate",
        2,
        "is not a device name",
        lambda c: ["evaluate", c.ck, "--data", c.data, "--device", "gpu0"],
    ),
    (
        "opt-unknown-method",
        2,
        "--method random is unknown",
        lambda c: ["importance", c.ck, "--data", c.data, "--method", "random"],
    ),
    ("opt-method-si", 2, "--si-out", lambda c: ["importance", c.ck, "--data", c.data, "--method", "si"]),
    (
        "opt-unknown-fisher-labels",
        2,
        "--fisher-labels guess is unknown",
        lambda c: ["importance", c.ck, "--data", c.data, "--fisher-labels", "guess"],
    ),
    (
        "opt-decay-without-accumulate",
        2,
        "--decay only applies with --accumulate",
        lambda c: ["importance", c.ck, "--method", "magnitude", "--decay", "0.5"],
    ),
    (
        "opt-unknown-by",
        2,
        "--by random is unknown",
        lambda c: [P, c.ck, "--by", "random", "--sparsity", "0.5", "-o", c.out],
    ),
    (
        "opt-unknown-scope",
        2,
        "--scope tensor is unknown",
        lambda c: [P, c.ck, "--by", "magnitude", "--scope", "tensor", "--sparsity", "0.5", "-o", c.out],
    ),
    (
        "opt-unknown-penalty",
        2,
        "--penalty l2 is unknown",
        lambda c: ["train-next", c.ck, "--data", c.data, "--penalty", "l2", "-o", c.out],
    ),
    (
        "opt-unknown-optimizer",
        2,
        "--optimizer lion is unknown",
        lambda c: ["train-next", c.ck, "--data", c.data, "--optimizer", "lion", "-o", c.out],
    ),
    (
        "opt-fail-under-acc-above-one",
        2,
        "--fail-under-acc must be in [0, 1]",
        lambda c: ["evaluate", c.ck, "--data", c.data, "--device", "cpu", "--fail-under-acc", "2"],
    ),
    # ---- contradicting options ----
    (
        "conflict-penalty-none-importance",
        2,
        "contradict",
        lambda c: ["train-next", c.ck, "--data", c.data, "--penalty", "none", "--importance", c.sidecar(), "-o", c.out],
    ),
    (
        "conflict-penalty-none-lambda",
        2,
        "contradict",
        lambda c: ["train-next", c.ck, "--data", c.data, "--penalty", "none", "--lambda", "5", "-o", c.out],
    ),
    (
        "conflict-sweep-with-output",
        2,
        "--sweep evaluates without writing",
        lambda c: [P, c.ck, "--by", "magnitude", "--sweep", "0.5,0.9", "--data", c.data, "-o", c.out],
    ),
    (
        "conflict-sweep-with-sparsity",
        2,
        "contradict",
        lambda c: [P, c.ck, "--by", "magnitude", "--sweep", "0.5", "--sparsity", "0.5", "--data", c.data],
    ),
    (
        "conflict-nesterov-without-momentum",
        2,
        "--nesterov needs --momentum > 0",
        lambda c: ["train-next", c.ck, "--data", c.data, "--optimizer", "sgd", "--nesterov", "-o", c.out],
    ),
    # ---- config files ----
    (
        "config-unknown-key-prune",
        2,
        "unknown key 'sparsityy'",
        lambda c: [P, c.ck, "--by", "magnitude", "-o", c.out, "--config", c.file("c.toml", b"sparsityy = 0.5\n")],
    ),
    (
        "config-wrong-type-evaluate",
        2,
        "--batch-size",
        lambda c: ["evaluate", c.ck, "--data", c.data, "--config", c.file("c.toml", b'batch-size = "big"\n')],
    ),
    (
        "config-table-value-importance",
        2,
        "must be a value, not a table",
        lambda c: [
            "importance",
            c.ck,
            "--config",
            c.file("c.toml", b"[importance]\n[importance.method]\nname = 'fisher'\n"),
        ],
    ),
    (
        "config-invalid-toml",
        2,
        "is not valid TOML/YAML",
        lambda c: ["evaluate", c.ck, "--data", c.data, "--config", c.file("c.toml", b"batch-size = = 3\n")],
    ),
    (
        "config-missing-file",
        2,
        "does not exist",
        lambda c: [P, c.ck, "--by", "magnitude", "-o", c.out, "--config", c.d / "none.toml"],
    ),
    # ---- init ----
    (
        "init-unknown-arch",
        2,
        "--arch 'no_such_net_xyz' is unknown",
        lambda c: ["init", "--arch", "no_such_net_xyz", "-o", c.out],
    ),
    (
        "init-bad-input-shape",
        2,
        "is not of the form CxHxW",
        lambda c: ["init", "--arch", "mlp", "--input-shape", "1x28", "-o", c.out],
    ),
    (
        "init-non-numeric-sizes",
        2,
        "Invalid --arch-arg for mlp",
        lambda c: ["init", "--arch", "mlp", "--arch-arg", "sizes=784,abc,10", "-o", c.out],
    ),
    (
        "init-negative-width",
        2,
        "positive integers",
        lambda c: ["init", "--arch", "cnn", "--arch-arg", "widths=-1,2,3", "-o", c.out],
    ),
    (
        "init-absurd-input-shape",
        2,
        "values per sample",
        lambda c: ["init", "--arch", "cnn", "--input-shape", "1x100000x100000", "-o", c.out],
    ),
    (
        "init-arch-arg-not-key-value",
        2,
        "must look like key=value",
        lambda c: ["init", "--arch", "mlp", "--arch-arg", "sizes", "-o", c.out],
    ),
    ("init-std-nan", 2, "must be finite numbers", lambda c: ["init", "--arch", "mlp", "--std", "nan", "-o", c.out]),
    (
        "init-num-classes-zero",
        2,
        "--num-classes must be at least 1",
        lambda c: ["init", "--arch", "mlp", "--num-classes", "0", "-o", c.out],
    ),
    (
        "init-shape-disagrees-with-sizes",
        2,
        "make them agree",
        lambda c: ["init", "--arch", "mlp", "--input-shape", "3x28x28", "-o", c.out],
    ),
    # ==== issue 11, class 1: every file a command writes is an output, checked before any work ====
    (
        "role-output-is-auto-sidecar",
        6,
        "is also an input",
        lambda c: (
            c.sidecar("m.importance.safetensors")
            and [T, c.ck, "--data", c.data, "--device", "cpu", "-o", c.d / "m.importance.safetensors", "--force"]
        ),
    ),
    (
        "role-log-json-is-checkpoint",
        6,
        "is also an input",
        lambda c: _tn(c, "-o", c.out, "--log-json", c.ck, "--force"),
    ),
    (
        "role-log-json-is-data-file",
        6,
        "is also an input",
        lambda c: [
            T,
            c.ck,
            "--data",
            c.jsonl("d.jsonl"),
            "--device",
            "cpu",
            "-o",
            c.out,
            "--log-json",
            c.d / "d.jsonl",
            "--force",
        ],
    ),
    (
        "role-si-out-is-importance",
        6,
        "is also an input",
        lambda c: [
            T,
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "--importance",
            c.sidecar(),
            "-o",
            c.out,
            "--si-out",
            c.d / "good.importance.safetensors",
            "--force",
        ],
    ),
    (
        "role-state-file-is-checkpoint",
        6,
        "is also an input",
        lambda c: _tn(c, "-o", c.out, "--checkpoint-every", "2", "--state-file", c.ck),
    ),
    (
        "role-state-file-is-mask",
        6,
        "is also an input",
        lambda c: _tn(
            c,
            "-o",
            c.out,
            "--mask",
            c.sidecar("mask.safetensors"),
            "--resume",
            "--state-file",
            c.d / "mask.safetensors",
        ),
    ),
    (
        "role-output-is-eval-data-file",
        6,
        "is also an input",
        lambda c: _tn(c, "--eval-data", c.jsonl("e.jsonl"), "-o", c.d / "e.jsonl", "--force"),
    ),
    (
        "role-output-is-config",
        6,
        "is also an input",
        lambda c: _tn(c, "--config", c.file("c.toml", b"epochs = 1\n"), "-o", c.d / "c.toml", "--force"),
    ),
    (
        "role-output-symlink-to-checkpoint",
        6,
        "is also an input",
        lambda c: _tn(c, "-o", c.link("alias.safetensors", c.ck), "--force"),
    ),
    (
        "role-output-hardlink-to-checkpoint",
        6,
        "is also an input",
        lambda c: [
            P,
            c.ck,
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.link("hard.safetensors", c.ck, hard=True),
            "--force",
        ],
    ),
    (
        "role-output-hardlink-into-data-folder",
        6,
        "hard link to a file inside",
        lambda c: (
            c.imagefolder("imgs", _png_bytes(), "extra.png")
            and [
                "evaluate",
                c.ck,
                "--device",
                "cpu",
                "--data",
                c.d / "data" / "imgs",
                "--csv",
                c.link("r.csv", c.d / "data" / "imgs" / "0" / "0.png", hard=True),
                "--force",
            ]
        ),
    ),
    (
        "role-output-inside-data-folder",
        6,
        "lies inside",
        lambda c: (
            c.imagefolder("imgs", _png_bytes(), "extra.png")
            and [
                "evaluate",
                c.ck,
                "--device",
                "cpu",
                "--data",
                c.d / "data" / "imgs",
                "--plot",
                c.d / "data" / "imgs" / "0" / "r.png",
            ]
        ),
    ),
    (
        "role-evaluate-csv-is-data-file",
        6,
        "is also an input",
        lambda c: [
            "evaluate",
            c.ck,
            "--device",
            "cpu",
            "--data",
            c.jsonl("d.jsonl"),
            "--csv",
            c.d / "d.jsonl",
            "--force",
        ],
    ),
    (
        "role-evaluate-csv-is-second-checkpoint",
        6,
        "is also an input",
        lambda c: [
            "evaluate",
            c.ck,
            c.sidecar("m2.safetensors") and c.ck,
            "--device",
            "cpu",
            "--data",
            c.data,
            "--csv",
            c.ck,
            "--force",
        ],
    ),
    (
        "role-importance-output-is-data-file",
        6,
        "is also an input",
        lambda c: [
            "importance",
            c.ck,
            "--device",
            "cpu",
            "--data",
            c.jsonl("d.jsonl"),
            "-o",
            c.d / "d.jsonl",
            "--force",
        ],
    ),
    (
        "role-prune-mask-out-is-auto-sidecar",
        6,
        "is also an input",
        lambda c: (
            c.sidecar("m.importance.safetensors")
            and [
                P,
                c.ck,
                "--by",
                "importance",
                "--sparsity",
                "0.5",
                "-o",
                c.out,
                "--mask-out",
                c.d / "m.importance.safetensors",
                "--force",
            ]
        ),
    ),
    (
        "role-prune-plot-is-score-data",
        6,
        "is also an input",
        lambda c: [
            P,
            c.ck,
            "--by",
            "magnitude",
            "--sweep",
            "0.5",
            "--data",
            c.data,
            "--score-data",
            c.jsonl("s.jsonl"),
            "--plot",
            c.d / "s.jsonl",
            "--force",
        ],
    ),
    (
        "role-output-inside-timm-folder",
        6,
        "lies inside",
        lambda c: [
            T,
            c.timm_folder("tf", _TIMM_OK),
            "--data",
            c.data,
            "--device",
            "cpu",
            "-o",
            c.d / "tf" / "out.safetensors",
        ],
    ),
    (
        "role-init-output-is-config",
        6,
        "is also an input",
        lambda c: [
            "init",
            "--arch",
            "mlp",
            "--config",
            c.file("c.toml", b"seed = 1\n"),
            "-o",
            c.d / "c.toml",
            "--force",
        ],
    ),
    ("role-two-outputs-log-and-output", 6, "both name", lambda c: _tn(c, "-o", c.out, "--log-json", c.out)),
    (
        "role-two-outputs-si-and-state",
        6,
        "both name",
        lambda c: _tn(
            c,
            "-o",
            c.out,
            "--si-out",
            c.d / "s.safetensors",
            "--checkpoint-every",
            "2",
            "--state-file",
            c.d / "s.safetensors",
        ),
    ),
    (
        "role-two-outputs-symlinked",
        6,
        "both name",
        lambda c: (
            c.file("real.csv", b"old")
            and [
                "evaluate",
                c.ck,
                "--device",
                "cpu",
                "--data",
                c.data,
                "--csv",
                c.d / "real.csv",
                "--plot",
                c.link("alias.png", c.d / "real.csv"),
                "--force",
            ]
        ),
    ),
    (
        "role-log-json-folder-missing",
        6,
        "does not exist",
        lambda c: _tn(c, "-o", c.out, "--log-json", c.d / "nodir" / "log.jsonl"),
    ),
    (
        "role-si-out-folder-missing",
        6,
        "does not exist",
        lambda c: _tn(c, "-o", c.out, "--si-out", c.d / "nodir" / "si.safetensors"),
    ),
    (
        "role-log-json-exists",
        6,
        "already exists",
        lambda c: _tn(c, "-o", c.out, "--log-json", c.file("log.jsonl", b"{}\n")),
    ),
    (
        "role-resume-without-state-existing-output",
        6,
        "already exists",
        lambda c: _tn(c, "-o", c.file("done.safetensors", b"finished"), "--resume"),
    ),
    (
        "role-output-is-a-fifo",
        6,
        "is not a regular file",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.data, "--csv", c.fifo("p.csv"), "--force"],
    ),
    # ==== class 3: no non-finite or overflowing number gets in ====
    ("num-lr-inf", 2, "--lr must be a finite number", lambda c: _tn(c, "-o", c.out, "--lr", "inf")),
    ("num-lr-overflows-float32", 2, "--lr must be a finite number", lambda c: _tn(c, "-o", c.out, "--lr", "1e39")),
    ("num-lr-overflows-float64", 2, "--lr must be a finite number", lambda c: _tn(c, "-o", c.out, "--lr", "1e400")),
    (
        "num-momentum-nan",
        2,
        "--momentum must be a finite number",
        lambda c: _tn(c, "-o", c.out, "--optimizer", "sgd", "--momentum", "nan"),
    ),
    (
        "num-weight-decay-minus-inf",
        2,
        "--weight-decay must be a finite number",
        lambda c: _tn(c, "-o", c.out, "--weight-decay", "-inf"),
    ),
    (
        "num-lambda-inf",
        2,
        "--lambda must be a finite number",
        lambda c: [
            T,
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "--importance",
            c.sidecar(),
            "--lambda",
            "inf",
            "-o",
            c.out,
        ],
    ),
    (
        "num-lambda-overflows-with-importance",
        2,
        "overflows float32",
        lambda c: [
            T,
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "--lambda",
            "3e38",
            "-o",
            c.out,
            "--importance",
            c.sidecar_with("big.importance.safetensors", lambda t: {k: v * 100 + 1 for k, v in t.items()}),
        ],
    ),
    (
        "num-grad-clip-nan",
        2,
        "--grad-clip must be a finite number",
        lambda c: _tn(c, "-o", c.out, "--grad-clip", "nan"),
    ),
    (
        "num-si-xi-inf",
        2,
        "--si-xi must be a finite number",
        lambda c: _tn(c, "-o", c.out, "--si-out", c.d / "si.safetensors", "--si-xi", "inf"),
    ),
    (
        "num-rotate-inf",
        2,
        "--rotate must be a finite number",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.data, "--rotate", "inf"],
    ),
    (
        "num-rotate-inline-nan",
        2,
        "rotate must be a finite number",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", f"{c.data},rotate=nan"],
    ),
    (
        "num-decay-nan",
        2,
        "--decay must be a finite number",
        lambda c: [
            "importance",
            c.ck,
            "--method",
            "magnitude",
            "--accumulate",
            c.sidecar(),
            "--decay",
            "nan",
            "-o",
            c.d / "i.safetensors",
        ],
    ),
    (
        "num-sparsity-inf",
        2,
        "--sparsity must be a finite number",
        lambda c: [P, c.ck, "--by", "magnitude", "--sparsity", "inf", "-o", c.out],
    ),
    (
        "num-gate-nan",
        2,
        "--fail-under-acc must be a finite number",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.data, "--fail-under-acc", "nan"],
    ),
    (
        "num-gate-inf",
        2,
        "--fail-over-forgetting must be a finite number",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.data, "--fail-over-forgetting", "inf"],
    ),
    ("num-mean-nan", 2, "must be finite numbers", lambda c: ["init", "--arch", "mlp", "--mean", "nan", "-o", c.out]),
    (
        "num-std-zero",
        2,
        "--std values must be positive",
        lambda c: ["init", "--arch", "mlp", "--std", "0", "-o", c.out],
    ),
    ("num-seed-huge", 2, "--seed must be in [0, 4294967295]", lambda c: _tn(c, "-o", c.out, "--seed", str(2**70))),
    (
        "num-seed-negative",
        2,
        "--seed must be in [0, 4294967295]",
        lambda c: ["init", "--arch", "mlp", "--seed", "-1", "-o", c.out],
    ),
    (
        "num-permute-huge",
        2,
        "--permute must be an integer from",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.data, "--permute", str(2**64)],
    ),
    (
        "num-permute-inline-negative",
        2,
        "permute must be a non-negative number",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", f"{c.data},permute=-3"],
    ),
    ("num-epochs-huge", 2, "--epochs must be an integer", lambda c: _tn(c, "-o", c.out, "--epochs", str(2**64))),
    (
        "num-batch-size-huge",
        2,
        "--batch-size must be an integer",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.data, "--batch-size", str(2**63)],
    ),
    (
        "num-samples-huge",
        2,
        "--samples must be an integer",
        lambda c: ["importance", c.ck, "--device", "cpu", "--data", c.data, "--samples", str(2**70)],
    ),
    (
        "num-config-value-nan",
        2,
        "--lr must be a finite number",
        lambda c: _tn(c, "-o", c.out, "--config", c.file("c.toml", b"lr = nan\n")),
    ),
    (
        "num-config-value-inf",
        2,
        "--lambda must be a finite number",
        lambda c: [
            T,
            c.ck,
            "--data",
            c.data,
            "--device",
            "cpu",
            "--importance",
            c.sidecar(),
            "-o",
            c.out,
            "--config",
            c.file("c.toml", b"lambda = inf\n"),
        ],
    ),
    # ---- non-finite checkpoints are refused by every reading command ----
    (
        "nonfinite-weights-evaluate",
        3,
        "NaN or infinite values in 'net.1.weight'",
        lambda c: ["evaluate", c.ckpt_with("nan.safetensors", _nan_weight), "--device", "cpu", "--data", c.data],
    ),
    (
        "nonfinite-weights-importance",
        3,
        "NaN or infinite values",
        lambda c: ["importance", c.ckpt_with("nan.safetensors", _nan_weight), "--method", "magnitude"],
    ),
    (
        "nonfinite-weights-prune",
        3,
        "NaN or infinite values",
        lambda c: [P, c.ckpt_with("inf.safetensors", _inf_bias), "--by", "magnitude", "--sparsity", "0.5", "-o", c.out],
    ),
    (
        "nonfinite-weights-train-next",
        3,
        "NaN or infinite values",
        lambda c: [T, c.ckpt_with("nan.safetensors", _nan_weight), "--data", c.data, "--device", "cpu", "-o", c.out],
    ),
    (
        "norm-metadata-negative-std",
        3,
        "invalid normalisation",
        lambda c: ["evaluate", c.model_meta("std.safetensors", std=[-1.0]), "--device", "cpu", "--data", c.data],
    ),
    (
        "norm-metadata-mean-inf",
        3,
        "invalid normalisation",
        lambda c: [
            "evaluate",
            c.ckpt_with(
                "mean.safetensors",
                edit_meta=lambda m: {
                    **m,
                    "cl_tool.model": m["cl_tool.model"].replace('"mean": [0.0]', '"mean": [Infinity]'),
                },
            ),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "norm-timm-config-std-zero",
        3,
        "invalid normalisation",
        lambda c: [
            "evaluate",
            c.timm_folder(
                "tf", {**_TIMM_OK, "pretrained_cfg": {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.0]}}
            ),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    # ==== class 4: inputs named by metadata are data, never instructions ====
    (
        "meta-kwargs-checkpoint-path",
        3,
        "would make cl-tool read other files",
        lambda c: [
            "evaluate",
            c.model_meta("cp.safetensors", kwargs={"sizes": "784,64,10", "checkpoint_path": str(c.ck)}),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "meta-kwargs-pretrained",
        3,
        "'pretrained'",
        lambda c: [
            P,
            c.model_meta("pt.safetensors", kwargs={"pretrained": True}),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "meta-kwargs-pretrained-cfg-overlay-file",
        3,
        "pretrained_cfg_overlay",
        lambda c: [
            "importance",
            c.model_meta("ov.safetensors", kwargs={"pretrained_cfg_overlay": {"file": "/etc/passwd"}}),
            "--method",
            "magnitude",
        ],
    ),
    (
        "meta-kwargs-nested-url",
        3,
        "would make cl-tool read other files",
        lambda c: [
            "importance",
            c.model_meta("url.safetensors", kwargs={"head": {"weights": "https://example.invalid/w.bin"}}),
            "--method",
            "magnitude",
        ],
    ),
    (
        "meta-timm-config-checkpoint-path",
        3,
        "'checkpoint_path'",
        lambda c: [
            "evaluate",
            c.timm_folder("tf", {**_TIMM_OK, "model_args": {"checkpoint_path": "/etc/passwd"}}),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "meta-timm-config-cache-dir",
        3,
        "'cache_dir'",
        lambda c: [
            "evaluate",
            c.timm_folder("tf", {**_TIMM_OK, "model_args": {"cache_dir": "/tmp"}}),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "meta-timm-config-num-classes-text",
        3,
        "field 'num_classes'",
        lambda c: [
            "evaluate",
            c.timm_folder("tf", {**_TIMM_OK, "num_classes": "ten"}),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "meta-timm-config-model-args-list",
        3,
        "field 'model_args'",
        lambda c: [
            P,
            c.timm_folder("tf", {**_TIMM_OK, "model_args": [1, 2]}),
            "--by",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            c.out,
        ],
    ),
    (
        "meta-timm-config-input-size-short",
        3,
        "pretrained_cfg.input_size",
        lambda c: [
            "evaluate",
            c.timm_folder("tf", {**_TIMM_OK, "pretrained_cfg": {"input_size": [3, 224]}}),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "meta-timm-config-img-size-text",
        3,
        "model_args.img_size",
        lambda c: [
            "evaluate",
            c.timm_folder("tf", {**_TIMM_OK, "model_args": {"img_size": "big"}}),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "meta-timm-config-mean-text",
        3,
        "pretrained_cfg.mean",
        lambda c: [
            "evaluate",
            c.timm_folder(
                "tf", {**_TIMM_OK, "pretrained_cfg": {"input_size": [1, 28, 28], "mean": "grey", "std": [0.5]}}
            ),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "meta-timm-config-architecture-number",
        3,
        "field 'architecture'",
        lambda c: [
            "evaluate",
            c.timm_folder("tf", {**_TIMM_OK, "architecture": 5}),
            "--device",
            "cpu",
            "--data",
            c.data,
        ],
    ),
    (
        "meta-timm-config-top-level-list",
        3,
        "a JSON object",
        lambda c: ["evaluate", c.timm_folder("tf", "[1, 2]"), "--device", "cpu", "--data", c.data],
    ),
    (
        "meta-init-arch-arg-checkpoint-path",
        2,
        "would make the model read files",
        lambda c: ["init", "--arch", "resnet18", "--arch-arg", "checkpoint_path=/x", "-o", c.out],
    ),
    (
        "meta-init-arch-arg-pretrained",
        2,
        "would make the model read files",
        lambda c: ["init", "--arch", "mlp", "--arch-arg", "pretrained=true", "-o", c.out],
    ),
    # ==== class 5: data and pipes ====
    (
        "data-corrupt-png-in-imagefolder",
        3,
        "broken.png cannot be decoded",
        lambda c: [
            "evaluate",
            c.ck,
            "--device",
            "cpu",
            "--data",
            c.imagefolder("corrupt", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20),
        ],
    ),
    (
        "data-truncated-jpeg-in-imagefolder",
        3,
        "cut.jpg cannot be decoded",
        lambda c: [
            T,
            c.ck,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--data",
            c.imagefolder("trunc", _jpeg_bytes()[:300], "cut.jpg"),
        ],
    ),
    (
        "data-fifo",
        3,
        "is not a regular file or folder",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.fifo("d.jsonl")],
    ),
    (
        "data-dev-null",
        3,
        "is not a regular file or folder",
        lambda c: ["importance", c.ck, "--device", "cpu", "--data", "/dev/null"],
    ),
    (
        "ckpt-fifo",
        3,
        "is not a regular file",
        lambda c: ["evaluate", c.fifo("f.safetensors"), "--device", "cpu", "--data", c.data],
    ),
    (
        "importance-file-dev-null",
        3,
        "is not a regular file",
        lambda c: [T, c.ck, "--data", c.data, "--device", "cpu", "--importance", "/dev/null", "-o", c.out],
    ),
    ("mask-fifo", 3, "is not a regular file", lambda c: _tn(c, "-o", c.out, "--mask", c.fifo("mk.safetensors"))),
    (
        "data-split-on-single-dataset",
        2,
        "holds a single dataset",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", f"{c.dataset('single', _demo(8))}::split=test"],
    ),
    (
        "data-split-train-on-single-dataset",
        2,
        "holds a single dataset",
        lambda c: [
            T,
            c.ck,
            "--device",
            "cpu",
            "-o",
            c.out,
            "--data",
            c.dataset("single", _demo(8)),
            "--split",
            "train[:4]",
        ],
    ),
    (
        "data-split-on-jsonl",
        2,
        "available splits: train",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", f"{c.jsonl('d.jsonl')}::split=test"],
    ),
    (
        "data-split-on-imagefolder",
        2,
        "available splits: train",
        lambda c: [
            "evaluate",
            c.ck,
            "--device",
            "cpu",
            "--data",
            c.imagefolder("imgs", _png_bytes(), "extra.png"),
            "--split",
            "validation",
        ],
    ),
    (
        "data-limit-inline-negative",
        2,
        "limit must be at least 1",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", f"{c.demo}::limit=-1"],
    ),
    (
        "data-limit-inline-zero",
        2,
        "limit must be at least 1",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", f"{c.demo}::limit=0"],
    ),
    (
        "data-limit-negative",
        2,
        "limit must be at least 1",
        lambda c: ["evaluate", c.ck, "--device", "cpu", "--data", c.demo, "--limit", "-1"],
    ),
    (
        "config-given-twice",
        2,
        "--config was given 2 times",
        lambda c: [
            "evaluate",
            c.ck,
            "--data",
            c.data,
            "--config",
            c.file("a.toml", b"batch-size = 8\n"),
            "--config",
            c.file("b.toml", b"batch-size = 9\n"),
        ],
    ),
    # ---- demo-data ----
    (
        "demo-data-zero-train",
        2,
        "--train must be in [1, 1000000]",
        lambda c: ["demo-data", c.d / "demo", "--train", "0"],
    ),
    ("demo-data-parent-missing", 6, "does not exist", lambda c: ["demo-data", c.d / "x" / "y" / "demo"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ctx, case):
    _, code, phrase, build = case
    argv = build(ctx)
    expect_failure(ctx, argv, code, phrase)


def test_catalogue_is_large_and_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30
    assert {c[1] for c in CASES} == {2, 3, 4, 6}


# --------------------------------------------------------------------------------------------------------------
# cases that need more than one command line


@pytest.mark.parametrize("command", ["init", "train-next", "importance", "prune", "evaluate-csv", "demo-data"])
def test_unwritable_output_folder(ctx, command):
    """A folder without write permission (or, as root, a 'folder' that is a regular file) is refused before any work."""
    locked = ctx.d / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits: use a path whose parent is a regular file
            parent = ctx.file("plainfile", b"not a folder")
            phrase = "is a file, not a folder"
        else:
            parent = locked
            phrase = "is not writable"
        out = parent / ("demo" if command == "demo-data" else "out.safetensors")
        argv = {
            "init": ["init", "--arch", "mlp", "--arch-arg", "sizes=784,8,10", "-o", out],
            "train-next": ["train-next", ctx.ck, "--data", ctx.data, "--device", "cpu", "-o", out],
            "importance": ["importance", ctx.ck, "--method", "magnitude", "-o", out],
            "prune": ["prune", ctx.ck, "--by", "magnitude", "--sparsity", "0.5", "-o", out],
            "evaluate-csv": ["evaluate", ctx.ck, "--data", ctx.data, "--device", "cpu", "--csv", parent / "r.csv"],
            "demo-data": ["demo-data", out],
        }[command]
        expect_failure(ctx, argv, 6, phrase)
    finally:
        os.chmod(locked, stat.S_IRWXU)


def test_device_cuda_without_cuda_is_exit_7(ctx):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in (
        ["train-next", ctx.ck, "--data", ctx.data, "--device", "cuda", "-o", ctx.out],
        ["evaluate", ctx.ck, "--data", ctx.data, "--device", "cuda:0"],
        ["importance", ctx.ck, "--method", "magnitude", "--device", "cuda"],
        ["prune", ctx.ck, "--by", "magnitude", "--sparsity", "0.5", "--device", "cuda", "-o", ctx.out],
    ):
        expect_failure(ctx, argv, 7, "CUDA is not available")


def test_existing_output_is_kept_without_force_and_replaced_with_it(ctx):
    """train-next refuses an existing -o before training; --force replaces it atomically."""
    out = ctx.file("b.safetensors", b"precious")
    expect_failure(ctx, ["train-next", ctx.ck, "--data", ctx.data, "--device", "cpu", "-o", out], 6, "--force")
    r = ctx.cli("train-next", ctx.ck, "--data", ctx.data, "--device", "cpu", "-o", out, "--force")
    assert r.code == 0, r.err
    from cl_tool.checkpoint import load_checkpoint

    assert load_checkpoint(out).spec.arch == "mlp"


# --------------------------------------------------------------------------------------------------------------
# documented conversions: these inputs are accepted, not refused


def test_pil_images_of_another_size_are_resized(ctx):
    """PIL images of the wrong size are resized (bilinear) to the model's input shape: success."""
    from cl_tool.demo import make_dataset

    ds = make_dataset(8).map(lambda e: {"image": e["image"].resize((40, 36))})
    path = ctx.dataset("big", ds)
    r = ctx.cli("evaluate", ctx.ck, "--data", path, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["accuracy"][0][0] >= 0.0


def test_rgb_images_are_converted_for_a_grey_model(ctx):
    """RGB images given to a 1-channel model are converted to grey: success (and the same accuracy as the grey originals)."""
    from cl_tool.demo import make_dataset

    grey = make_dataset(32, seed=4)
    rgb = grey.map(lambda e: {"image": e["image"].convert("RGB")})
    p_grey, p_rgb = ctx.dataset("grey", grey), ctx.dataset("rgb", rgb)
    r1 = ctx.cli("evaluate", ctx.ck, "--data", p_grey, "--device", "cpu", "--json")
    r2 = ctx.cli("evaluate", ctx.ck, "--data", p_rgb, "--device", "cpu", "--json")
    assert r1.code == 0 and r2.code == 0, r1.err + r2.err
    assert json.loads(r1.out)["accuracy"] == json.loads(r2.out)["accuracy"]


def test_flat_arrays_of_exactly_chw_values_are_reshaped(ctx):
    """A flat array of exactly C*H*W values is reshaped (the refused case is any other length, in the catalogue)."""
    path = ctx.arrays("flat", _flat(784, 0.5), [0, 1, 2, 3])
    r = ctx.cli("evaluate", ctx.ck, "--data", path, "--device", "cpu")
    assert r.code == 0, r.err


def test_missing_relative_data_folder_is_a_path_not_a_hub_id(ctx, monkeypatch):
    """`runs/task_b` looks like a hub id (owner/name), but ./runs exists here: it is a missing path (exit 3)."""
    (ctx.d / "runs").mkdir()
    monkeypatch.chdir(ctx.d)
    r = expect_failure(
        ctx, ["evaluate", ctx.ck, "--data", "runs/task_b", "--device", "cpu"], 3, "runs/task_b does not exist"
    )
    assert "Hub" not in r.error_line


@pytest.mark.parametrize(
    "argv,ignored",
    [
        (
            lambda c: [
                "importance",
                c.ck,
                "--method",
                "magnitude",
                "--data",
                c.data,
                "--samples",
                "5",
                "-o",
                c.d / "i.safetensors",
            ],
            "--data, --samples",
        ),
        (
            lambda c: [
                "importance",
                c.ck,
                "--method",
                "mas",
                "--data",
                c.data,
                "--fisher-labels",
                "exact",
                "-o",
                c.d / "i.safetensors",
            ],
            "--fisher-labels",
        ),
        (
            lambda c: [
                "train-next",
                c.ck,
                "--data",
                c.data,
                "--penalty",
                "none",
                "--momentum",
                "0.9",
                "--nesterov",
                "-o",
                c.out,
            ],
            "--momentum, --nesterov",
        ),
        (
            lambda c: ["prune", c.ck, "--by", "magnitude", "--score-data", c.data, "--sparsity", "0.5", "-o", c.out],
            "--score-data",
        ),
    ],
    ids=["magnitude-data", "mas-fisher-labels", "adam-momentum", "magnitude-score-data"],
)
def test_options_that_do_not_apply_are_ignored_with_a_note(ctx, argv, ignored):
    """One command line may serve several methods (CI templates): an option the method does not use is a note, not an error."""
    r = ctx.cli(*argv(ctx))
    assert r.code == 0, r.err
    notes = [ln for ln in r.err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and f"ignores {ignored} (not used there)" in notes[0], r.err
