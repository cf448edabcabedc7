"""Float comparisons that hold across torch versions, BLAS builds and thread counts.

Two fp32 computations of the same function by different kernels (a newer torch, another summation order) agree to
a few units in the last place of the output's magnitude, not bit for bit. ``assert_close_scaled`` allows
``ulps`` machine epsilons of the dtype, relative to each element and to the largest expected magnitude.
"""

import torch


def tolerance(expected: torch.Tensor, dtype: torch.dtype | None = None, ulps: float = 64) -> tuple[float, float]:
    """(rtol, atol) for comparing against ``expected`` computed in ``dtype`` (default: its own dtype)."""
    eps = torch.finfo(dtype or expected.dtype).eps
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    return ulps * eps, ulps * eps * scale


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                        ulps: float = 64) -> None:
    rtol, atol = tolerance(expected, dtype, ulps)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
