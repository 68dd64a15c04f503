"""Bad input to the public ops raises a clear exception that names the argument.

DESIGN.md: wrong device, dtype mix, shape mismatch, unsupported option ... raise a
``TypeError`` (wrong type or dtype), ``ValueError`` (wrong value, shape or device) or
``NotImplementedError`` (a valid request no backend here implements), never an
``assert``, a crash deep inside a kernel or a silent wrong answer. One test per case:
each checks the exception type and that the message names the offending argument.

A second device is simulated with the "meta" device, so everything runs on CPU.
"""

import pytest
import torch

import fast_attn

B, SQ, SK, H, HKV, D = 2, 5, 7, 6, 3, 11  # odd sizes, GQA (H % HKV == 0)


def qkv(dtype=torch.float32):
    q = torch.randn(B, SQ, H, D, dtype=dtype)
    k = torch.randn(B, SK, HKV, D, dtype=dtype)
    v = torch.randn(B, SK, HKV, D, dtype=dtype)
    return q, k, v


# ------------------------------------------------------------------------ attention


def test_attention_q_not_a_tensor():
    _, k, v = qkv()
    with pytest.raises(TypeError, match=r"\bq\b.*torch\.Tensor"):
        fast_attn.attention(k.tolist(), k, v)


def test_attention_integer_dtype():
    q, k, v = (torch.randint(-3, 4, (B, SQ, H, D)) for _ in range(3))
    with pytest.raises(TypeError, match=r"\bq\b.*dtype"):
        fast_attn.attention(q, k, v)


def test_attention_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"\bk\b.*dtype"):
        fast_attn.attention(q, k.half(), v)


def test_attention_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\bq\b.*4-dimensional"):
        fast_attn.attention(q[0], k, v)


def test_attention_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head_dim"):
        fast_attn.attention(q, k[..., :-1], v[..., :-1])


def test_attention_k_v_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\bk and v\b.*shape"):
        fast_attn.attention(q, k, v[:, :-1])


def test_attention_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\bk\b.*batch"):
        fast_attn.attention(q, k[:1], v[:1])


def test_attention_heads_not_multiple_of_kv_heads():
    q, _, _ = qkv()
    k = torch.randn(B, SK, 4, D)
    v = torch.randn(B, SK, 4, D)
    with pytest.raises(ValueError, match=r"query heads \(6\).*key/value heads \(4\)"):
        fast_attn.attention(q, k, v)


def test_attention_mask_not_broadcastable():
    q, k, v = qkv()
    mask = torch.randn(B, H, SQ, SK + 1)
    with pytest.raises(ValueError, match="attn_mask.*broadcastable"):
        fast_attn.attention(q, k, v, attn_mask=mask)


def test_attention_mask_integer_dtype():
    q, k, v = qkv()
    mask = torch.randint(0, 2, (SQ, SK), dtype=torch.int32)
    with pytest.raises(TypeError, match="attn_mask.*bool"):
        fast_attn.attention(q, k, v, attn_mask=mask)


def test_attention_window_entry_below_minus_one():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="window_size"):
        fast_attn.attention(q, k, v, window_size=(-2, 3))


@pytest.mark.parametrize("window_size", [3, (1, 2, 3), (1.0, 2)], ids=["int", "triple", "float"])
def test_attention_window_not_a_pair(window_size):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="window_size"):
        fast_attn.attention(q, k, v, window_size=window_size)


@pytest.mark.parametrize("dropout_p", [1.0, -0.1])
def test_attention_dropout_p_out_of_range(dropout_p):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout_p"):
        fast_attn.attention(q, k, v, dropout_p=dropout_p, dropout_seed=3)


def test_attention_softcap_negative():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="softcap"):
        fast_attn.attention(q, k, v, softcap=-1.5)


def test_attention_alibi_wrong_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="alibi_slopes.*shape"):
        fast_attn.attention(q, k, v, alibi_slopes=torch.rand(H + 1))


def test_attention_alibi_not_fp32():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="alibi_slopes.*float32"):
        fast_attn.attention(q, k, v, alibi_slopes=torch.rand(H, dtype=torch.float64))


def test_attention_tensors_on_different_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\bk\b.*same device"):
        fast_attn.attention(q, k.to("meta"), v)


