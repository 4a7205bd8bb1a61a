"""Limits that agree: no command writes a header the safetensors library cannot open, whatever history it inherits.

A written checkpoint keeps its newest 50 history entries whole (an entry over 16 KiB of JSON keeps only its lineage),
older entries only their lineage, up to 1,000 generations; older ones are dropped and counted in ``dropped_before``
of the oldest kept entry. ``info`` prints at most 20 rows of each table.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from cl_tool.checkpoint import ENTRY_BYTES, HISTORY_LIMIT, LINEAGE_LIMIT, trim_history


def _header_length(path: Path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


def _with_history(src: Path, dest: Path, history: list, *, header_bytes: int | None = None) -> Path:
    """A copy of checkpoint ``src`` recording ``history``. With ``header_bytes`` (a multiple of 8) every entry's
    note "@@@" is widened to "nnn…" so that the header is exactly that long (the file is written once)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cl_tool.safetensors_io import write_safetensors_file

    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta["cl_tool.history"] = json.dumps(history)
    write_safetensors_file(tensors, dest, meta)
    if header_bytes is not None:
        raw = dest.read_bytes()
        n = _header_length(dest)
        parts = raw[8 : 8 + n].rstrip(b" ").split(b"@@@")
        room = header_bytes - sum(map(len, parts))
        each = room // (len(parts) - 1)
        widths = [each] * (len(parts) - 2) + [room - each * (len(parts) - 2)]
        text = parts[0] + b"".join(b"n" * w + p for w, p in zip(widths, parts[1:]))
        assert len(text) == header_bytes
        dest.write_bytes(struct.pack("<Q", header_bytes) + text + raw[8 + n :])
    return dest


def _entries(n: int, *, note: str = "") -> list[dict]:
    return [
        {"command": "train-next", "anchor_fingerprint": f"{i:032x}", "time": "2026-01-01T00:00:00+00:00"}
        | ({"note": note} if note else {})
        for i in range(n)
    ]


def _history(path: Path) -> list:
    from cl_tool.checkpoint import load_checkpoint

    return load_checkpoint(path).history


def test_a_header_near_the_librarys_limit_gives_an_output_it_can_open(cli, small_mlp, tmp_path, demo_dir):
    """The issue's case: 99,999,448 header bytes in; train-next and the streaming prune write small, readable files."""
    from safetensors import safe_open

    from cl_tool.lineage import ancestors

    inherited = _entries(45, note="@@@")  # widened to ~2.2 MB each, over ENTRY_BYTES: kept as lineage only
    big = _with_history(small_mlp, tmp_path / "big.safetensors", inherited, header_bytes=99_999_448)
    out, pruned = tmp_path / "b.safetensors", tmp_path / "p.safetensors"
    r = cli("train-next", big, "--data", f"{demo_dir}::limit=8", "--device", "cpu", "--penalty", "none", "-o", out)
    assert r.code == 0, r.err
    r = cli("prune", big, "--by", "magnitude", "--sparsity", "0.5", "-o", pruned)
    assert r.code == 0, r.err
    for path in (out, pruned):
        assert _header_length(path) < 200_000
        with safe_open(str(path), "pt") as f:  # the library opens it
            assert len(list(f.keys())) > 0
        hist = _history(path)
        assert len(hist) == 46 and hist[-1]["command"] in ("train-next", "prune") and "trimmed" not in hist[-1]
        assert all(e["trimmed"] is True and "note" not in e for e in hist[:-1])
        # lineage kept: generation 1 is the input, then the 45 inherited fingerprints, newest first
        fps = [a.fingerprint for a in ancestors(hist)]
        assert fps[1:] == [e["anchor_fingerprint"] for e in reversed(inherited)]


def test_a_100000_entry_history_is_trimmed_counted_and_shown_briefly(cli, small_mlp, tmp_path, demo_dir):
    n = 100_000
    big = _with_history(small_mlp, tmp_path / "long.safetensors", _entries(n))
    r = cli("info", big)
    assert r.code == 0, r.err
    assert len(r.out) + len(r.err) < 20_000, len(r.out) + len(r.err)
    assert f"{n - 20:,} older entries not shown" in r.err
    j = cli("info", big, "--json")
    rec = json.loads(j.out)[0]
    assert rec["history_entries"] == n and len(rec["history"]) == HISTORY_LIMIT
    assert len(rec["lineage"]) == LINEAGE_LIMIT and rec["lineage"][0]["fingerprint"] == f"{n - 1:032x}"

    out = tmp_path / "b.safetensors"
    r = cli("train-next", big, "--data", f"{demo_dir}::limit=8", "--device", "cpu", "--penalty", "none", "-o", out)
    assert r.code == 0, r.err
    hist = _history(out)
    assert len(hist) == LINEAGE_LIMIT
    assert hist[0]["dropped_before"] == n + 1 - LINEAGE_LIMIT  # 100,001 entries, the newest 1,000 kept
    assert sum(1 for e in hist if "trimmed" not in e) == HISTORY_LIMIT
    assert hist[-2]["anchor_fingerprint"] == f"{n - 1:032x}" and hist[1]["anchor_fingerprint"] == f"{n - 998:032x}"
    r = cli("info", out)
    assert f"{n + 1 - LINEAGE_LIMIT:,} older still were dropped by earlier commands" in r.err


def test_trim_history_counts_across_generations():
    h = _entries(LINEAGE_LIMIT + 10)
    once = trim_history(h)
    assert len(once) == LINEAGE_LIMIT and once[0]["dropped_before"] == 10
    twice = trim_history(once + _entries(5))
    assert len(twice) == LINEAGE_LIMIT and twice[0]["dropped_before"] == 15
    assert trim_history(_entries(3)) == _entries(3)  # a short history is kept as it is
    huge = _entries(1, note="n" * ENTRY_BYTES)
    assert trim_history(huge) == [
        {"trimmed": True, **{k: huge[0][k] for k in ("command", "time", "anchor_fingerprint")}}
    ]
    assert trim_history(["not an entry", 3]) == [{}, {}]  # kept as empty entries (no lineage)


def test_no_writer_writes_a_header_over_the_limit(tmp_path):
    import torch

    from cl_tool.errors import OutputError
    from cl_tool.safetensors_io import MAX_HEADER_BYTES, save_tensors

    out = tmp_path / "x.safetensors"
    with pytest.raises(OutputError, match="more than the 100,000,000"):
        save_tensors(out, {"w": torch.zeros(2)}, {"big": "x" * MAX_HEADER_BYTES}, force=False)
    assert list(tmp_path.iterdir()) == []
