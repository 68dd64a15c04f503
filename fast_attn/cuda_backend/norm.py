"""The "cuda" backend of LayerNorm/RMSNorm: the backend interface over csrc/norm/
(``torch.ops.fast_attn.cuda_norm_fwd`` / ``cuda_norm_bwd``).

The raw ops read rows with any strides and weight/bias of any float dtype, and return
empty tensors for absent outputs (h without residual, mean for RMSNorm), which become
None here as the interface says.
"""

from __future__ import annotations

from fast_attn.cuda_backend import ops


def norm_fwd(op, x, weight, bias, residual, eps):
    """(y, h or None, mean or None, rstd)."""
    rms = op == "rms_norm"
    y, h, mean, rstd = ops().cuda_norm_fwd(x, residual, weight, None if rms else bias, eps, rms)
    return y, (h if residual is not None else None), (None if rms else mean), rstd


def norm_bwd(op, dy, dh, inp, weight, bias, mean, rstd, eps):
    """(dx including dh, dweight or None, dbias or None)."""
    rms = op == "rms_norm"
    mean = rstd.new_empty((0,)) if mean is None else mean  # the schema takes a tensor
    dx, dweight, dbias = ops().cuda_norm_bwd(dy, dh, inp, weight, mean, rstd, rms, bias is not None)
    if bias is not None and dbias.dtype != bias.dtype:
        dbias = dbias.to(bias.dtype)  # the kernel writes dbias in the weight's dtype
    return dx, (dweight if weight is not None else None), (dbias if bias is not None else None)