def test_attention_bad_backend_name():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend.*'tritonn'"):
        fast_attn.attention(q, k, v, backend="tritonn")


def test_attention_bad_backend_env(monkeypatch):
    monkeypatch.setenv("FAST_ATTN_BACKEND", "cudnn")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="FAST_ATTN_BACKEND.*'cudnn'"):
        fast_attn.attention(q, k, v)


def test_attention_requested_backend_cannot_serve():
    q, k, v = qkv()
    # cuda never takes CPU tensors; the message says why and lists who can ('torch').
    with pytest.raises(NotImplementedError, match=r"cuda backend (is not available|does not take cpu).*'torch'"):
        fast_attn.attention(q, k, v, backend="cuda")


def test_attention_dropout_seed_negative():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout_seed"):
        fast_attn.attention(q, k, v, dropout_p=0.3, dropout_seed=-1)


# ----------------------------------------------------------------- attention_varlen


def varlen_inputs():
    """Three packed sequences: q lengths (3, 0, 4), k lengths (5, 2, 1)."""
    q = torch.randn(7, H, D)
    k = torch.randn(8, HKV, D)
    v = torch.randn(8, HKV, D)
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 8], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def test_varlen_cu_seqlens_not_int32():
    q, k, v, cu_q, cu_k = varlen_inputs()
    with pytest.raises(TypeError, match="cu_seqlens_q.*int32"):
        fast_attn.attention_varlen(q, k, v, cu_q.long(), cu_k, 4, 5)


