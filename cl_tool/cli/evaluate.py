"""``cl-tool evaluate``: accuracy of checkpoints on tasks, and continual-learning summaries."""

from cl_tool.workflows.evaluate import EvaluateArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.evaluate:run_evaluate"  # the workflow function, looked up each time the command runs

HELP = "Accuracy and loss of each checkpoint on each task, with average accuracy, BWT and forgetting."

EPILOG = """Examples:

  cl-tool evaluate a.safetensors b.safetensors --data A=./task_a --data B=./task_b

  cl-tool evaluate t1.safetensors t2.safetensors t3.safetensors --data ./mnist::split=train[8000:] --data ./mnist::split=train[8000:],permute=1 --data ./mnist::split=train[8000:],permute=2 --json

  cl-tool evaluate a.safetensors b.safetensors --data A=./task_a --data B=./task_b --fail-over-forgetting 0.05 --csv r.csv --plot r.png

Rows are checkpoints (stage i), columns tasks (j); R[i][j] is accuracy. With k checkpoints and m tasks:
  average accuracy  ACC = (1/m) Σ_j R[k-1][j]
  backward transfer BWT = (1/(m-1)) Σ_{j<m-1} (R[m-1][j] - R[j][j])           (k = m; Lopez-Paz & Ranzato 2017)
  forgetting        f_j = max_{l<k-1} R[l][j] - R[k-1][j], averaged over j < k-1 (Chaudhry et al. 2018)
  learning accuracy LA  = (1/m) Σ_j R[j][j]                                    (k = m)
"""
