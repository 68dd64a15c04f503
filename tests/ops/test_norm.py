"""LayerNorm and RMSNorm (with the fused residual add) on every backend against the reference.

The cases come from ``fast_attn.testing_cases`` (shared with ``python -m fast_attn.verify``):
widths 1, 7, 33, 129, 1023, 1024 and past the kernels' register paths; prime row counts;
fp16/bf16/fp32; weight, bias, residual present and absent; fp32 parameters with bf16
input; row-strided and non-viewable (copied) layouts. Each runs through
``fast_attn.layer_norm`` / ``rms_norm`` with ``backend=`` each of "torch", "triton",
"cuda" (skipped where unavailable or the features are not declared), forward and
backward, compared with the DESIGN.md tolerance rule (``fast_attn.testing``): y, and
dx, dresidual, dweight, dbias (the parameter gradients, sums over rows, with a floor
of one ulp at the sum of |terms|); h must be the fp32 sum rounded to nearest even; the
inputs unchanged; every fresh allocation NaN-filled.

On CPU the triton backend runs under the Triton interpreter, bf16 included (the norm
kernels have no tl.dot), on the ``quick`` cases; ``pytest -m gpu`` adds the GPU sweep
(widths up to 65536, both sides of every schedule threshold, 65537 rows, misaligned
rows, mixed parameter dtypes). ``test_correctly_rounded`` checks widths 1 and 7 in
bf16/fp16 against fp64 within half an ulp (plus fp32 slack). Schedules, statistics and
raw kernels: test_norm_triton_specific.py and test_norm_cuda_specific.py.
"""

from __future__ import annotations

import pytest
import torch

from fast_attn import testing_cases as tc

ON_GPU = torch.cuda.is_available()
SPECS = tc.norm_specs(ON_GPU)


@pytest.mark.parametrize("backend", tc.BACKEND_NAMES)
@pytest.mark.parametrize("case", tc.pytest_params(SPECS))
def test_matches_reference(case, backend):
    tc.assert_matches_reference(case, backend)


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values in the binade of each fp64 ``exact`` value."""
    finfo = torch.finfo(dtype)
    binade = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(finfo.smallest_normal))))
    return finfo.eps * binade


@pytest.mark.parametrize("backend", tc.BACKEND_NAMES)
@pytest.mark.parametrize("weight", [False, True], ids=["plain", "weight"])
@pytest.mark.parametrize("width", [1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_correctly_rounded(op, dtype, width, weight, backend):
    """y within half an ulp of the fp64 result, up to the fp32 arithmetic before the one
    final rounding (a few fp32 ulps of the terms: y = xhat * w is formed from normalised
    values of order 1, so a y near 0 after cancellation carries fp32 error of order 1, not
    of |y|; ATen's LayerNorm shows 0.508 ulp at y = -0.003 in fp16): a second rounding
    (e.g. a truncating fp32 -> bf16 conversion) shows as a whole ulp. Width 1 is RMSNorm's
    worst case: y = sign(x) (1 - d) with d ~ eps / 2x^2, just below 1, where bf16's ulp
    is 2^-8."""
    spec = tc.NormSpec(op, 512, width, str(dtype).replace("torch.", ""), weight=weight, bias=False)
    case = tc.build(spec)
    reason = tc.skip_reason(case, backend)
    if reason:
        pytest.skip(reason)
    device = tc.device_for(backend)
    inputs = case.make(torch.device(device), torch.Generator().manual_seed(0))
    y = case.run(inputs, backend)["y"].double().cpu()
    exact = case.ref({k: v.double() for k, v in inputs.items()}, True)["y"].cpu()
    terms = exact.abs().clamp(min=1.0)
    if "weight" in inputs:
        terms = terms * inputs["weight"].double().abs().max().clamp(min=1.0)
    slack = 8 * torch.finfo(torch.float32).eps * terms
    excess = (y - exact).abs() - (0.5 * ulp(exact, dtype) + slack)
    worst = int(excess.argmax())
    assert float(excess.max()) <= 0, (
        f"{op} {dtype} width {width}: y {float(y.flatten()[worst])!r} vs exact {float(exact.flatten()[worst])!r}: "
        f"{float(((y - exact).abs() / ulp(exact, dtype)).max()):.3f} ulp"
    )
