"""``cl-tool importance``: compute weight importances Ω and write a sidecar file."""

from cl_tool.workflows.importance import ImportanceArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.importance:run_importance"  # the workflow function, looked up each time the command runs

HELP = "Compute importances Ω of CHECKPOINT's parameters on a dataset and write them to a sidecar file."

EPILOG = """Examples:

  cl-tool importance a.safetensors --data ./task_a --method fisher

  cl-tool importance b.safetensors --data ./task_b --method fisher --accumulate a.importance.safetensors

  cl-tool importance b.safetensors --data ./task_b --method fisher --fisher-labels exact --samples 2000

  cl-tool importance b.safetensors --data ./task_b --method mas --mas-output softmax --accumulate a.importance.safetensors --decay 0.9

  cl-tool importance b.safetensors --data ./task_b --method signal -o b.signal.safetensors

Methods (Ω per parameter, exact per-sample statistics):
  fisher     mean over samples of (∂ log p(y|x)/∂θ)²; labels empirical (true y), sampled (y ~ p(·|x)) or exact (Σ_y p(y|x)·g_y²)
  mas        mean over samples of |∂ ‖f(x)‖²/∂θ|, f = logits or softmax
  signal     |w| times the total absolute input signal that reached w (paper §4); bias: total |output|
  magnitude  |w|
  si         collected while training: use `train-next --si-out FILE`
"""
