from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemolite.model import cpu_kernels


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernels.enable():
        pytest.skip("no AVX512-BF16 CPU or no C++ compiler: the oneDNN path is used")
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
    weight = torch.randn(64, 96).bfloat16()
    for x in (torch.randn(3, 96).bfloat16(), torch.randn(1, 96)):  # batch > 1, fp32
        assert torch.equal(kernel.linear(x, weight.to(x.dtype), None), F.linear(x, weight.to(x.dtype)))


def test_usable_inside_a_compiled_graph(kernel):
    weight = torch.randn(256, 128).bfloat16()
    x = torch.randn(1, 128).bfloat16()
    compiled = torch.compile(lambda t: kernel.linear(t, weight, None).float().softmax(-1), fullgraph=True)
    assert torch.allclose(compiled(x), kernel.linear(x, weight, None).float().softmax(-1))
