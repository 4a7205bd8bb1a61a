"""``cl-tool train-next``: train a checkpoint on the next task under an EWC-family penalty."""

from cl_tool.workflows.train_next import TrainNextArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.train_next:run_train_next"  # the workflow function, looked up each time the command runs

HELP = "Train CHECKPOINT on a new task with a penalty that keeps the old tasks (stabilized EWC by default)."

EPILOG = """Examples:

  # first task: no importance file beside a0.safetensors, so no penalty
  cl-tool train-next a0.safetensors --data ./task_a -o a.safetensors

  # next task with the stabilized penalty (a.importance.safetensors is found beside a.safetensors)
  cl-tool train-next a.safetensors --data ./task_b --lambda 200 -o b.safetensors

  # permuted-MNIST task 2 from one base dataset, SGD, cosine schedule, watch task A live
  cl-tool train-next a.safetensors --data ./mnist --split train[:8000] --permute 1 --optimizer sgd --lr 0.05 --schedule cosine --eval-data A=./mnist::split=train[8000:] -o b.safetensors

  # resumable batch job, also on several GPUs/processes
  torchrun --nproc-per-node 2 -m cl_tool train-next a.safetensors --data ./task_b --checkpoint-every 200 --resume -o b.safetensors

Penalties: stabilized c = λΩ/(2(1+ηλΩ)) (default), ewc c = λΩ/2, online-ewc (ewc with Ω decayed by importance --decay), none.
η is the learning rate in force at each step.
"""
