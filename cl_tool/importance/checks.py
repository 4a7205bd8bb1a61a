"""Result checks shared by the importance code."""

from __future__ import annotations

import torch

from cl_tool.errors import BadInputError


def check_finite(result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``result`` unchanged; raise BadInputError naming the first non-finite parameter."""
    for name, t in result.items():
        if not bool(torch.isfinite(t).all()):
            raise BadInputError(
                f"The importance of parameter {name!r} is not finite (NaN or Inf): the model weights or the input data contain non-finite values or overflowed."
            )
    return result
