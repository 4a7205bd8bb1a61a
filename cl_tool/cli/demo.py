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
    import os
    import shutil
    import tempfile

    from cl_tool.errors import OutputError, UsageError
    from cl_tool.output import emit_json, log

    if train < 1 or test < 1 or classes < 2:
        raise UsageError("--train and --test must be at least 1 and --classes at least 2.")
    if output.exists() and not force:
        raise OutputError(f"{output} already exists; pass --force to replace it or choose another folder.")
    parent = output.resolve().parent
    if not parent.is_dir():
        if parent.exists():
            raise OutputError(f"{output} cannot be written: {parent} is a file, not a folder; choose another path.")
        raise OutputError(f"The folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"The folder {parent} of {output} is not writable; choose a writable location.")
    import datasets

    datasets.disable_progress_bars()
    from cl_tool.demo import make_dataset

    dd = datasets.DatasetDict({"train": make_dataset(train, classes=classes, seed=seed), "test": make_dataset(test, classes=classes, seed=seed + 1)})
    import errno

    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".cl-tool-tmp-", dir=parent))
        dd.save_to_disk(str(tmp / "ds"))
        if output.is_dir() and not output.is_symlink():
            shutil.rmtree(output)
        elif output.exists() or output.is_symlink():
            output.unlink()
        (tmp / "ds").rename(output)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"No space left on the device while writing {output}; free some space and run again (nothing was written).") from exc
        raise OutputError(f"Could not write {output}: {exc.strerror or exc}; choose a writable location.") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"Wrote {output}: {train} train and {test} test images, 28x28, {classes} classes.")
    if json_out:
        emit_json({"output": str(output), "train": train, "test": test, "classes": classes})
