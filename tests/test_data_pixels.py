"""Pixels at their scale: value ranges are read, not assumed; a declared ``::scale=MAX`` / ``--pixel-scale``; never a clip.

The reference is always the same pictures as 8-bit PNGs: a representation of them on another
scale (float 0..16, 16-bit integers, 16-bit PNG, float TIFF) must decode to the same pixels, or
be refused with the observed range and the option that declares it.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch

from cl_tool.data import Preprocess, TaskSpec, open_task, task_specs
from cl_tool.data.specs import DataOptions
from cl_tool.errors import BadInputError
from tests._data_util import arrays, collect

N = 60  # test images of the demo data


def _pre(c: int = 1) -> Preprocess:
    return Preprocess.builtin((c, 28, 28), (0.0,) * c, (1.0,) * c)  # x is the [0, 1] pixel value itself


def pixels(path, c: int = 1, streaming: bool = False, **spec) -> torch.Tensor:
    task = open_task(TaskSpec(str(path), **spec), _pre(c), cache="none", workers=0, streaming=streaming)
    with task:
        return collect(task, batch_size=16)[1]


def refused(path, c: int = 1, streaming: bool = False, **spec) -> str:
    with pytest.raises(BadInputError) as err:
        pixels(path, c, streaming, **spec)
    return err.value.render(lambda n: "--pixel-scale" if n == "scale" else f"--{n.replace('_', '-')}")


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    colour = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def image_dataset(path, images, labels):
    """A save_to_disk Dataset with an Image column of PIL images (modes Pillow cannot write as PNG are stored as TIFF)."""
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats).save_to_disk(str(path))
    return path


def in_folder_order(x: torch.Tensor, labels) -> torch.Tensor:
    """Rows of the N pictures in the order an imagefolder of ``{label}/{index:03d}.png`` files lists them."""
    return x[sorted(range(len(labels)), key=lambda i: (labels[i], i))]


def folder_of(path, files: dict[str, bytes]):
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def same(tmp_path_factory, demo_dir):
    """The first N demo test pictures (uint8 k) as PNGs and in other representations of the same pixels."""
    import datasets
    from PIL import Image

    d = tmp_path_factory.mktemp("pixels")
    test = datasets.load_from_disk(str(demo_dir))["test"].select(range(N))
    test.save_to_disk(str(d / "png"))
    k = np.stack([np.asarray(img, dtype=np.uint8) for img in test["image"]])  # (N, 28, 28)
    kf = k.astype(np.float64)
    y = [int(v) for v in test["label"]]
    rgb = np.stack([k, 255 - k, k[:, ::-1]], axis=-1)  # (N, 28, 28, 3)
    return {
        "k": k,
        "y": y,
        "png": d / "png",
        "f16": arrays(d / "f16", (kf * 16 / 255).tolist(), y),  # float64 on 0..16
        "f16_32": arrays(d / "f16_32", (kf * 16 / 255).astype(np.float32).tolist(), y),  # float32 on 0..16
        "f255": arrays(d / "f255", kf.tolist(), y),  # float on 0..255
        "u16bit": arrays(d / "u16bit", (k.astype(np.int64) * 257).tolist(), y),  # 16-bit integers
        "png8": folder_of(d / "png8", {f"{y[i]}/{i:03d}.png": _png(Image.fromarray(k[i])) for i in range(N)}),
        "png16": folder_of(
            d / "png16", {f"{y[i]}/{i:03d}.png": _png(Image.fromarray(k[i].astype(np.uint16) * 257)) for i in range(N)}
        ),
        "rgb8": folder_of(d / "rgb8", {f"{y[i]}/{i:03d}.png": _png(Image.fromarray(rgb[i])) for i in range(N)}),
        "rgb16": folder_of(
            d / "rgb16", {f"{y[i]}/{i:03d}.png": png16(rgb[i].astype(np.uint16) * 257) for i in range(N)}
        ),
    }


# ----------------------------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("key", ["f16", "f16_32"])
def test_float_arrays_on_0_16_are_refused_naming_the_range_and_the_option(same, key):
    msg = refused(same[key])
    assert "float pixel values from 0 to 16, but float pixels are read on 0..1" in msg
    assert "::scale=MAX" in msg and "--pixel-scale MAX" in msg and "e.g. ::scale=16" in msg


@pytest.mark.parametrize("key,scale", [("f16", 16), ("f16_32", 16), ("f255", 255), ("u16bit", 65535)])
def test_a_declared_scale_gives_the_pngs_pixels(same, key, scale):
    want = pixels(same["png"])
    assert torch.equal(pixels(same[key], scale=scale), want)  # v / MAX is exactly the PNG's k / 255
    assert float(want.max()) == 1.0  # the pictures use the whole range: a clip would show


def test_integer_arrays(tmp_path, same):
    rng = np.random.default_rng(3)
    y = list(range(8))
    u8 = arrays(tmp_path / "u8", same["k"][:8].tolist(), y)  # 0..255: read as 8-bit, unchanged
    assert torch.equal(pixels(u8), pixels(same["png"])[:8])
    small = rng.integers(0, 17, (8, 28, 28)).astype(np.uint8)
    small[0, 0, 0] = 16
    digits = arrays(tmp_path / "digits", small.tolist(), y)  # 0..16 (scikit-learn's digits)
    msg = refused(digits)
    assert "integer pixel values from 0 to 16, less than half of 0..255, so their scale is unclear" in msg
    assert "e.g. ::scale=16, or ::scale=255 for dark 8-bit pictures" in msg
    assert torch.equal(pixels(digits, scale=16), torch.from_numpy(small.astype(np.float32) / 16).unsqueeze(1))
    as_8bit = pixels(digits, scale=255)  # declared 8-bit: dark pictures, read as they are
    assert torch.equal(as_8bit, torch.from_numpy(small).unsqueeze(1).float() / 255)
    binary = arrays(tmp_path / "binary", (small > 8).astype(np.int64).tolist(), y)  # 0/1 integers: ambiguous too
    assert "from 0 to 1, less than half" in refused(binary)
    assert torch.equal(pixels(binary, scale=1), torch.from_numpy((small > 8).astype(np.float32)).unsqueeze(1))
    wide = rng.integers(0, 1001, (8, 28, 28))
    wide[0, 0, 0] = 1000
    w = arrays(tmp_path / "wide", wide.tolist(), y)
    assert "integer pixel values from 0 to 1000, beyond 8 bits (0..255)" in refused(w)
    assert torch.allclose(pixels(w, scale=1000), torch.from_numpy(wide / 1000).float().unsqueeze(1), atol=0, rtol=1e-6)


def test_values_outside_the_scale_are_refused_never_clipped(tmp_path):
    y = [0, 1, 2]
    base = np.full((3, 28, 28), 0.5)
    cases = [  # (values, spec, expected message part)
        (base - 1.0, {}, "float pixel values from -0.5 to -0.5, but pixel values start at 0"),  # normalised data
        (np.concatenate([base[:2], base[2:] * 0 - 3], 0), {}, "from -3 to 0.5, but pixel values start at 0"),
        (base * 34, {"scale": 16}, "pixel values from 17 to 17, outside the declared scale 0..16"),
        (base * 2.02, {}, "float pixel values from 1.01 to 1.01, but float pixels are read on 0..1"),
        (
            np.where(base > 0, -5, 0).astype(np.int64),
            {"scale": 255},
            "from -5 to -5, outside the declared scale 0..255",
        ),
    ]
    for i, (values, spec, part) in enumerate(cases):
        path = arrays(tmp_path / f"c{i}", values.tolist(), y)
        assert part in refused(path, **spec), (i, refused(path, **spec))
    nan = base.copy()
    nan[1, 3, 3] = np.nan
    assert "has NaN or infinite pixel values" in refused(arrays(tmp_path / "nan", nan.tolist(), y))
    inf = base.copy()
    inf[2, 0, 0] = np.inf
    assert "has NaN or infinite pixel values" in refused(arrays(tmp_path / "inf", inf.tolist(), y), scale=16)


def test_booleans_are_0_and_1(tmp_path):
    mask = np.random.default_rng(0).random((3, 28, 28)) > 0.5
    assert torch.equal(
        pixels(arrays(tmp_path / "b", mask.tolist(), [0, 1, 2])), torch.from_numpy(mask).float().unsqueeze(1)
    )


def test_a_stream_is_checked_per_batch(same, tmp_path):
    msg = refused(same["f16"], streaming=True)
    assert "(streamed rows 0..15) has float pixel values from 0 to 16, but float pixels are read on 0..1" in msg
    assert torch.equal(pixels(same["f16"], streaming=True, scale=16), pixels(same["png"]))
    vals = np.tile(same["k"][:1].astype(np.int64), (40, 1, 1))
    vals[37, 5, 5] = 300  # a value beyond 8 bits in the third batch
    msg = refused(arrays(tmp_path / "late", vals.tolist(), [0] * 40), streaming=True)
    assert "(streamed rows 32..39) has integer pixel values from 0 to 300, beyond 8 bits" in msg


# ----------------------------------------------------------------------------------------------- images


def test_16_bit_pngs_decode_as_the_8_bit_pngs(same):
    want = pixels(same["png8"])
    assert torch.equal(pixels(same["png16"]), want)  # 257·k → k (not binarised by convert("L"))
    assert torch.equal(want, in_folder_order(pixels(same["png"]), same["y"]))  # the same pictures as the dataset
    assert torch.equal(pixels(same["rgb16"], c=3), pixels(same["rgb8"], c=3))
    assert torch.equal(pixels(same["png16"], c=3), pixels(same["png8"], c=3))  # grey 16-bit for an RGB model


def test_16_bit_values_are_rounded_to_the_nearest_8_bit_value(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    v = rng.integers(0, 65536, (4, 28, 28)).astype(np.uint16)
    grey = folder_of(tmp_path / "g", {f"{i % 2}/{i}.png": _png(Image.fromarray(v[i])) for i in range(4)})
    order = [0, 2, 1, 3]  # the folder lists class 0 (images 0, 2), then class 1
    want = np.rint(v[order].astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert torch.equal(pixels(grey), torch.from_numpy(want).unsqueeze(1).float() / 255)
    rgb = np.stack([v, v[:, ::-1], v[:, :, ::-1]], -1)
    colour = folder_of(tmp_path / "c", {f"{i % 2}/{i}.png": png16(rgb[i]) for i in range(4)})
    want_rgb = np.rint(rgb[order].astype(np.float64) * 255 / 65535).transpose(0, 3, 1, 2)
    got = pixels(colour, c=3).numpy() * 255  # Pillow reads 16-bit RGB by its high byte: within one level
    assert np.abs(got - want_rgb).max() <= 1 + 1e-4


def test_float_and_32_bit_images(same, tmp_path):
    from PIL import Image

    k, y = same["k"][:6], same["y"][:6]
    want = pixels(same["png"])[:6]
    unit = image_dataset(tmp_path / "F", [Image.fromarray(k[i] / np.float32(255)) for i in range(6)], y)  # mode F
    assert torch.equal(pixels(unit), want)  # round(255 · k/255) = k
    f16 = image_dataset(
        tmp_path / "F16", [Image.fromarray((k[i] * 16.0 / 255).astype(np.float32)) for i in range(6)], y
    )
    msg = refused(f16)
    assert "(PIL mode F) has float pixel values from 0 to" in msg and "float pixels are read on 0..1" in msg
    assert torch.equal(pixels(f16, scale=16), want)
    big_endian = [
        Image.frombytes("I;16B", (28, 28), (k[i].astype(np.uint16) * 257).astype(">u2").tobytes()) for i in range(6)
    ]
    assert torch.equal(pixels(image_dataset(tmp_path / "be", big_endian, y)), want)  # stored as TIFF, mode I;16B
    i32 = image_dataset(tmp_path / "I", [Image.fromarray(k[i].astype(np.int32) * 257) for i in range(6)], y)  # mode I
    assert torch.equal(pixels(i32), want)
    big = image_dataset(tmp_path / "Ibig", [Image.fromarray(k[i].astype(np.int32) * 1000) for i in range(6)], y)
    assert "(PIL mode I) has integer pixel values from 0 to 255000, beyond 16 bits (0..65535)" in refused(big)
    assert torch.equal(pixels(big, scale=255000), want)


def test_a_scale_declared_for_8_bit_images(tmp_path):
    from PIL import Image

    v = np.random.default_rng(2).integers(0, 17, (4, 28, 28)).astype(np.uint8)  # digits 0..16 saved raw as PNG
    path = folder_of(tmp_path / "d", {f"{i % 2}/{i}.png": _png(Image.fromarray(v[i])) for i in range(4)})
    want = np.rint(v[[0, 2, 1, 3]].astype(np.float64) * 255 / 16).astype(np.uint8)
    assert torch.equal(pixels(path, scale=16), torch.from_numpy(want).unsqueeze(1).float() / 255)
    assert "outside the declared scale 0..8" in refused(path, scale=8)


# ----------------------------------------------------------------------------------------------- options and CLI


def test_scale_option_and_key():
    (a, b) = task_specs(["x", "y::scale=16"], DataOptions(scale=255.0))
    assert a.scale == 255 and b.scale == 16 and b.describe()["pixel_scale"] == 16
    (c,) = task_specs(["x"], DataOptions())
    assert c.scale is None


def test_the_scale_is_part_of_the_cache_key(same, tmp_path):
    pre = _pre()
    for scale, divisor in ((16, 16), (32, 32)):
        task = open_task(TaskSpec(str(same["f16"]), scale=scale), pre, cache="disk", workers=0, cache_dir=tmp_path)
        with task:
            x = collect(task, batch_size=32)[1]
        assert task.stats["decoded"] == N  # another scale: not served from the first one's cache file
        want = torch.from_numpy((same["k"] * 16.0 / 255 / divisor).astype(np.float32)).unsqueeze(1)
        assert torch.allclose(x, want, atol=1e-7)


def test_evaluate_on_float_digits(cli, small_mlp, same):
    r = cli("evaluate", small_mlp, "--data", same["f16"], "--device", "cpu")
    assert r.code == 3 and "from 0 to 16" in r.error_line and "--pixel-scale MAX" in r.error_line, r.err
    runs = [
        ["--data", same["png"]],
        ["--data", f"{same['f16']}::scale=16"],
        ["--data", same["f16"], "--pixel-scale", "16"],
        ["--data", same["png16"]],
        ["--data", same["png8"]],
    ]
    res = []
    for extra in runs:
        r = cli("evaluate", small_mlp, *extra, "--device", "cpu", "--cache", "none", "--json")
        assert r.code == 0, r.err
        res.append(json.loads(r.out))
    acc = [x["accuracy"][0][0] for x in res]
    loss = [x["loss"][0][0] for x in res]
    assert acc[0] > 0.2 and acc == [acc[0]] * len(runs)  # the same pictures: the same accuracy ...
    assert loss == pytest.approx([loss[0]] * len(runs), rel=1e-6)  # ... and loss
    r = cli("evaluate", small_mlp, "--data", f"{same['png']}::scale=-1", "--device", "cpu")
    assert r.code == 2 and "::scale=-1: scale must be a positive number" in r.error_line
    r = cli("evaluate", small_mlp, "--data", same["png"], "--pixel-scale", "0", "--device", "cpu")
    assert r.code == 2 and "--pixel-scale must be a positive number" in r.error_line
