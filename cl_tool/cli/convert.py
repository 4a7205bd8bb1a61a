"""``cl-tool convert``: a timm folder (also one with only pytorch_model.bin) as one cl-tool checkpoint."""

from cl_tool.workflows.convert import ConvertArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.convert:run_convert"  # the workflow function, looked up each time the command runs

HELP = "Convert a timm model folder (config.json + model.safetensors or pytorch_model.bin) into a cl-tool checkpoint."

EPILOG = """Examples:

  cl-tool convert ./resnet18_folder -o r18.safetensors

  cl-tool convert ./downloaded_vit -o vit.safetensors --json

A pytorch_model.bin is a pickle: it is read only by this command, with torch.load(weights_only=True), which
builds tensors and refuses every other object, so no code in the file runs. Every other command reads
safetensors only.
"""
