"""Data for cl-tool: ``--data`` sources in, normalised image batches out.

``--data`` accepts a folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict``), an
``imagefolder`` folder, parquet/csv/json(l) files, or a hub id (online only). An optional
``name=`` prefix names the task (``--data old=./task_a``).

Two ways in:

* ``open_task(spec, Preprocess.for_model(model_spec), cache=, workers=, streaming=, skip_bad=)``
  → ``Task``: the source is opened lazily (Arrow-backed ``datasets``, or an ``IterableDataset``
  with ``streaming``); ``Task.batches(order, augment=, seed=, epoch=, device=)`` decodes,
  resizes, augments, applies the task transforms and normalises per batch in DataLoader
  workers; decoded uint8 pixels are cached (in memory when small, in a cache file shared by
  later commands) so a task is decoded once, not once per command. See ``loader``, ``cache``,
  ``preprocess``, ``transforms``; ``GlobalBatchSampler`` gives training's batch order.
* ``load_task(spec, input_shape, mean, std)`` → ``TaskData``: the first version, the whole task
  as one float32 tensor (kept for the commands until they switch; the reference in tests).

Pixels: built-in models keep the first version's exact rules (``preprocess``); timm models use
timm's eval transform. Task-deriving transforms act on the [0, 1] image, in this order:
``--rotate DEG`` (counter-clockwise), ``--invert`` (x → 1 − x), ``--permute SEED`` (one fixed
permutation of the H·W pixel positions, the same for every channel and sample), after any
augmentation; then per-channel normalisation (x − mean) / std from the checkpoint.

Importing this package is cheap (no torch, timm or datasets until a function needs them).
"""

from __future__ import annotations

from cl_tool.data.cache import CACHE_MODES, RAM_BUDGET, default_cache_dir
from cl_tool.data.legacy import TaskData, load_task
from cl_tool.data.loader import Batch, Task, as_worker_error, check_labels, default_workers, open_task
from cl_tool.data.preprocess import Preprocess
from cl_tool.data.specs import IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES, TaskSpec, parse_data_option, parse_task_spec
from cl_tool.data.transforms import AUGMENTS, Augment, apply_task_transforms, parse_augment, pixel_permutation

__all__ = [
    "AUGMENTS", "Augment", "Batch", "CACHE_MODES", "GlobalBatchSampler", "IMAGE_COLUMN_NAMES", "LABEL_COLUMN_NAMES", "Preprocess",
    "RAM_BUDGET", "Task", "TaskData", "TaskSpec", "apply_task_transforms", "as_worker_error", "check_labels", "default_cache_dir",
    "default_workers", "load_task", "open_task", "parse_augment", "parse_data_option", "parse_task_spec", "pixel_permutation",
]


def __getattr__(name: str):
    if name == "GlobalBatchSampler":  # imports torch
        from cl_tool.data.samplers import GlobalBatchSampler

        return GlobalBatchSampler
    raise AttributeError(f"module 'cl_tool.data' has no attribute {name!r}")
