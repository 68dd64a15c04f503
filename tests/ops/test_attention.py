"""Attention (dense, varlen, kv-cache) on every backend against the reference.

The cases come from ``fast_attn.testing_cases`` (the generator ``python -m fast_attn.verify``
uses too): odd lengths 1, 17, 113, 203; Sq != Sk both ways; head dims 40, 72, 111; GQA
and MQA; windows, ALiBi, softcap, bool/additive masks with fully masked rows, dropout,
deterministic backward; transposed, sliced, packed and misaligned layouts; varlen with
zero-length sequences; the kv-cache append with per-row lengths and stale NaN/inf rows.

Each case runs through the public API with ``backend=`` each of "torch", "triton",
"cuda", skipped where the backend is unavailable here or does not declare the case's
features (``fast_attn.backends.CAPABILITIES``). Outputs (out, lse, the appended caches)
and gradients (dq, dk, dv) are compared with the DESIGN.md tolerance rule
(``fast_attn.testing``; oracle fp64, baseline the reference in the input dtype), with
every fresh allocation NaN-filled (``testing_cases.nan_poisoned``) so unwritten elements
show; inputs must come back unchanged; rows with no key give out 0, lse -inf, dq 0.

CPU: the triton backend runs under the Triton interpreter (tests/conftest.py), on the
``quick`` cases in fp16/fp32 only (the interpreter multiplies raw bf16 bits in tl.dot:
bf16 attention kernels are checked on a GPU). GPU (``pytest -m gpu``): the GPU sweeps of
the generator too, every backend; Triton kernels pinned to one tile per shape
(``pin_triton_tiles``) instead of autotuning every bucket. Backend-specific behaviour is in
test_attention_triton_specific.py and test_attention_cuda_specific.py.
"""

from __future__ import annotations

import pytest
import torch

from fast_attn import testing_cases as tc

ON_GPU = torch.cuda.is_available()
SPECS = tc.attention_specs(ON_GPU) + tc.varlen_specs(ON_GPU) + tc.kvcache_specs(ON_GPU)


@pytest.fixture
def pin_triton_tiles(monkeypatch):
    """On a GPU, pins each Triton attention kernel to the first tile its pruning keeps for
    a case, so the sweep compiles one tile per variant instead of autotuning every
    shape bucket. (Reads the launcher's tile tables: adapt with triton_kernels/attention.py.)"""

    def pin(case: tc.Case):
        if not ON_GPU:
            return
        import triton

        from fast_attn.triton_kernels import attention as triton_attention

        spec = case.spec
        seqlen_q = max(spec.lens_q) if isinstance(spec, tc.VarlenSpec) else spec.seqlen_q
        block_d = max(triton.next_power_of_2(spec.head_dim), triton_attention.MIN_BLOCK)
        args = dict(BLOCK_D=block_d, Q=torch.empty(0, dtype=case.dtype),
                    tune_seqlen_q=triton_attention._tune_bucket(seqlen_q))
        overrides = {}
        for name, tiles, backward in (
            ("_attn_fwd_kernel", triton_attention._FWD_TILES, False),
            ("_attn_bwd_dkdv_kernel", triton_attention._BWD_TILES, True),
            ("_attn_bwd_dq_kernel", triton_attention._FWD_TILES, False),
        ):
            fits = [t for t in tiles if triton_attention._config_fits(*t, args, backward=backward)] or [tiles[-1]]
            bm, bn, warps, stages = fits[0]
            overrides[name] = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        monkeypatch.setattr(triton_attention, "TILE_OVERRIDE", overrides)

    return pin


@pytest.mark.parametrize("backend", tc.BACKEND_NAMES)
@pytest.mark.parametrize("case", tc.pytest_params(SPECS))
def test_matches_reference(case, backend, pin_triton_tiles):
    tc.assert_matches_reference(case, backend, before=pin_triton_tiles if backend == "triton" else None)


def test_cases_cover_the_design():
    """The generator keeps the awkward shapes DESIGN.md asks for, with unique ids."""
    specs = tc.attention_specs(True) + tc.varlen_specs(True) + tc.kvcache_specs(True)
    dense = [s for s in specs if isinstance(s, tc.AttentionSpec)]
    assert {1, 17, 113, 203} <= {s.seqlen_q for s in dense} | {s.seqlen_k for s in dense}
    assert any(s.seqlen_q > s.seqlen_k for s in dense) and any(s.seqlen_q < s.seqlen_k for s in dense)
    assert {40, 72, 111} <= {s.head_dim for s in dense if s.quick}
    assert any(s.kv_heads == 1 < s.heads for s in dense) and any(1 < s.kv_heads < s.heads for s in dense)
    assert {"bhsd", "sliced", "packed", "misaligned"} <= {s.layout for s in dense if s.quick}
    assert set(tc.MASKS) <= {s.mask for s in dense if s.quick}
    labels = [tc.label(s) for s in specs]
    assert len(labels) == len(set(labels))
