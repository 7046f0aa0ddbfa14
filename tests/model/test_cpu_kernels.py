from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nemolite.model import cpu_kernels


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernels.enable():
        pytest.skip("no AVX2 + FMA CPU or no C++ compiler: the oneDNN path is used")
    return cpu_kernels


@pytest.mark.parametrize("rows, cols", [(4096, 1024), (1000, 96), (7, 4160)])
def test_gemv_matches_a_fp32_reference(kernel, rows, cols):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(rows, cols, generator=generator).bfloat16()
    x = torch.randn(1, cols, generator=generator).bfloat16()
    bias = torch.randn(rows, generator=generator).bfloat16()
    expected = F.linear(x.float(), weight.float(), bias.float())
    got = kernel.linear(x, weight, bias)
    assert got.shape == (1, rows) and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() <= 0.02 * expected.abs().max().item()


def test_other_shapes_fall_back_to_f_linear(kernel):
    weight = torch.randn(64, 96)
    x = torch.randn(3, 96)
    assert torch.equal(kernel.linear(x, weight, None), F.linear(x, weight))  # fp32
    odd = torch.randn(64, 100).bfloat16()  # K not a multiple of 32
    x = torch.randn(3, 100).bfloat16()
    assert torch.equal(kernel.linear(x, odd, None), F.linear(x, odd))


@pytest.mark.parametrize("rows", [2, 5, 64, 65, 130])
def test_bf16_rows_match_fp32_and_each_row_its_gemv(kernel, rows):
    """More than one bf16 row: where the CPU has no native bf16 GEMM, up to BF16_ROWS_KERNEL_MAX rows go
    through linear_bf16, which sums every output as the GEMV does (a row's bits do not depend on the
    batch), and more rows through an fp32 GEMM."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 1056, generator=generator).bfloat16()
    x = torch.randn(rows, 1056, generator=generator).bfloat16()
    bias = torch.randn(300, generator=generator).bfloat16()
    expected = F.linear(x.float(), weight.float(), bias.float())
    got = kernel.linear(x[None], weight, bias)[0]
    assert got.shape == (rows, 300) and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() <= 0.02 * expected.abs().max().item()
    if kernel.has("linear_bf16") and rows <= kernel.BF16_ROWS_KERNEL_MAX:
        for row in (0, rows - 1):
            assert torch.equal(got[row], kernel.linear(x[row:row + 1], weight, bias)[0])


def test_usable_inside_a_compiled_graph(kernel):
    weight = torch.randn(256, 128).bfloat16()
    x = torch.randn(1, 128).bfloat16()
    compiled = torch.compile(lambda t: kernel.linear(t, weight, None).float().softmax(-1), fullgraph=True)
    assert torch.allclose(compiled(x), kernel.linear(x, weight, None).float().softmax(-1))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 128, 48])  # 48: no vdpbf16ps, no fp32 fast path
def test_paged_decode_attention_matches_gathered_attention(kernel, dtype, tolerance, head_dim):
    from nemolite.model.layers import single_query_attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, groups, num_slots, width = 5, 16, 4, 300, 37
    key_cache, value_cache = (torch.randn(num_slots, groups, head_dim, generator=generator).to(dtype) for _ in range(2))
    q = torch.randn(batch, heads, head_dim, generator=generator).to(dtype)
    new_k, new_v = (torch.randn(batch, groups, head_dim, generator=generator).to(dtype) for _ in range(2))
    lengths = torch.tensor([0, 1, 17, 37, 5])  # 0: a padded row attends to its own token only
    slots = torch.randperm(num_slots, generator=generator)[:batch * width].reshape(batch, width)
    got = torch.ops.nemolite.decode_attention(q, key_cache, value_cache, slots, lengths, new_k, new_v, head_dim ** -0.5)
    keys = torch.cat([key_cache[slots].transpose(1, 2), new_k[:, :, None]], 2).float()
    values = torch.cat([value_cache[slots].transpose(1, 2), new_v[:, :, None]], 2).float()
    mask = torch.cat([torch.arange(width)[None] < lengths[:, None], torch.ones(batch, 1, dtype=torch.bool)], 1)
    expected = single_query_attention(q.float()[:, :, None], keys, values, mask[:, None, None])[:, :, 0]
    assert got.dtype == dtype and got.shape == q.shape
    assert (got.float() - expected).abs().max().item() <= tolerance


def test_store_rows_writes_every_layers_rows_at_their_slots(kernel):
    generator = torch.Generator().manual_seed(3)
    caches = [torch.randn(40, 2, 8, generator=generator).to(dtype) for dtype in (torch.bfloat16, torch.float32)]
    expected = [cache.clone() for cache in caches]
    slots = torch.tensor([7, 0, 39])
    rows = [torch.randn(3, 2, 8, generator=generator).to(cache.dtype) for cache in caches]
    for cache, row in zip(expected, rows):
        cache.index_copy_(0, slots, row)
    torch.ops.nemolite.store_rows(caches, slots, rows)
    assert all(torch.equal(got, want) for got, want in zip(caches, expected))
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.nemolite.store_rows(caches[:1], torch.tensor([40]), [rows[0][:1]])
    with pytest.raises(RuntimeError, match="dtype and row shape"):
        torch.ops.nemolite.store_rows(caches[:1], slots, [rows[1]])


@pytest.mark.parametrize("vocab", [1, 7, 8, 4096, 32003])
def test_greedy_rows_gives_torch_argmax_and_logsumexp(kernel, vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=generator) * 8
    logits[0, vocab // 2] = logits[0, vocab - 1] = 100.0  # a tie: the first index wins, as torch.argmax
    tokens, logsumexp = torch.ops.nemolite.greedy_rows(logits)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logsumexp, logits.logsumexp(-1), rtol=1e-6, atol=1e-6)


def test_greedy_rows_of_rows_with_infinities_and_nans(kernel):
    logits = torch.randn(4, 100)
    logits[0] = float("-inf")  # every token banned
    logits[1, 20] = float("inf")
    logits[2, 30] = logits[2, 60] = float("nan")  # the first NaN, as torch.argmax
    logits[3, :50] = float("-inf")
    tokens, logsumexp = torch.ops.nemolite.greedy_rows(logits)
    assert tokens.tolist() == logits.argmax(-1).tolist() == [0, 20, 30, logits[3].argmax().item()]
    want = logits.logsumexp(-1)
    assert logsumexp[:2].tolist() == [float("-inf"), float("inf")] and logsumexp[2].isnan()
    assert torch.allclose(logsumexp[3], want[3])
    with pytest.raises(RuntimeError, match="fp32 logits"):
        torch.ops.nemolite.greedy_rows(logits.double())


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start(kernel):
    """torch's build guard is a lock file that a build killed midway leaves behind; the next process then
    waited for it forever (seen: nemolite serve killed during its first start, every later start hung)."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(kernel.extension_name(), verbose=False)) / "lock"
    lock.touch()
    code = "from nemolite.model import cpu_kernels; assert cpu_kernels.load()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)  # cached: about a second
    assert not lock.exists()
