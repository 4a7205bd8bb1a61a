"""``cl-tool demo-data``: a small synthetic MNIST-like dataset on disk (no download) for the quickstart and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_tool.atomic import atomic_folder, check_output
from cl_tool.demo import make_dataset
from cl_tool.output import Output
from cl_tool.params import Args, argument, force_option, option
from cl_tool.runtime import seed_option


@dataclass(kw_only=True)
class DemoDataArgs(Args):
    output: Path = argument(
        metavar="FOLDER", help="Folder to create (a datasets.save_to_disk DatasetDict with train and test splits)."
    )
    train: int = option(2000, "--train", metavar="N", low=1, high=1_000_000, help="Training images.")
    test: int = option(500, "--test", metavar="N", low=1, high=1_000_000, help="Test images.")
    classes: int = option(10, "--classes", metavar="N", low=2, high=1000, help="Number of classes.")
    seed: int = seed_option()
    force: bool = force_option()


def run_demo_data(args: DemoDataArgs, out: Output) -> dict[str, Any]:
    """Write 28x28 grey images of noisy class prototypes (see ``cl_tool.demo``) as train and test splits."""
    import datasets  # not at the top: `cl-tool --help` imports no datasets

    check_output(args.output, force=args.force, role="the output folder", folder=True)
    datasets.disable_progress_bars()
    splits = datasets.DatasetDict(
        {
            "train": make_dataset(args.train, classes=args.classes, seed=args.seed),
            "test": make_dataset(args.test, classes=args.classes, seed=args.seed + 1),
        }
    )
    with atomic_folder(args.output, force=args.force) as tmp:
        splits.save_to_disk(str(tmp))
    out.log(f"Wrote {args.output}: {args.train} train and {args.test} test images, 28x28, {args.classes} classes.")
    return out.result({"output": str(args.output), "train": args.train, "test": args.test, "classes": args.classes})
