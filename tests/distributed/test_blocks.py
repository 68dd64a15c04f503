"""fast_attn.distributed without processes: the block relations against a brute-force mask,
the step plans, the LSE merge, the layouts, the import isolation and the no-group error."""

import itertools
import subprocess
import sys

import pytest
import torch

from fast_attn.distributed import _blocks, layout
from fast_attn.distributed._blocks import block_relation, keep_mask, merge_, plan_blocks


def _global_keep(q_start, q_len, k_start, k_len, causal, window):
    i = torch.arange(q_start, q_start + q_len)[:, None]
    j = torch.arange(k_start, k_start + k_len)[None, :]
    keep = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window[0] >= 0:
        keep &= j >= i - window[0]
    if window[1] >= 0:
        keep &= j <= i + window[1]
    return keep


def test_block_relation_is_the_global_rule_on_every_small_pair():
    # every pair of pieces (starts, lengths 1..4) under causal x window: the trimmed block
    # with the op's bottom-right causal/window reproduces the global mask exactly
    for q_start, q_len, k_start, k_len in itertools.product(range(0, 9, 3), range(1, 5), range(0, 9, 2), range(1, 5)):
        for causal, window in itertools.product((False, True), itertools.product((-1, 0, 1, 3), repeat=2)):
            expected = _global_keep(q_start, q_len, k_start, k_len, causal, window)
            rel = block_relation(q_start, q_len, k_start, k_len, causal, window)
            got = torch.zeros_like(expected)
            if rel is not None:
                block = keep_mask(rel.q1 - rel.q0, rel.k1 - rel.k0, rel.causal, rel.left, rel.right, "cpu")
                got[rel.q0:rel.q1, rel.k0:rel.k1] = block
                assert block.any(dim=1).all(), "a kept row must see a key"
                assert rel.left >= -1 and rel.right >= -1
            assert torch.equal(got, expected), (q_start, q_len, k_start, k_len, causal, window, rel)


def test_zigzag_causal_steps_are_one_call_off_the_diagonal():
    world, local = 4, 10
    for rank, source in itertools.product(range(world), repeat=2):
        q = layout.dense_pieces("zigzag", rank, world, local)
        k = layout.dense_pieces("zigzag", source, world, local)
        calls = plan_blocks(q, k, causal=True, window=(-1, -1))
        if source == rank:  # diagonal, full, diagonal
            assert sorted(c.causal for c in calls) == [False, True, True]
        else:
            assert len(calls) == 1 and not calls[0].causal
            rows = calls[0].q_rows.stop - calls[0].q_rows.start
            keys = calls[0].k_rows.stop - calls[0].k_rows.start
            assert rows * keys == local * local // 2  # balanced: half the block on every step


def test_contiguous_causal_skips_later_blocks():
    calls = plan_blocks(layout.dense_pieces("contiguous", 0, 2, 6), layout.dense_pieces("contiguous", 1, 2, 6),
                        causal=True, window=(-1, -1))
    assert calls == []


def test_merge_gives_the_softmax_of_the_union_and_keeps_empty_rows_finite():
    torch.manual_seed(0)
    s = torch.randn(1, 2, 5, 7, dtype=torch.float64)  # (B, H, rows, keys)
    v = torch.randn(1, 7, 2, 3, dtype=torch.float64)
    s[:, :, 4] = float("-inf")  # row 4 sees no key at all

    def part(cols):
        lse = torch.logsumexp(s[..., cols], dim=-1)  # (B, H, rows)
        p = torch.exp(s[..., cols] - lse[..., None]).nan_to_num(0.0)
        return torch.einsum("bhik,bkhd->bihd", p, v[:, cols]), lse

    acc_out = torch.zeros(1, 5, 2, 3, dtype=torch.float64)
    acc_lse = torch.full((1, 2, 5), float("-inf"), dtype=torch.float64)
    for cols in (slice(0, 3), slice(3, 7)):
        merge_(acc_out, acc_lse, *part(cols))
    out, lse = part(slice(0, 7))
    torch.testing.assert_close(acc_out, out)
    torch.testing.assert_close(acc_lse, lse)
    assert torch.isneginf(acc_lse[:, :, 4]).all() and (acc_out[:, 4] == 0).all()


@pytest.mark.parametrize("name", layout.LAYOUTS)
def test_varlen_plan_covers_every_row_once(name):
    cu = torch.tensor([0, 1, 1, 4, 17, 20], dtype=torch.int32)  # lengths 1, 0, 3, 13, 3
    for world in (1, 2, 4):
        plan = layout.varlen_shard_plan(cu, world, name)
        rows = torch.cat(plan.rows)
        assert torch.equal(rows.sort().values, torch.arange(20))
        for rank in range(world):
            assert int(plan.cu_seqlens[rank][-1]) == len(plan.rows[rank]) == plan.totals[rank]
            for piece in plan.pieces[rank]:  # the rows a piece stores are its global positions
                start = int(cu[piece.seq]) + piece.global_start
                assert torch.equal(plan.rows[rank][piece.local_start:piece.local_start + piece.length],
                                   torch.arange(start, start + piece.length))


def test_dense_positions_tile_the_sequence():
    for name, world in itertools.product(layout.LAYOUTS, (1, 2, 3)):
        positions = torch.cat([layout.dense_positions(name, r, world, 12) for r in range(world)])
        assert torch.equal(positions.sort().values, torch.arange(12 * world))
    assert layout.dense_positions("zigzag", 0, 2, 4).tolist() == [0, 1, 6, 7]


def test_plain_block_backward_equals_autograd_with_global_statistics():
    # a block whose softmax is normalised by a larger (global) LSE: the gradients of
    # out_global restricted to this block's keys, by autograd on the whole row
    torch.manual_seed(1)
    q = torch.randn(1, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True)
    scale, cap = 8 ** -0.5, 2.0
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    s = cap * torch.tanh(torch.einsum("bihd,bjhd->bhij", q, kk) * scale / cap)
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", p, vv)
    lse = torch.logsumexp(s, dim=-1)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    call = _blocks.BlockCall(slice(None), slice(None), False, -1, -1)
    opts = _blocks.BlockOptions(scale, cap, False, "torch")
    parts = [_blocks.plain_block_bwd(dout, q.detach(), k[:, c].detach(), v[:, c].detach(), out.detach(), lse.detach(),
                                     call, opts, None) for c in (slice(0, 4), slice(4, 9))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], dq)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], dim=1), dk)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]], dim=1), dv)


def test_import_fast_attn_does_not_import_the_distributed_package():
    code = "import sys, fast_attn; print('fast_attn.distributed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_without_a_process_group_the_error_says_what_to_do():
    from fast_attn.distributed import ring_attention, shard_sequence, ulysses_attention

    assert not torch.distributed.is_initialized()
    x = torch.randn(1, 8, 2, 16)
    for fn in (ring_attention, ulysses_attention):
        with pytest.raises(RuntimeError, match="init_process_group"):
            fn(x, x, x)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        shard_sequence(x)
