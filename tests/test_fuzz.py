"""Fuzzing the readers and the option parsing with hypothesis.

Readers (``read_header``, ``load_tensors``, ``load_checkpoint`` + ``instantiate``, ``load_sidecar``) get random
bytes, mutated valid files (flipped bytes, truncation, spliced garbage), random header JSON and random
metadata strings: each call either succeeds or raises a ``ClToolError`` subclass, never anything else.
CLI option values go through the in-process ``main([...])`` of cheap commands: the exit code is one of the
documented ones and there is no traceback.

Bounded: ``max_examples`` 50-150 per property, ``deadline=None``, tiny model (MLP 4-3-2 on 1x2x2 inputs).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cl_tool.errors import ClToolError  # noqa: E402

DOCUMENTED = {0, 2, 3, 4, 6, 7}
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
    derandomize=False,
)
DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "U16",
    "U32",
    "U64",
    "F8_E4M3",
    "F8_E5M2",
]


# ------------------------------------------------------------------------------------------------------------------
# fixtures: a tiny valid checkpoint, sidecar and mask, and one scratch file rewritten by every example


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from cl_tool.cli import main

    d = tmp_path_factory.mktemp("fuzz")
    ck, sc, mask = d / "m.safetensors", d / "m.importance.safetensors", d / "m.mask.safetensors"
    for argv in (
        ["init", "--arch", "mlp", "--arch-arg", "sizes=4,3,2", "--input-shape", "1x2x2", "-o", ck],
        ["importance", ck, "--method", "magnitude", "-o", sc],
        ["prune", ck, "--by", "magnitude", "--sparsity", "0.5", "--mask-out", mask],
    ):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in argv])
        assert exc.value.code == 0
    return {"dir": d, "checkpoint": ck, "sidecar": sc, "mask": mask, "scratch": d / "scratch.safetensors"}


def _read_all(path: Path) -> None:
    """Every reader on ``path``: success or a ClToolError, nothing else."""
    from cl_tool.checkpoint import instantiate, load_checkpoint
    from cl_tool.safetensors_io import load_tensors, read_header
    from cl_tool.sidecar import load_sidecar

    for fn in (read_header, load_tensors, load_sidecar):
        try:
            fn(path)
        except ClToolError as exc:
            assert exc.message and exc.exit_code in (3, 4)
    try:
        ckpt = load_checkpoint(path)
        _ = ckpt.fingerprint
        instantiate(ckpt)
    except ClToolError as exc:
        assert exc.message and exc.exit_code in (2, 3, 4)


def _safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# ------------------------------------------------------------------------------------------------------------------
# readers


@settings(FUZZ, max_examples=150)
@given(data=st.binary(max_size=600))
@example(data=b"")
@example(data=b"\x00" * 8)
@example(data=struct.pack("<Q", 2) + b"{}")
@example(data=struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000)  # absurdly nested JSON
@example(data=struct.pack("<Q", 2**63) + b"{}")
def test_random_bytes(base, data):
    base["scratch"].write_bytes(data)
    _read_all(base["scratch"])


@st.composite
def mutated(draw):
    kind = draw(st.sampled_from(["checkpoint", "sidecar", "mask"]))
    return kind, draw(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "truncate", "splice", "header-byte"]),
                st.integers(0, 10**6),
                st.binary(min_size=1, max_size=16),
            ),
            min_size=1,
            max_size=4,
        )
    )


@settings(FUZZ, max_examples=150)
@given(m=mutated())
def test_mutated_valid_files(base, m):
    kind, ops = m
    data = bytearray(base[kind].read_bytes())
    hlen = struct.unpack("<Q", data[:8])[0]
    for op, pos, chunk in ops:
        if not data:
            break
        if op == "flip":
            i = pos % len(data)
            data[i] ^= chunk[0] or 0xFF
        elif op == "truncate":
            del data[pos % len(data) :]
        elif op == "splice":
            i = pos % len(data)
            data[i : i + len(chunk)] = chunk
        else:  # a byte inside the JSON header, where damage is most interesting
            i = 8 + pos % max(1, min(hlen, len(data) - 8))
            if i < len(data):
                data[i] = chunk[0]
    base["scratch"].write_bytes(bytes(data))
    _read_all(base["scratch"])


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
)
json_any = st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)

tensor_entry = st.one_of(
    json_any,
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(DTYPES), st.text(max_size=5)),
            "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), json_any),
            "data_offsets": st.one_of(st.tuples(st.integers(-4, 80), st.integers(-4, 80)).map(list), json_any),
        }
    ),
)


@settings(FUZZ, max_examples=150)
@given(
    entries=st.dictionaries(st.text(max_size=6), tensor_entry, max_size=3),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3), json_any),
    body=st.binary(max_size=80),
)
def test_random_header_json(base, entries, metadata, body):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    try:
        raw = _safetensors_bytes(header, body)
    except (ValueError, OverflowError):  # json cannot encode it; not a file anyone can write
        return
    base["scratch"].write_bytes(raw)
    _read_all(base["scratch"])


def _with_metadata(base, kind: str, changes: dict[str, str | None]) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(base[kind]), "pt") as f:
        meta = dict(f.metadata())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(load_file(str(base[kind])), str(base["scratch"]), metadata=meta)
    return base["scratch"]


def _json_text(value) -> str:
    try:
        return json.dumps(value)
    except (ValueError, OverflowError):
        return "null"


model_dict = st.fixed_dictionaries(
    {
        "arch": st.one_of(st.sampled_from(["mlp", "cnn"]), st.text(max_size=6)),
        "input_shape": st.one_of(st.lists(st.integers(-1, 40), max_size=4), json_any),
    },
    optional={
        "kwargs": st.one_of(
            st.fixed_dictionaries({"sizes": st.one_of(st.just("4,3,2"), st.text(max_size=8), json_any)}), json_any
        ),
        "num_classes": st.one_of(st.integers(-1, 4), json_any),
        "mean": st.one_of(st.lists(st.floats(), max_size=2), json_any),
        "std": st.one_of(st.lists(st.floats(), max_size=2), json_any),
        "source": json_any,
    },
).map(_json_text)

metadata_text = st.one_of(st.text(max_size=20), json_any.map(_json_text), model_dict)


@settings(FUZZ, max_examples=120)
@given(
    kind=st.sampled_from(["checkpoint", "sidecar"]),
    changes=st.dictionaries(
        st.sampled_from(
            [
                "cl_tool.model",
                "cl_tool.history",
                "cl_tool.extra",
                "cl_tool.fingerprint",
                "cl_tool.sidecar",
                "method",
                "options",
                "data",
                "fingerprint",
                "tasks",
                "decay",
                "cl_tool.mask",
            ]
        ),
        st.one_of(st.none(), metadata_text),
        min_size=1,
        max_size=3,
    ),
)
@example(
    kind="checkpoint",
    changes={
        "cl_tool.model": json.dumps({"arch": "mlp", "input_shape": [1, 2, 2], "num_classes": 2, "mean": [0.1, 0.2]})
    },
)
@example(
    kind="checkpoint",
    changes={
        "cl_tool.model": json.dumps(
            {"arch": "mlp", "input_shape": [1, 2, 2], "num_classes": 2, "kwargs": {"sizes": "4,x"}}
        )
    },
)
@example(kind="sidecar", changes={"tasks": '{"a": 1}'})
@example(kind="sidecar", changes={"options": "[" * 5000 + "]" * 5000})
def test_random_metadata_strings(base, kind, changes):
    _read_all(_with_metadata(base, kind, changes))


# ------------------------------------------------------------------------------------------------------------------
# CLI option values


@pytest.fixture
def run(capsys):
    from cl_tool.cli import main

    def go(*argv):
        capsys.readouterr()
        try:
            main(["-q"] + [str(a) for a in argv])  # -q: errors only, so the time goes into the code under test
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        err = capsys.readouterr().err
        assert code in DOCUMENTED, f"exit {code} for {argv}\n{err}"
        assert "Traceback" not in err and "Internal error" not in err, err
        if code:
            assert [ln for ln in err.splitlines() if ln.startswith("Error:")], err
        return code

    return go


number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=10),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["nan", "-inf", "1e309", "0x10", "1_0", " 0.5", "0,5", ""]),
)


@settings(FUZZ, max_examples=100)
@given(value=number_text, scope=st.sampled_from(["global", "layer"]))
def test_prune_sparsity_text(base, run, value, scope):
    out = base["dir"] / "fuzz-pruned.safetensors"
    run("prune", base["checkpoint"], "--by", "magnitude", "--scope", scope, f"--sparsity={value}", "-o", out, "--force")


@settings(FUZZ, max_examples=50)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
@example(value=0.0)
@example(value=0.999999)
@example(value=1.0)
@example(value=-0.0)
def test_prune_sparsity_floats(base, run, value):
    """For numbers the outcome is exact: [0, 1) prunes (exit 0), anything else is a usage error (exit 2)."""
    out = base["dir"] / "fuzz-pruned.safetensors"
    code = run("prune", base["checkpoint"], "--by", "magnitude", f"--sparsity={value!r}", "-o", out, "--force")
    assert code == (0 if 0.0 <= value < 1.0 else 2), (value, code)


@st.composite
def shape_text(draw):
    if draw(st.booleans()):
        return draw(st.text(max_size=12))
    parts = draw(
        st.lists(st.one_of(st.integers(-3, 40).map(str), st.text(alphabet="x,0123456789 -", max_size=4)), max_size=4)
    )
    return draw(st.sampled_from(["x", ",", "X"])).join(parts)


@settings(FUZZ, max_examples=100)
@given(shape=shape_text())
@example(shape="1x2x2")
@example(shape="4x1x1")
def test_init_input_shape_values(base, run, shape):
    out = base["dir"] / "fuzz-init.safetensors"
    run("init", "--arch", "mlp", "--arch-arg", "sizes=4,3,2", f"--input-shape={shape}", "-o", out, "--force")


@st.composite
def arch_arg(draw):
    key = draw(
        st.one_of(
            st.sampled_from(["sizes", "negative_slope", "in_chans", "num_classes", "pretrained", "widths"]),
            st.text(max_size=6),
        )
    )
    value = draw(
        st.one_of(
            st.text(max_size=10),
            st.text(alphabet="0123456789,-.;", max_size=10),
            st.sampled_from(["4,3,2", "4,0,2", "true", "none"]),
        )
    )
    return draw(st.sampled_from([f"{key}={value}", key, value, f"={value}"]))


def _too_big(arg: str) -> bool:
    """Skip widths that would allocate real memory (a 4-input MLP with a 10^6-wide layer is the user's choice, not a fuzz finding)."""
    import re

    return any(int(n) > 4096 for n in re.findall(r"\d+", arg))


@settings(FUZZ, max_examples=100)
@given(args=st.lists(arch_arg(), min_size=1, max_size=2))
@example(args=["sizes=4,abc,2"])
@example(args=["sizes=4,-3,2"])
@example(args=["negative_slope=abc"])
@example(args=["in_chans=x"])
def test_init_arch_arg_values(base, run, args):
    hypothesis.assume(not any(_too_big(a) for a in args))
    out = base["dir"] / "fuzz-init.safetensors"
    extra = [x for a in args for x in ("--arch-arg", a)]
    run("init", "--arch", "mlp", "--input-shape", "1x2x2", *extra, "-o", out, "--force")


@settings(FUZZ, max_examples=50)
@given(decay=number_text, samples=st.one_of(st.none(), number_text))
def test_importance_numeric_options(base, run, decay, samples):
    out = base["dir"] / "fuzz.importance.safetensors"
    extra = [] if samples is None else [f"--memory-budget-mb={samples}"]
    run(
        "importance",
        base["checkpoint"],
        "--method",
        "magnitude",
        "--accumulate",
        base["sidecar"],
        f"--decay={decay}",
        *extra,
        "-o",
        out,
        "--force",
    )
