"""``cl-tool demo-data``: write a small synthetic dataset (no download) for the quickstart."""

from cl_tool.workflows.demo_data import DemoDataArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.demo_data:run_demo_data"  # the workflow function, looked up each time the command runs

HELP = "Write synthetic 28x28 grey images of noisy class prototypes (MNIST-like layout) to a folder."

EPILOG = """Examples:

  cl-tool demo-data ./demo                      # 2,000 train + 500 test images, 28x28, 10 classes

  cl-tool demo-data ./demo --train 8000 --test 2000 --seed 1
"""
