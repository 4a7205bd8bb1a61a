"""cl-tool batch: command lines run one after another in one process, exactly as they would one by one."""

from __future__ import annotations

import io
import json

import pytest

from cl_tool.checkpoint import load_checkpoint


def _write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_sequence_gives_the_files_of_separate_commands(cli, demo_dir, tmp_path):
    data = f"{demo_dir}::limit=96"
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    lines = [
        "init --arch mlp --arch-arg sizes=784,16,10 -o {d}/a0.safetensors --seed 3",
        f"cl-tool train-next {{d}}/a0.safetensors --data '{data}' --device cpu -o {{d}}/a.safetensors",
        f"importance {{d}}/a.safetensors --data '{data}' --method fisher --device cpu  # the sidecar beside a",
        f"train-next {{d}}/a.safetensors --data '{data}' --deterministic --lambda 10 --device cpu -o {{d}}/b.safetensors",
        "",
        f"evaluate {{d}}/a.safetensors {{d}}/b.safetensors --data A='{data}' --json",
    ]
    script = _write(tmp_path / "seq.txt", *(line.format(d=one) for line in lines))
    r = cli("batch", script)
    assert r.code == 0, r.err
    assert "[5/5] cl-tool evaluate" in r.err
    assert r.out.startswith("Ω (fisher) per parameter")  # importance's table: a result, on stdout
    batch_result = json.loads(r.out[r.out.index("\n{") + 1 :])  # then evaluate's JSON document
    for line in lines:
        if line:
            argv = __import__("shlex").split(line.format(d=many), comments=True)
            assert cli(*(argv[1:] if argv[0] == "cl-tool" else argv)).code == 0
    for name in ("a0.safetensors", "a.safetensors", "a.importance.safetensors", "b.safetensors"):
        assert (one / name).exists() and (many / name).exists(), name
    for name in ("a0.safetensors", "a.safetensors", "b.safetensors"):
        assert load_checkpoint(one / name).fingerprint == load_checkpoint(many / name).fingerprint, name
    assert (
        batch_result["accuracy"]
        == json.loads(cli(*__import__("shlex").split(lines[-1].format(d=many))).out)["accuracy"]
    )


def test_the_first_failing_line_stops_the_batch_with_its_code(cli, tmp_path):
    script = _write(
        tmp_path / "seq.txt",
        f"init --arch mlp --arch-arg sizes=784,8,10 -o {tmp_path}/a0.safetensors",
        f"info {tmp_path}/missing.safetensors",
        f"init --arch mlp --arch-arg sizes=784,8,10 -o {tmp_path}/never.safetensors",
    )
    r = cli("batch", script)
    assert r.code == 3, r.err  # info's own code for a missing file
    assert f"{script} line 2 failed (exit 3); the 1 line(s) after it were not run." in r.err
    assert (tmp_path / "a0.safetensors").exists() and not (tmp_path / "never.safetensors").exists()
    assert "Traceback" not in r.err

    (tmp_path / "a0.safetensors").unlink()
    r = cli("batch", script, "--keep-going")
    assert r.code == 3 and "line 2 failed (exit 3); going on (--keep-going)." in r.err
    assert (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("init --arch 'mlp\n", "line 1: No closing quotation (check its quotes); nothing was run."),
        ("# only a comment\n\n", "holds no command line; nothing was run."),
        ("info x.safetensors\n-q batch other.txt\n", "line 2 runs batch inside a batch"),
    ],
)
def test_a_bad_file_runs_nothing(cli, tmp_path, content, message):
    script = tmp_path / "seq.txt"
    script.write_text(content)
    r = cli("batch", script)
    assert r.code == 2 and message in r.err, r.err
    assert "[1/" not in r.err  # not a line was started


def test_a_missing_file_is_named(cli, tmp_path):
    r = cli("batch", tmp_path / "nope.txt")
    assert r.code == 2 and "nope.txt does not exist or is not a file" in r.err


def test_lines_from_standard_input(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "sys.stdin", io.StringIO(f"init --arch mlp --arch-arg sizes=784,8,10 -o {tmp_path}/a.safetensors\n")
    )
    r = cli("-q", "batch", "-")
    assert r.code == 0 and r.err == ""
    assert (tmp_path / "a.safetensors").exists()


def test_backslash_continues_a_line_as_in_a_shell(cli, tmp_path):
    script = _write(
        tmp_path / "seq.txt",
        "cl-tool init --arch mlp \\",
        "    --arch-arg sizes=784,8,10 \\",
        f"    -o {tmp_path}/a0.safetensors  # continued twice",
        "# a comment ending in a backslash does not continue \\",
        f"info {tmp_path}/a0.safetensors --json",
        "info \\",
        f"  {tmp_path}/missing.safetensors",
    )
    r = cli("batch", script)
    assert r.code == 3
    assert "[1/3] cl-tool init --arch mlp --arch-arg sizes=784,8,10 -o" in r.err
    assert f"{script} line 6 failed (exit 3)" not in r.err  # the last line: nothing after it to skip
    (info,) = json.loads(r.out)
    assert info["model"]["kwargs"] == {"sizes": "784,8,10"}


def test_json_lines_give_one_document_each_also_on_failure(cli, tmp_path):
    script = _write(
        tmp_path / "seq.txt",
        f"info {tmp_path}/missing.safetensors --json",
        f"init --arch mlp --arch-arg sizes=784,8,10 -o {tmp_path}/a0.safetensors --json",
    )
    r = cli("batch", script, "--keep-going")
    assert r.code == 3
    decoder, docs, at = json.JSONDecoder(), [], 0
    while at < len(r.out):
        doc, at = decoder.raw_decode(r.out, at)
        docs.append(doc)
        at += 1  # the newline after each document
    assert len(docs) == 2
    assert docs[0]["error"]["code"] == 3 and "missing.safetensors" in docs[0]["error"]["message"]
    assert docs[1]["output"] == f"{tmp_path}/a0.safetensors" and "error" not in docs[1]
