"""Property test: whatever paths a command line names as outputs, inputs survive.

Hypothesis draws a command, run on its own or as the line of a batch file, and, for each of its output options, a
path from: the inputs themselves (checkpoint, the sidecar found beside it, a data file, the config file, the batch
file), links to them (symbolic and hard), paths inside a ``--data`` folder, an existing unrelated file, a symbolic
link to it, a dangling symbolic link, a hard link to it, a FIFO and a link to the FIFO, and fresh paths (possibly
the same fresh path twice), with or without ``--force``. The oracle is exact: the command must exit 6 and change
nothing when an output aliases an input or lies inside a data folder, when two outputs are one file, when an output
is a symbolic link or a special file, or when an existing file would be replaced without ``--force``; otherwise it
must succeed, leave every input byte-identical (the other name of a replaced hard link keeps its bytes) and write
only the outputs it was given.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import snapshot_dir

INPUTS = ["c.safetensors", "c.importance.safetensors", "data.jsonl", "cfg.toml"]
BATCH = "seq.txt"  # the batch file: an input when the command runs as its line, an unrelated file otherwise
LINKS = {
    "link_ck": "c.safetensors",
    "hard_ck": "c.safetensors",
    "link_data": "data.jsonl",
    "link_sidecar": "c.importance.safetensors",
    "link_batch": BATCH,
    "hard_batch": BATCH,
    "link_existing": "existing.bin",
    "hard_existing": "existing.bin",
    "link_dangling": "nowhere.out",
    "link_fifo": "fifo",
}
SPECIAL = ["fifo"]
INSIDE_DATA = ["ds/new.out", "ds/dataset_info.json"]
EXISTING = ["existing.bin"]
FRESH = ["fresh1.out", "fresh2.out", "fresh3.out"]
CANDIDATES = INPUTS + [BATCH] + list(LINKS) + SPECIAL + INSIDE_DATA + EXISTING + FRESH

# command -> (fixed arguments, its inputs, output options, options that must be given). The sidecar beside the
# checkpoint is an input of prune --by importance and of train-next (the penalty), not of importance (its default output).
COMMANDS = {
    "evaluate": (
        [
            "evaluate",
            "c.safetensors",
            "--data",
            "data.jsonl",
            "--data",
            "ds",
            "--device",
            "cpu",
            "--config",
            "cfg.toml",
        ],
        {"c.safetensors", "data.jsonl", "ds", "cfg.toml"},
        ["--csv", "--plot"],
        [],
    ),
    "prune": (
        ["prune", "c.safetensors", "--by", "importance", "--sparsity", "0.5", "--config", "cfg.toml"],
        {"c.safetensors", "c.importance.safetensors", "cfg.toml"},
        ["-o", "--mask-out"],
        [],
    ),
    "importance": (
        [
            "importance",
            "c.safetensors",
            "--data",
            "data.jsonl",
            "--method",
            "fisher",
            "--device",
            "cpu",
            "--config",
            "cfg.toml",
        ],
        {"c.safetensors", "data.jsonl", "cfg.toml"},
        ["-o"],
        ["-o"],
    ),
    "train-next": (
        [
            "train-next",
            "c.safetensors",
            "--data",
            "data.jsonl",
            "--eval-data",
            "ds",
            "--device",
            "cpu",
            "--lambda",
            "1",
            "--config",
            "cfg.toml",
        ],
        {"c.safetensors", "c.importance.safetensors", "data.jsonl", "ds", "cfg.toml"},
        ["-o", "--si-out", "--log-json"],
        ["-o"],
    ),
    "init": (
        ["init", "--arch", "mlp", "--arch-arg", "sizes=784,8,10", "--config", "cfg.toml"],
        {"cfg.toml"},
        ["-o"],
        ["-o"],
    ),
}


@pytest.fixture(scope="module")
def template(tmp_path_factory, small_mlp):
    """A workspace with every kind of input; each example runs in a fresh copy."""
    import datasets

    from cl_tool.cli import main

    root = tmp_path_factory.mktemp("roles")
    shutil.copy(small_mlp, root / "c.safetensors")
    with pytest.raises(SystemExit) as exc:
        main(["-q", "importance", str(root / "c.safetensors"), "--method", "magnitude"])
    assert exc.value.code == 0
    (root / "data.jsonl").write_text(
        "".join(json.dumps({"pixels": [0.25] * 784, "label": i % 10}) + "\n" for i in range(8))
    )
    (root / "cfg.toml").write_text(
        "[evaluate]\nbatch-size = 4\n[prune]\nscope = 'global'\n[importance]\nbatch-size = 4\n"
        "[train-next]\nbatch-size = 4\n[init]\nseed = 1\n"
    )
    datasets.Dataset.from_dict({"pixels": [[0.5] * 784] * 8, "label": list(range(8))}).save_to_disk(str(root / "ds"))
    (root / "existing.bin").write_bytes(b"an unrelated file")
    return root


def _workspace(template: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix="roles-")) / "ws"
    shutil.copytree(template, d, symlinks=True)
    (d / BATCH).write_text("# replaced by the line under test\n")
    os.mkfifo(d / "fifo")  # never opened: a test that hangs here found a command writing into it
    for name, target in LINKS.items():
        if name.startswith("hard"):
            os.link(d / target, d / name)
        else:
            os.symlink(d / target, d / name)
    return d


def _target(path: str) -> str:
    return LINKS.get(path, path)


def _expected_code(inputs: set[str], outputs: list[str], force: bool) -> int:
    """6 when an output is (a link to) an input or lies in an input folder, when two outputs are one file, when an
    output is a symbolic link or a special file, or when an existing file would be replaced without --force; else 0."""
    targets = [_target(o) for o in outputs]
    if any(t in inputs or t.split("/")[0] in inputs for t in targets) or len(set(targets)) < len(targets):
        return 6
    if any(o in SPECIAL or (o in LINKS and not o.startswith("hard")) for o in outputs):
        return 6
    existing = (
        set(INPUTS) | set(EXISTING) | {BATCH, "ds/dataset_info.json"} | {o for o in LINKS if o.startswith("hard")}
    )
    if not force and any(o in existing for o in outputs):
        return 6
    return 0


@st.composite
def command_lines(draw):
    name = draw(st.sampled_from(sorted(COMMANDS)))
    fixed, _, options, required = COMMANDS[name]
    chosen = {}
    for opt in options:
        if opt in required or draw(st.booleans()):
            chosen[opt] = draw(st.sampled_from(CANDIDATES))
    if name == "prune" and not chosen:
        chosen["-o"] = draw(st.sampled_from(CANDIDATES))
    return name, fixed, chosen, draw(st.booleans()), draw(st.booleans())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(case=command_lines())
def test_outputs_never_alias_inputs(cli, template, case):
    name, fixed, chosen, force, in_batch = case
    d = _workspace(template)
    cwd = os.getcwd()
    try:
        os.chdir(d)
        argv = fixed + [x for opt, path in chosen.items() for x in (opt, path)] + (["--force"] if force else [])
        inputs = COMMANDS[name][1] | ({BATCH} if in_batch else set())
        if in_batch:
            (d / BATCH).write_text(shlex.join(argv) + "\n")
        before = snapshot_dir(d)
        r = cli("batch", BATCH) if in_batch else cli(*argv)
        expected = _expected_code(inputs, list(chosen.values()), force)
        assert r.code == expected, f"{argv}: exit {r.code}, expected {expected}\n{r.err}"
        assert "Traceback" not in r.err
        after = snapshot_dir(d)
        if expected == 6:
            assert after == before, f"{argv}: files changed although the command was refused"
            assert "Error:" in r.error_line
        else:
            written = set(chosen.values())  # no symbolic link here: a hard link's name is replaced, not its file
            for path, digest in before.items():
                if path not in written and _target(path) not in written:  # a symbolic link reads what it points to
                    assert after.get(path) == digest, f"{argv}: {path} changed"
            assert set(after) - set(before) <= written, (
                f"{argv}: unexpected new files {set(after) - set(before) - written}"
            )
            assert all(p in after for p in written), f"{argv}: an output was not written"
            for inp in inputs:
                for path, digest in before.items():
                    if path == inp or path.startswith(inp + "/"):
                        assert after[path] == digest, f"{argv}: input {path} changed"
    finally:
        os.chdir(cwd)
        shutil.rmtree(d.parent, ignore_errors=True)
