"""Data for cl-tool: ``--data`` sources in, normalised image batches out.

``--data`` accepts a folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict``), an
``imagefolder`` folder, parquet/csv/json(l) files, or a hub id (online only). An optional
``name=`` prefix names the task (``--data old=./task_a``).

The way in:

* ``open_task(spec, Preprocess.for_model(model_spec), cache=, workers=, streaming=, skip_bad=)``
  → ``Task``: the source is opened lazily (Arrow-backed ``datasets``, or an ``IterableDataset``
  with ``streaming``); ``Task.batches(order, augment=, seed=, epoch=, device=)`` decodes,
  resizes, augments, applies the task transforms and normalises per batch in DataLoader
  workers; decoded uint8 pixels are cached (in memory when small, in a cache file shared by
  later commands) so a task is decoded once, not once per command. See ``loader``, ``cache``,
  ``preprocess``, ``transforms``; ``GlobalBatchSampler`` gives training's batch order.
* ``task_specs(values, DataOptions)`` → TaskSpecs: what ``--data`` values and the data options ask for.

Pixels: built-in models keep the first version's exact rules (``preprocess``); timm models use
timm's eval transform. Task-deriving transforms act on the [0, 1] image, in this order:
``--rotate DEG`` (counter-clockwise), ``--invert`` (x → 1 − x), ``--permute SEED`` (one fixed
permutation of the H·W pixel positions, the same for every channel and sample), after any
augmentation; then per-channel normalisation (x − mean) / std from the checkpoint.

Importing this package is cheap (no torch, timm or datasets until a function needs them).
"""

from __future__ import annotations

from pathlib import Path

from cl_tool.data.cache import CACHE_MODES, RAM_BUDGET, default_cache_dir
from cl_tool.data.loader import Batch, Task, check_labels, open_task
from cl_tool.data.preprocess import Preprocess
from cl_tool.data.specs import (
    DATA_HELP,
    DATA_METAVAR,
    IMAGE_COLUMN_NAMES,
    LABEL_COLUMN_NAMES,
    DataOptions,
    TaskSpec,
    check_unique_names,
    local_paths,
    parse_data_option,
    task_specs,
)
from cl_tool.data.transforms import AUGMENTS, Augment, apply_task_transforms, parse_augment, pixel_permutation
from cl_tool.data.workers import as_worker_error, default_workers
from cl_tool.errors import ClToolError, OutputError

__all__ = [
    "AUGMENTS",
    "Augment",
    "Batch",
    "CACHE_MODES",
    "DATA_HELP",
    "DATA_METAVAR",
    "DataOptions",
    "GlobalBatchSampler",
    "IMAGE_COLUMN_NAMES",
    "LABEL_COLUMN_NAMES",
    "Preprocess",
    "RAM_BUDGET",
    "Task",
    "TaskSpec",
    "apply_task_transforms",
    "as_worker_error",
    "check_labels",
    "check_unique_names",
    "default_cache_dir",
    "default_workers",
    "local_paths",
    "match_task",
    "open_task",
    "open_tasks",
    "parse_augment",
    "parse_data_option",
    "pixel_permutation",
    "task_specs",
]


def match_task(task: Task, model_spec, *, log=None):
    """Map ``task``'s labels to ``model_spec``'s output rows by class name (:mod:`cl_tool.data.classes`); check them
    against its number of classes; log a note when positions stand in for names or the task covers fewer classes
    than the model has. Returns the ClassMap."""
    import numpy as np

    from cl_tool.data.classes import match_classes, present_ids

    raw = task._raw_labels
    cmap = match_classes(
        task.class_names,
        present_ids(raw) if raw is not None else None,
        model_spec.class_names,
        model_spec.num_classes,
        what=f"${task.spec.option} {task.spec.source}",
    )
    task.map_classes(cmap.lookup)
    check_labels(task, model_spec.num_classes)
    if log is not None:
        if cmap.note:
            log(cmap.note)
        if task.labels is not None and task.labels.numel():
            have = len(np.unique(task.labels.numpy()))
            if have < model_spec.num_classes:
                log(
                    f"${task.spec.option} {task.spec.source} holds {have} of the model's {model_spec.num_classes} classes; "
                    f"its accuracy is over those classes only."
                )
    return cmap


def open_tasks(
    specs: list[TaskSpec],
    model_spec,
    options: DataOptions,
    *,
    num_classes: int | None = None,
    log=None,
    match: bool = False,
) -> list[Task]:
    """Every spec opened for ``model_spec``'s preprocessing with the data options.

    ``match``: labels mapped to the model's classes by name and checked (:func:`match_task`); else, with
    ``num_classes``, only checked against it. ``log``: called with each task's summary line and its notes.
    """
    _refuse_cache_inside_data(specs, options)

    pre = Preprocess.for_model(model_spec)
    tasks: list[Task] = []
    for spec in specs:
        try:
            task = open_task(
                spec,
                pre,
                cache=options.cache,
                workers=options.workers,
                streaming=options.streaming,
                skip_bad=options.skip_bad_images,
                cache_dir=options.cache_dir,
            )
        except ClToolError as exc:  # the sources speak of "$data": name the option this spec came from
            if spec.option != "data":
                exc.message = exc.message.replace("$data ", f"${spec.option} ")
            for task in tasks:
                task.close()
            raise
        tasks.append(task)
        if log is not None:
            log(task.summary())
            for note in task.info.get("notes") or ():
                log(note)
        try:
            if match:
                match_task(task, model_spec, log=log)
            elif num_classes is not None:
                check_labels(task, num_classes)
        except ClToolError:
            for t in tasks:
                t.close()
            raise
    return tasks


_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _model_folder_around(folder: Path) -> Path | None:
    """The nearest of ``folder`` and its parents that holds a timm model (config.json and weights), or None."""
    for candidate in (folder, *folder.parents):
        if (candidate / "config.json").is_file() and any((candidate / f).is_file() for f in _MODEL_FILES):
            return candidate
    return None


def _refuse_cache_inside_data(specs: list[TaskSpec], options: DataOptions) -> None:
    """The decoded cache is never written into a data folder nor a model folder, nor over a file (exit 6)."""
    if options.cache == "none":
        return

    given = Path(options.cache_dir or default_cache_dir()).expanduser()
    if given.exists() and not given.is_dir():
        raise OutputError(
            f"The decoded-image cache folder {given} is a file, not a folder; set $cache_dir (or $CL_TOOL_CACHE) to a "
            f"folder, or use $cache none."
        )
    folder = given.resolve()
    model = _model_folder_around(folder)
    if model is not None:
        raise OutputError(
            f"The decoded-image cache folder {folder} is inside the model folder {model}; cl-tool never writes into a "
            f"model folder: set $cache_dir (or $CL_TOOL_CACHE) to a folder outside it, or use $cache none."
        )
    for spec in specs:
        source = Path(spec.source)
        if source.is_dir():
            data = source.resolve()
            if folder == data or data in folder.parents:
                raise OutputError(
                    f"The decoded-image cache folder {folder} is inside ${spec.option} {spec.source}; cl-tool never "
                    f"writes into a data folder: set $cache_dir (or $CL_TOOL_CACHE) to a folder outside it, or use $cache none."
                )


def __getattr__(name: str):
    if name == "GlobalBatchSampler":  # imports torch
        from cl_tool.data.samplers import GlobalBatchSampler

        return GlobalBatchSampler
    raise AttributeError(f"module 'cl_tool.data' has no attribute {name!r}")
