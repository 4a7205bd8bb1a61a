"""``cl-tool init``: write a freshly initialised checkpoint for a built-in or timm architecture."""

from cl_tool.workflows.init import InitArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.init:run_init"  # the workflow function, looked up each time the command runs

HELP = "Create an initialised model checkpoint (random weights) that records how to rebuild the model."

EPILOG = """Examples:

  cl-tool init --arch mlp --arch-arg sizes=784,300,150,10 --input-shape 1x28x28 -o a0.safetensors

  cl-tool init --arch cnn --input-shape 1x28x28 --num-classes 10 -o cnn0.safetensors

  cl-tool init --arch vit_tiny_patch16_224 --arch-arg img_size=28 --arch-arg patch_size=4 --input-shape 1x28x28 --num-classes 10 -o vit0.safetensors

  cl-tool init --arch resnet18 --input-shape 3x32x32 --num-classes 100 -o r0.safetensors
"""
