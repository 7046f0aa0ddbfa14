"""The quantized linear kernels (nemolite/csrc/quant_kernels.cpp) against two references: their own
scalar path, and a Python model of the same arithmetic (activations rounded to int8 per block of 32,
exact integer dot products, one scale product per block) - plus the dequantize op against the torch
dequantiser of nemolite.quant.linear."""

from __future__ import annotations

import pytest
import torch

from nemolite.model import cpu_kernels
from nemolite.quant import quantize_weight
from nemolite.quant.linear import QuantizedLinear, dequantize_reference, pack_int4, unpack_int4


@pytest.fixture(scope="module")
def ops():
    if not cpu_kernels.has("linear_int4"):
        pytest.skip("no C++ compiler or not an x86 CPU: quantized layers dequantize and run a GEMM")
    return torch.ops.nemolite


def python_reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic in float64: x rounded per block of 32 (d = amax / 127, round half to even),
    integer dot products with the stored values, weight scale x d per block (per group of 16 for int8
    groups of 16), the int4 zero point through d x sum(q) of the block."""
    rows, k = x.shape
    blocks = x.double().reshape(rows, k // 32, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    d = (amax.float() / 127).double()  # the kernel divides in fp32
    inverse = torch.where(amax > 0, (127 / amax.float()).double(), torch.zeros_like(amax))
    xq = torch.round((blocks.float() * inverse.float()).double())  # the product is fp32 in the kernel
    group = layer.group_size
    scales = layer.scales.double().repeat_interleave(group, dim=1)  # per column
    if layer.method == "int8":
        values = layer.qweight.double()
        products = torch.einsum("rbj,nbj->rnbj", xq, values.reshape(-1, k // 32, 32))
        scale_columns = scales.reshape(-1, k // 32, 32)
        per_block = (products * scale_columns[None]).sum(dim=3)  # a scale is constant over >= 16 columns
        return (per_block * d[:, None, :, 0]).sum(dim=2).float()
    values = unpack_int4(layer.qweight).double().reshape(-1, k // 32, 32)
    dots = torch.einsum("rbj,nbj->rnb", xq, values)
    block_scales = scales.reshape(-1, k // 32, 32)[:, :, 0]
    zero = (-8 * block_scales if layer.mins is None else
            layer.mins.double().repeat_interleave(group, dim=1).reshape(-1, k // 32, 32)[:, :, 0])
    sums = d[:, :, 0] * xq.sum(dim=2)  # [rows, blocks]
    return (dots * block_scales[None] * d[:, None, :, 0] + zero[None] * sums[:, None, :]).sum(dim=2).float()


def run(ops, layer: QuantizedLinear, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
    if layer.method == "int8":
        return ops.linear_int8(x, layer.qweight, layer.scales, layer.group_size, reference)
    return ops.linear_int4(x, layer.qweight, layer.scales, layer.mins, layer.group_size, reference)


LAYOUTS = [("int8", None, True), ("int4", 32, True), ("int4", 64, False), ("int4", 128, True), ("int4", 128, False)]


# The int4 kernel takes blocks in pairs, four pairs a step: 256 columns is one step; 224 (7 blocks) leaves
# three pairs and an odd block, 384 (12 blocks) a step and two pairs.
SHAPES = [(*layout, columns) for layout in LAYOUTS for columns in (256, 224, 384) if columns % (layout[1] or 32) == 0]


@pytest.mark.parametrize("method, group, symmetric, columns", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_its_scalar_path_and_the_python_model(ops, method, group, symmetric, columns, rows, dtype):
    generator = torch.Generator().manual_seed(rows * 7 + (group or 0) + columns)
    weight = torch.randn(72, columns, generator=generator) * 0.05
    layer = quantize_weight(weight, method, group, symmetric)
    x = (torch.randn(rows, columns, generator=generator) * 3).to(dtype)
    simd, scalar = run(ops, layer, x), run(ops, layer, x, reference=True)
    assert simd.dtype == dtype and simd.shape == (rows, 72)
    expected = python_reference(layer, x.float())
    scale = expected.abs().max()
    assert (scalar.float() - expected).abs().max() <= 1e-5 * scale + (0.01 * scale if dtype == torch.bfloat16 else 0)
    assert (simd.float() - scalar.float()).abs().max() <= 1e-5 * scale + (0.01 * scale if dtype == torch.bfloat16 else 0)
    # and what it approximates: the float product, to the activation rounding's ~0.5 %
    exact = x.float() @ layer.dequantize().T
    assert ((simd.float() - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_int8_groups_of_16_and_32_as_gguf_q6_k_and_q8_0(ops, scale_dtype):
    generator = torch.Generator().manual_seed(3)
    values = torch.randint(-128, 128, (40, 512), generator=generator, dtype=torch.int8)  # -128 too (GGUF may hold it)
    for group in (16, 32, 512):
        scales = (torch.rand(40, 512 // group, generator=generator) * 0.01 + 1e-3).to(scale_dtype)
        layer = QuantizedLinear.from_int8(values, scales)
        assert layer.group_size == group
        x = torch.randn(2, 512, generator=generator)
        expected = python_reference(layer, x)
        for got in (run(ops, layer, x), run(ops, layer, x, reference=True)):
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_dequantize_op_equals_the_torch_dequantiser(ops):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 192, generator=generator)
    for method, group, symmetric in LAYOUTS[:3]:
        layer = quantize_weight(weight, method, group or None, symmetric)
        reference = dequantize_reference(layer)
        assert torch.equal(layer.dequantize(torch.float32), reference)
        assert torch.equal(layer.dequantize(torch.bfloat16), reference.bfloat16())


def test_forward_takes_the_kernel_for_few_rows_and_the_gemm_for_many(ops):
    from nemolite.quant import kernels

    generator = torch.Generator().manual_seed(9)
    layer = quantize_weight(torch.randn(64, 128, generator=generator), "int4", 32, True,
                            bias=torch.randn(64, generator=generator))
    few = torch.randn(2, kernels.GEMV_MAX_ROWS // 2, 128, generator=generator)
    expected = few @ layer.dequantize().T + layer.bias
    got = layer(few)
    assert got.shape == (2, kernels.GEMV_MAX_ROWS // 2, 64)
    assert ((got - expected).norm() / expected.norm()) < 0.02 and not torch.allclose(got, expected, atol=1e-6)
    many = torch.randn(kernels.GEMV_MAX_ROWS + 1, 128, generator=generator)
    assert torch.allclose(layer(many), many @ layer.dequantize().T + layer.bias, atol=1e-4)


def test_bad_layouts_are_refused_not_misread(ops):
    layer = quantize_weight(torch.randn(8, 64), "int4", 32, True)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.linear_int4(torch.randn(1, 48), layer.qweight, layer.scales, None, 32)
    with pytest.raises(RuntimeError, match="scales must be"):
        ops.linear_int4(torch.randn(1, 64), layer.qweight, layer.scales[:, :1].contiguous(), None, 32)
    with pytest.raises(RuntimeError, match="int8"):
        ops.linear_int8(torch.randn(1, 64), layer.qweight, layer.scales, 32)


def test_int4_packing_is_ggufs_q4_0_layout():
    values = torch.arange(64).remainder(16).reshape(1, 64)
    packed = pack_int4(values)
    assert packed.shape == (1, 32)
    assert packed[0, 0] == (values[0, 0] | values[0, 16] << 4)  # byte j: column j low, column j + 16 high
    assert torch.equal(unpack_int4(packed), values.to(torch.uint8))


def test_the_kernel_row_limit_is_measured_once_per_dtype_and_method(ops, monkeypatch):
    from nemolite.quant import kernels

    monkeypatch.delenv("NEMOLITE_QUANT_KERNEL_ROWS")
    monkeypatch.setattr(kernels, "_max_rows", {})
    rows = kernels.max_kernel_rows(torch.float32)
    int4_rows = kernels.max_kernel_rows(torch.float32, "int4")
    assert {rows, int4_rows} <= {kernels.GEMV_MAX_ROWS, *kernels.CANDIDATE_ROWS}
    assert kernels._max_rows == {(torch.float32, "int8"): rows, (torch.float32, "int4"): int4_rows}
    monkeypatch.setenv("NEMOLITE_QUANT_KERNEL_ROWS", "33")
    assert kernels.max_kernel_rows(torch.float32) == rows  # cached
    assert kernels.max_kernel_rows(torch.float32, "int4") == int4_rows
    assert kernels.max_kernel_rows(torch.bfloat16, "int4") == 33


def test_a_layer_asks_for_its_own_methods_row_limit(ops, monkeypatch):
    from nemolite.quant import kernels

    monkeypatch.setattr(kernels, "_max_rows", {(torch.float32, "int8"): 8, (torch.float32, "int4"): 32})
    calls = []
    monkeypatch.setattr(kernels, "linear", lambda layer, x: calls.append(layer.method) or x.new_zeros(len(x), 64))
    weight = torch.randn(64, 128)
    x = torch.randn(32, 128)
    quantize_weight(weight, "int4")(x)
    quantize_weight(weight, "int8")(x)
    assert calls == ["int4"]  # 32 rows: int4's kernel, int8's dequantize + GEMM


# int8 per row (nemolite's own) and per 32 columns with fp16 scales (GGUF Q8_0's layout)
ROWS8_SHAPES = SHAPES + [("int8-q8_0", 32, True, columns) for columns in (256, 224)]


def int8_in_groups(weight: torch.Tensor, group: int) -> QuantizedLinear:
    """int8 values with one fp16 scale per ``group`` columns, as GGUF's Q8_0 stores them."""
    blocks = weight.reshape(weight.shape[0], -1, group)
    scales = (blocks.abs().amax(dim=2) / 127).half()
    values = (blocks / scales.float()[:, :, None]).round().clamp(-127, 127).to(torch.int8)
    return QuantizedLinear.from_int8(values.reshape(weight.shape), scales)


