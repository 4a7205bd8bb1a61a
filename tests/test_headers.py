"""One header check for every reader: the streaming prune, info, evaluate and train-next refuse the same files.

Each broken file is a real cl-tool checkpoint (an MLP 784-16-16-16, so two tensors have the same size) whose
header was edited: the tensors' data offsets overlap, repeat, or leave a gap; offsets or a shape are written as
floats or booleans; a name appears twice; the length prefix exceeds the safetensors library's 100,000,000-byte
limit. Every command exits 3 with one sentence, no traceback, nothing written. A checkpoint holding NaN (with a
recomputed, matching fingerprint) is refused by ``info --verify`` as by every other reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import snapshot_dir


@pytest.fixture(scope="module")
def ck16(tmp_path_factory) -> Path:
    from cl_tool.cli import main

    p = tmp_path_factory.mktemp("hdr") / "c.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["-q", "init", "--arch", "mlp", "--arch-arg", "sizes=784,16,16,16", "-o", str(p)])
    assert exc.value.code == 0
    return p


def _parts(ck: Path) -> tuple[dict, bytes]:
    raw = ck.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict | str, data: bytes, length: int | None = None) -> Path:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _same_size_pair(header: dict) -> tuple[str, str]:
    sizes: dict[int, str] = {}
    for name, e in header.items():
        if name != "__metadata__":
            size = e["data_offsets"][1] - e["data_offsets"][0]
            if size in sizes:
                return sizes[size], name
            sizes[size] = name
    raise AssertionError("no two tensors of one size")


def _broken(kind: str, ck: Path, out: Path) -> Path:
    header, data = _parts(ck)
    a, b = _same_size_pair(header)
    if kind == "duplicate offsets":  # b reads a's bytes; b's own bytes stay where they were (now unused)
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
    elif kind == "overlapping offsets":  # b starts 4 bytes into a, ends 4 bytes into its old place
        sa, ea = header[a]["data_offsets"]
        sb, eb = header[b]["data_offsets"]
        header[b]["data_offsets"] = [ea - 4, ea - 4 + (eb - sb)]
    elif kind == "a gap after the last tensor":
        data += b"\0" * 8
    elif kind == "float offsets":
        header[a]["data_offsets"] = [float(v) for v in header[a]["data_offsets"]]
    elif kind == "float shape":
        header[a]["shape"] = [float(v) for v in header[a]["shape"]]
    elif kind == "boolean shape":
        header[a]["shape"] = [True] * len(header[a]["shape"])
    elif kind == "a name twice":
        text = json.dumps(header)
        entry = json.dumps({a: header[a]})[1:-1]
        return _write(out, text[:-1] + ", " + entry + "}", data)
    elif kind == "header length over the library's limit":
        return _write(out, header, data, length=100_000_001)
    return _write(out, header, data)


KINDS = [
    "duplicate offsets",
    "overlapping offsets",
    "a gap after the last tensor",
    "float offsets",
    "float shape",
    "boolean shape",
    "a name twice",
    "header length over the library's limit",
]


def test_the_edits_break_what_the_safetensors_library_reads(ck16, tmp_path):
    """Sanity of the cases: safetensors itself refuses each (a repeated name aside: the library keeps the last)."""
    from safetensors import SafetensorError, safe_open

    for kind in KINDS:
        p = _broken(kind, ck16, tmp_path / "x.safetensors")
        if kind == "a name twice":
            continue
        with pytest.raises(SafetensorError), safe_open(str(p), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118 - safe_open has keys(), no iteration


@pytest.mark.parametrize("kind", KINDS)
def test_every_reader_refuses_a_broken_header_the_same_way(cli, ck16, tmp_path, demo_dir, kind):
    d = tmp_path / "ws"
    d.mkdir()
    bad = _broken(kind, ck16, d / "bad.safetensors")
    before = snapshot_dir(d)
    data = f"{demo_dir}::limit=8"
    out = d / "out.safetensors"
    commands = {
        "info": ["info", bad],
        "info --verify": ["info", bad, "--verify"],
        "prune (streaming)": ["prune", bad, "--by", "magnitude", "--sparsity", "0.5", "-o", out],
        "prune --mask-out": ["prune", bad, "--by", "magnitude", "--sparsity", "0.5", "--mask-out", d / "m.st"],
        "evaluate": ["evaluate", bad, "--data", data, "--device", "cpu"],
        "train-next": ["train-next", bad, "--data", data, "--device", "cpu", "--penalty", "none", "-o", out],
    }
    lines = set()
    for name, argv in commands.items():
        r = cli(*argv)
        assert r.code == 3, f"{name}: exit {r.code}\n{r.err}"
        assert "Traceback" not in r.err and r.error_line.count("Error:") == 1, f"{name}: {r.err}"
        assert str(bad) in r.error_line, f"{name}: {r.error_line}"
        lines.add(r.error_line.split(str(bad), 1)[1])
        assert snapshot_dir(d) == before, f"{name} wrote something"
    assert len(lines) == 1, f"the readers disagree about {kind}: {lines}"


def test_info_verify_refuses_nan_as_every_reader_does(cli, ck16, tmp_path, demo_dir):
    from safetensors.torch import load_file, save_file

    from cl_tool.safetensors_io import fingerprint

    tensors = load_file(str(ck16))
    meta = _parts(ck16)[0]["__metadata__"]
    name = sorted(n for n in tensors if n.endswith("weight"))[0]
    tensors[name][0, 0] = float("nan")
    meta["cl_tool.fingerprint"] = fingerprint(tensors)  # the recorded fingerprint matches the NaN tensors
    p = tmp_path / "nan.safetensors"
    save_file(tensors, str(p), metadata=meta)
    assert cli("info", p).code == 0  # the header is fine: info without --verify reads only that
    r = cli("info", p, "--verify", "--json")
    assert r.code == 3, r.err
    assert "NaN or infinite values" in r.error_line and repr(name) in r.error_line and "Traceback" not in r.err
    doc = json.loads(r.out)  # --json on failure: the error document with the descriptions beside it
    assert doc["error"]["code"] == 3 and doc["files"][0]["fingerprint"]["verified"] is False
    r2 = cli("evaluate", p, "--data", f"{demo_dir}::limit=8", "--device", "cpu")
    assert r2.code == 3 and "NaN or infinite values" in r2.error_line
