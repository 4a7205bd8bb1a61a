"""``cl-tool info``: what a checkpoint, importance sidecar, mask, resume state or timm folder holds."""

from cl_tool.workflows.info import InfoArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.info:run_info"  # the workflow function, looked up each time the command runs

HELP = "Describe cl-tool files from their headers: model, size, fingerprint, history, lineage, importances."

EPILOG = """Examples:

  cl-tool info b90.safetensors

  cl-tool info a.importance.safetensors --for b.safetensors

  cl-tool info b.safetensors a.importance.safetensors b90.mask.safetensors ./vit_folder --json

  cl-tool info b90.safetensors --verify --sparsity

Shown: the model (architecture, arguments, input shape, classes, normalisation), parameter count and
bytes by dtype, the fingerprint, the history (command, data, penalty, λ, time) and the lineage (the
recorded ancestors); for a sidecar its method, data, samples, accumulated tasks and the checkpoint it
belongs to. Only headers and metadata are read, unless --verify or --sparsity asks for the tensors.
A sidecar may be used by its own checkpoint and by the checkpoint's descendants (lineage from the
history, which is editable metadata: it prevents mistakes, it is not a signature).
"""
