"""Reproduce the data-trust cases of real MNIST layouts: labels by class name, the split evaluated, subsets.

    python tests/benchmarks/data_trust.py --data /path/to/mnist-idx-folder [--work runs/data_trust]

Builds from the MNIST test split (10,000 images; the first 8,000 train, the last 2,000 test) an imagefolder of PNGs
(``train/<digit>``, ``test/<digit>``), the same test folder holding only digits 5..9, one with an empty class
folder and a class folder that is a symbolic link, and a ``save_to_disk`` DatasetDict; trains the paper MLP for
2 epochs and prints what each command reports (the numbers a correct tool must give side by side). Not a test:
it needs the MNIST files, which only the benchmark machines have.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import read_idx


def cl(*args, work: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "cl_tool", *map(str, args)], capture_output=True, text=True, cwd=work, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"cl-tool {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout) if "--json" in args else {"stderr": proc.stderr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", required=True, help="folder with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
    )
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="data-trust-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CL_TOOL_CACHE", str(work / "cache"))

    import datasets
    import numpy as np
    from PIL import Image

    images, labels = read_idx(args.data)
    folders = {"full": work / "mnist_png", "five_to_nine": work / "test_5to9", "odd": work / "test_odd"}
    if not (folders["full"] / "test").exists():
        for i, (img, lab) in enumerate(zip(images, labels)):
            split = "train" if i < 8000 else "test"
            targets = [folders["full"] / split / str(lab)]
            if split == "test" and lab >= 5:
                targets.append(folders["five_to_nine"] / "test" / str(lab))
            if split == "test" and lab != 7:
                targets.append(folders["odd"] / "test" / str(lab))
            for d in targets:
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img, mode="L").save(d / f"{i:05d}.png")
        (folders["odd"] / "test" / "3_empty").mkdir()
        (folders["odd"] / "test" / "7").symlink_to(folders["full"] / "test" / "7", target_is_directory=True)
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})

        def part(lo, hi):
            return datasets.Dataset.from_dict(
                {"image": [Image.fromarray(a, mode="L") for a in images[lo:hi]], "label": labels[lo:hi].tolist()},
                features=feats,
            )

        datasets.DatasetDict({"train": part(0, 8000), "test": part(8000, 10000)}).save_to_disk(str(work / "mnist_hf"))

    a0, a = work / "a0.safetensors", work / "a.safetensors"
    cl("init", "--arch", "mlp", "--arch-arg", "sizes=784,300,150,10", "--seed", "0", "-o", a0, "--force", work=work)
    r = cl("train-next", a0, "--data", folders["full"], "--epochs", "2", "-o", a, "--force", "--json", work=work)
    print(
        f"train-next read split {r['data']['split']} ({r['data']['samples']} samples, {len(r['data']['classes'])} classes)"
    )

    ev = cl(
        "evaluate",
        a,
        "--data",
        f"ALL={folders['full']}",
        "--data",
        f"D5_9={folders['five_to_nine']}",
        "--data",
        f"ODD={folders['odd']}",
        "--data",
        f"HF={work / 'mnist_hf'}",
        "--json",
        work=work,
    )
    for name, acc, d in zip(ev["tasks"], ev["accuracy"][0], ev["data"]):
        print(
            f"evaluate {name}: accuracy {acc:.4f} on split {d['split']} ({d['samples']} samples, {len(d['classes'])} classes)"
        )

    # the accuracy on digits 5..9 within the full test folder: one-class folders (links into it), weighted by count
    per_class = {}
    full_ds = folders["full"]
    counts = cl("evaluate", a, "--data", full_ds, "--json", work=work)["data"][0]["classes"]
    for digit in range(5, 10):
        only = work / f"only_{digit}"
        if not only.exists():
            (only / "test").mkdir(parents=True)
            (only / "test" / str(digit)).symlink_to(full_ds / "test" / str(digit), target_is_directory=True)
        per_class[digit] = cl("evaluate", a, "--data", only, "--json", work=work)["accuracy"][0][0]
    n59 = sum(counts[str(d)] for d in range(5, 10))
    weighted = sum(per_class[d] * counts[str(d)] for d in range(5, 10)) / n59
    print(f"digits 5..9 within the full folder (class-weighted from one-class folders): {weighted:.4f}")

    sidecars = {}
    for key, extra in (
        ("full", ()),
        ("random500", ("--samples", "500")),
        ("first500", ("--samples", "500", "--first-samples")),
    ):
        out = work / f"fisher_{key}.safetensors"
        r = cl("importance", a, "--data", folders["full"], "-o", out, "--force", "--json", *extra, work=work)
        sidecars[key] = out
        print(f"importance {key}: {r['samples']} samples over {len(r['data']['classes'])} classes")
    from safetensors.numpy import load_file

    flat = {k: np.concatenate([v.ravel() for _, v in sorted(load_file(str(p)).items())]) for k, p in sidecars.items()}
    for key in ("random500", "first500"):
        rel = float(np.abs(flat[key] - flat["full"]).sum() / np.abs(flat["full"]).sum())
        print(f"Fisher of {key} vs the full task: relative L1 difference {rel:.3f}")


if __name__ == "__main__":
    main()
