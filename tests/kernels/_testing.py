"""Tolerances and a comparison that names the tensor and reports its errors."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype of the inputs: float32 work is exact up to reduction order; a bf16 or fp16
# gradient is rounded to its dtype once, so its error is about one unit in the last place.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-4, 2e-3),
    torch.bfloat16: (2e-3, 1.6e-2),
}
# The loss itself is accumulated in float32 whatever the input dtype.
LOSS_TOLERANCE = (2e-5, 2e-5)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> None:
    """Elementwise |got - ref| <= atol + rtol * |ref|, reporting the worst absolute and relative error."""
    ref = torch.as_tensor(ref).detach().double().cpu()
    got = torch.as_tensor(got).detach().double().cpu()
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.equal(torch.isfinite(ref), torch.isfinite(got)), f"{name}: finite entries differ from the reference"
    finite = torch.isfinite(ref)
    assert torch.equal(ref[~finite], got[~finite]), f"{name}: non-finite entries differ from the reference"
    err = (got - ref)[finite].abs()
    abs_err = err.max().item() if err.numel() else 0.0
    scale = ref[finite].abs().max().item() if err.numel() else 0.0
    rel_err = abs_err / scale if scale > 0 else abs_err
    report = f"{name}: max abs err {abs_err:.3e}, rel err {rel_err:.3e} (atol {atol:.1e}, rtol {rtol:.1e})"
    print(report)
    bad = err > atol + rtol * ref[finite].abs()
    assert not bad.any(), f"{report}; {int(bad.sum())} of {err.numel()} elements out of tolerance"


def assert_close_norm(name: str, ref: torch.Tensor, got: torch.Tensor, limit: float) -> None:
    """||got - ref|| / ||ref|| <= limit (for matmul outputs of rounded operands, where an elementwise relative
    bound is meaningless: one rounding flip of an operand moves entries that cancel to near zero)."""
    ref = torch.as_tensor(ref).detach().double().cpu()
    got = torch.as_tensor(got).detach().double().cpu()
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite entries"
    err = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    print(f"{name}: norm-wise rel err {err:.3e} (limit {limit:.1e})")
    assert err <= limit, f"{name}: norm-wise relative error {err:.3e} > {limit:.1e}"
