"""``cl-tool prune``: zero the weights with the lowest scores (importance, magnitude or signal)."""

from cl_tool.workflows.prune import PruneArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.prune:run_prune"  # the workflow function, looked up each time the command runs

HELP = "Prune CHECKPOINT by stored or computed scores, or sweep sparsities and report accuracy."

EPILOG = """Examples:

  cl-tool prune b.safetensors --by importance --sparsity 0.9 -o b90.safetensors

  # b was trained from a: a's stored scores are accepted (lineage from b's history)
  cl-tool prune b.safetensors --by importance --importance a.importance.safetensors --sparsity 0.9 -o b90.safetensors

  cl-tool prune b.safetensors --by magnitude --sparsity 0.5 --scope layer --include-bias -o b50.safetensors --mask-out b50.mask.safetensors

  cl-tool prune b.safetensors --by signal --score-data ./task_b --sparsity 0.95 -o b95.safetensors

  cl-tool prune b.safetensors --by magnitude --by signal --by fisher --score-data ./train --data ./test --sweep 0.5,0.7,0.8,0.9,0.95,0.97,0.99 --plot curve.png --json

  # a continual learner: each task's accuracy and their mean, by the scores accumulated over both tasks
  cl-tool prune b.safetensors --by importance --by magnitude --sweep 0.5,0.7,0.9 --data A=./mnist::split=test --data B=./mnist::split=test,permute=1

  cl-tool prune r.safetensors --by magnitude --scope lamp --sparsity 0.9 --score-data ./train -o r90.safetensors

Scores: magnitude |w|; importance = the sidecar beside the checkpoint (or --importance: the checkpoint's own or an
ancestor's, see `cl-tool info SIDECAR --for CHECKPOINT`); fisher/mas/si/signal = a sidecar of
that method if given/found, else (fisher, mas, signal) computed on --score-data. Fisher, MAS and SI importances Ω
rank by Ω·w² (--rank auto; --rank raw: by Ω, the paper's). The k = floor(sparsity·N + 1/2) lowest-scored
weights are pruned; ties go to earlier tensors, then lower indices. By default only weight matrices and conv kernels are
pruned (not biases, norms, embeddings or the classifier).
"""
