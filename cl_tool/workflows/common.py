"""Steps shared by the command workflows: load a checkpoint + model, load tasks with a progress bar."""

from __future__ import annotations

from typing import Any

from cl_tool.output import Progress


def load_model(path) -> tuple[Any, Any]:
    """(Checkpoint, nn.Module) for a checkpoint path, validated."""
    from cl_tool.checkpoint import instantiate, load_checkpoint

    ckpt = load_checkpoint(path)
    return ckpt, instantiate(ckpt)


def load_tasks(specs, model_spec, *, num_classes: int | None = None, what: str = "--data") -> list:
    """Load every TaskSpec as tensors for ``model_spec``; check labels against ``num_classes``."""
    from cl_tool.data import check_labels, load_task

    tasks = []
    for spec in specs:
        with Progress(f"loading {spec.name or spec.source}", None) as bar:
            task = load_task(spec, tuple(model_spec.input_shape), model_spec.mean, model_spec.std, progress=bar.advance)
        if num_classes is not None:
            check_labels(task, num_classes, what)
        tasks.append(task)
    return tasks


def register_data(roles, specs, role: str) -> None:
    """Register the local files and folders behind ``specs`` (TaskSpecs) as inputs of ``roles`` (hub ids are not local)."""
    import os

    for spec in specs:
        if os.path.lexists(spec.source):
            roles.input(spec.source, role)


def trainable(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