@pytest.mark.parametrize("method, group, symmetric, columns", ROWS8_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_interleaved_by_eight_give_the_row_major_kernels_results(ops, method, group, symmetric, columns, rows,
                                                                       dtype):
    """The interleaved kernels (tiles of 4 activation rows: 1, 3, 4, 5 and 11 rows take every tile size)
    against the python model of the arithmetic; the layout undoes exactly."""
    if not cpu_kernels.has("linear_int4_rows8" if method == "int4" else "linear_int8_rows8"):
        pytest.skip("the interleaved kernels need AVX2 (int4) or VNNI (int8)")
    from nemolite.quant import kernels

    generator = torch.Generator().manual_seed(rows * 11 + (group or 0) + columns)
    weight = torch.randn(72, columns, generator=generator) * 0.05
    layer = int8_in_groups(weight, group) if method == "int8-q8_0" else quantize_weight(weight, method, group,
                                                                                        symmetric)
    x = (torch.randn(rows, columns, generator=generator) * 3).to(dtype)
    expected, stored = python_reference(layer, x.float()), layer.row_major()
    reference = dequantize_reference(layer)
    assert layer.interleave_rows() and layer.rows8 and not layer.interleave_rows()
    assert not torch.equal(layer.qweight, stored[0])  # the bytes did move
    assert all(torch.equal(a, b) if a is not None else b is None for a, b in zip(layer.row_major(), stored))
    assert torch.equal(dequantize_reference(layer), reference) and torch.equal(layer.dequantize(), reference)
    got = kernels.linear(layer, x)
    assert got.dtype == dtype and got.shape == (rows, 72)
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() <= 1e-5 * scale + (0.01 * scale if dtype == torch.bfloat16 else 0)


def test_only_layers_of_whole_eights_of_rows_and_blocks_are_interleaved(ops):
    if not cpu_kernels.has("linear_int4_rows8"):
        pytest.skip("the interleaved kernel needs AVX2")
    weight = torch.randn(44, 64)
    odd, int8 = quantize_weight(weight, "int4", 32), quantize_weight(weight[:40], "int8")
    assert not odd.interleave_rows() and not odd.rows8
    assert int8.interleave_rows() == cpu_kernels.has("linear_int8_rows8")  # int8 needs vpdpbusd (VNNI)
    groups_of_16 = QuantizedLinear.from_int8(int8.row_major()[0], torch.ones(40, 4, dtype=torch.float16))
    assert not groups_of_16.interleave_rows()  # GGUF Q6_K's groups of 16 stay row-major
    with pytest.raises(RuntimeError, match="multiple of 8 rows"):
        ops.linear_int4_rows8(torch.randn(1, 64), odd.qweight, odd.scales, None, 32)