def test_varlen_cu_seqlens_decreasing():
    q, k, v, cu_q, _ = varlen_inputs()
    cu_k = torch.tensor([0, 6, 5, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k.*non-decreasing"):
        fast_attn.attention_varlen(q, k, v, cu_q, cu_k, 4, 6)


def test_varlen_cu_seqlens_not_ending_at_total():
    q, k, v, _, cu_k = varlen_inputs()
    cu_q = torch.tensor([0, 3, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_q.*end at 7"):
        fast_attn.attention_varlen(q, k, v, cu_q, cu_k, 4, 5)


def test_varlen_cu_seqlens_lengths_differ():
    q, k, v, cu_q, _ = varlen_inputs()
    cu_k = torch.tensor([0, 5, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k"):
        fast_attn.attention_varlen(q, k, v, cu_q, cu_k, 4, 5)


def test_varlen_max_seqlen_too_small():
    q, k, v, cu_q, cu_k = varlen_inputs()
    with pytest.raises(ValueError, match=r"max_seqlen_q.*\b4\b"):
        fast_attn.attention_varlen(q, k, v, cu_q, cu_k, 3, 5)


# ----------------------------------------------------------- attention_with_kvcache

S_CACHE, S_NEW = 9, 2


def kvcache_inputs():
    q = torch.randn(B, 1, H, D)
    k_cache = torch.randn(B, S_CACHE, HKV, D)
    v_cache = torch.randn(B, S_CACHE, HKV, D)
    k = torch.randn(B, S_NEW, HKV, D)
    v = torch.randn(B, S_NEW, HKV, D)
    return q, k_cache, v_cache, k, v


def test_kvcache_seqlens_past_the_cache():
    q, k_cache, v_cache, k, v = kvcache_inputs()
    cache_seqlens = torch.tensor([3, S_CACHE - S_NEW + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens"):
        fast_attn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)


def test_kvcache_seqlens_wrong_dtype():
    q, k_cache, v_cache, k, v = kvcache_inputs()
    cache_seqlens = torch.tensor([3, 4], dtype=torch.int64)
    with pytest.raises(TypeError, match="cache_seqlens.*int32"):
        fast_attn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)


def test_kvcache_k_without_v():
    q, k_cache, v_cache, k, _ = kvcache_inputs()
    with pytest.raises(ValueError, match=r"\bk and v\b"):
        fast_attn.attention_with_kvcache(q, k_cache, v_cache, k, None, 3)


def test_kvcache_k_shape_mismatch_with_cache():
    q, k_cache, v_cache, k, v = kvcache_inputs()
    with pytest.raises(ValueError, match=r"\bk\b.*shape"):
        fast_attn.attention_with_kvcache(q, k_cache, v_cache, k[..., :-1], v[..., :-1], 3)


def test_kvcache_k_given_without_cache_seqlens():
    q, k_cache, v_cache, k, v = kvcache_inputs()
    with pytest.raises(ValueError, match="cache_seqlens"):
        fast_attn.attention_with_kvcache(q, k_cache, v_cache, k, v, None)


def test_kvcache_requires_grad():
    q, k_cache, v_cache, k, v = kvcache_inputs()
    with pytest.raises(NotImplementedError, match="attention_with_kvcache.*forward only"):
        fast_attn.attention_with_kvcache(q.requires_grad_(), k_cache, v_cache, k, v, 3)


# ---------------------------------------------------------------------------- norms

ROWS, N = 13, 7
NORMS = {"layer_norm": fast_attn.layer_norm, "rms_norm": fast_attn.rms_norm}


@pytest.mark.parametrize("op", NORMS)
def test_norm_weight_wrong_size(op):
    with pytest.raises(ValueError, match="weight.*shape"):
        NORMS[op](torch.randn(ROWS, N), torch.randn(N + 1))


def test_layer_norm_bias_wrong_size():
    with pytest.raises(ValueError, match="bias.*shape"):
        fast_attn.layer_norm(torch.randn(ROWS, N), torch.randn(N), torch.randn(N - 1))


@pytest.mark.parametrize("op", NORMS)
def test_norm_residual_shape_mismatch(op):
    with pytest.raises(ValueError, match="residual.*shape"):
        NORMS[op](torch.randn(ROWS, N), residual=torch.randn(1, N))


@pytest.mark.parametrize("op", NORMS)
def test_norm_residual_dtype_mismatch(op):
    x = torch.randn(ROWS, N, dtype=torch.float16)
    with pytest.raises(TypeError, match="residual.*dtype"):
        NORMS[op](x, residual=torch.randn(ROWS, N))


@pytest.mark.parametrize("op", NORMS)
def test_norm_eps_negative(op):
    with pytest.raises(ValueError, match="eps"):
        NORMS[op](torch.randn(ROWS, N), eps=-1e-5)


@pytest.mark.parametrize("op", NORMS)
def test_norm_integer_dtype(op):
    with pytest.raises(TypeError, match=r"\bx\b.*dtype"):
        NORMS[op](torch.randint(-5, 5, (ROWS, N)))


@pytest.mark.parametrize("op", NORMS)
def test_norm_zero_dim_tensor(op):
    with pytest.raises(ValueError, match=r"\bx\b.*dimension"):
        NORMS[op](torch.randn(()))


# ------------------------------------------------------------------------------ ffn


def test_bias_gelu_bias_wrong_size():
    with pytest.raises(ValueError, match="bias.*shape"):
        fast_attn.bias_gelu(torch.randn(ROWS, N), torch.randn(N + 2))


def test_bias_gelu_bias_dtype_mismatch():
    with pytest.raises(TypeError, match="bias.*dtype"):
        fast_attn.bias_gelu(torch.randn(ROWS, N), torch.randn(N, dtype=torch.float64))


@pytest.mark.parametrize("op", [fast_attn.bias_gelu, fast_attn.geglu], ids=["bias_gelu", "geglu"])
def test_gelu_approximate_unknown(op):
    x = torch.randn(ROWS, N)
    with pytest.raises(ValueError, match="approximate.*'fast'"):
        op(x, torch.randn(N) if op is fast_attn.bias_gelu else torch.randn(ROWS, N), approximate="fast")


@pytest.mark.parametrize("op", [fast_attn.swiglu, fast_attn.geglu], ids=["swiglu", "geglu"])
def test_glu_gate_up_shape_mismatch(op):
    with pytest.raises(ValueError, match=r"\bup\b.*shape"):
        op(torch.randn(ROWS, N), torch.randn(ROWS, N + 1))


@pytest.mark.parametrize("op", [fast_attn.swiglu, fast_attn.geglu], ids=["swiglu", "geglu"])
def test_glu_gate_up_dtype_mismatch(op):
    with pytest.raises(TypeError, match=r"\bup\b.*dtype"):
        op(torch.randn(ROWS, N), torch.randn(ROWS, N, dtype=torch.bfloat16))
