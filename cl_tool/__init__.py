"""cl-tool: continual learning from the shell (stabilized EWC, weight importances, pruning).

Implements Kutalev & Lapina (2021), arXiv:2109.10021. Importing this package must stay
cheap: torch, timm and datasets are imported inside the functions that need them.
"""

__version__ = "0.1.0"
