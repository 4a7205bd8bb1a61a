"""``cl-tool demo-data``: write a small synthetic dataset (no download) for the quickstart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cl_tool.cli._common import ForceOpt, JsonOpt, SeedOpt

EPILOG = """Examples:

  cl-tool demo-data ./demo                      # 2,000 train + 500 test images, 28x28, 10 classes

  cl-tool demo-data ./demo --train 8000 --test 2000 --seed 1
"""


def demo_data(
    output: Annotated[Path, typer.Argument(help="Folder to create (a datasets.save_to_disk DatasetDict with train and test splits).")],
    train: Annotated[int, typer.Option("--train", help="Training images.")] = 2000,
    test: Annotated[int, typer.Option("--test", help="Test images.")] = 500,
    classes: Annotated[int, typer.Option("--classes", help="Number of classes.")] = 10,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
):
    """Write synthetic 28x28 grey images of noisy class prototypes (MNIST-like layout) to a folder."""
    from cl_tool.atomic import atomic_folder, check_output
    from cl_tool.errors import UsageError
    from cl_tool.output import emit_json, log

    if not (1 <= train <= 1_000_000 and 1 <= test <= 1_000_000 and 2 <= classes <= 1000):
        raise UsageError("--train and --test must be between 1 and 1,000,000 and --classes between 2 and 1000.")
    check_output(output, force=force, role="the output folder", folder=True)
    import datasets

    datasets.disable_progress_bars()
    from cl_tool.demo import make_dataset

    dd = datasets.DatasetDict({"train": make_dataset(train, classes=classes, seed=seed), "test": make_dataset(test, classes=classes, seed=seed + 1)})
    with atomic_folder(output, force=force) as tmp:
        dd.save_to_disk(str(tmp))
    log(f"Wrote {output}: {train} train and {test} test images, 28x28, {classes} classes.")
    if json_out:
        emit_json({"output": str(output), "train": train, "test": test, "classes": classes})
