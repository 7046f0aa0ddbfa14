"""``QuantizedLinear``: a linear layer whose weight is stored as int8 or int4 values and scales.

Storage (one form for every source, so every source runs on the same kernels):

- int8: ``qweight`` int8 [N, K]; ``scales`` [N, K // group_size] (one per row when group_size == K);
  w[n, k] = qweight[n, k] * scales[n, k // group_size]. Group sizes 16 (GGUF Q6_K), 32 (GGUF Q8_0), ...
- int4: ``qweight`` uint8 [N, K // 2], each block of 32 columns in 16 bytes laid out as GGUF's Q4_0 is
  (byte j holds column j in its low nibble and column j + 16 in its high one); values q in 0..15;
  w = scales * (q - 8) when symmetric, w = scales * q + mins with ``mins`` (GGUF Q4_1/Q4_K, zero points).
  group_size is a multiple of 32.

Scales and mins are fp16 (as GGUF's Q4_0/Q8_0 store them) or fp32 where fp16 would round them.
Rows of activations go through the kernels of nemolite/csrc/quant_kernels.cpp when they are few
(decode); many rows (prefill, large batches) dequantize the weight to the activation dtype once and
run a dense GEMM, which is compute-bound there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemolite.errors import NemoliteError
from nemolite.quant import kernels

BLOCK = 32  # columns per int4 block and per block of the activation's int8 copy
FP16_NORMAL_MIN, FP16_MAX = 6.104e-05, 65504.0


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + b, W quantized (see the module docstring). Build with ``from_int8``, ``from_int4``
    or ``quantize_weight``; ``dequantize()`` is the reference every kernel is tested against."""

    def __init__(self, method: str, in_features: int, out_features: int, group_size: int,
                 qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bias: torch.Tensor | None):
        super().__init__()
        self.method, self.in_features, self.out_features, self.group_size = method, in_features, out_features, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # the kernels take whole blocks of 32 columns, and int8 groups of 16, of whole blocks or the row
        kernel_layout = in_features % BLOCK == 0 and (
            method == "int4" or group_size in (16, in_features) or group_size % BLOCK == 0)
        # decided once here (building the extension the first time), not per call: compiled graphs see a constant
        self.cpu_kernel = kernel_layout and kernels.available(method)
        self.cpu_dequantize = kernel_layout and kernels.available("dequantize")
        self.rows8 = False  # int4 rows interleaved by eights for the CPU kernel (interleave_rows)

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_int8(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """int8 values [N, K] and scales [N, G] (or [N]): w = qweight * scales per group of K // G columns."""
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise NemoliteError(f"int8 weights must be a 2-D int8 tensor, got {qweight.dtype} {list(qweight.shape)}")
        out_features, in_features = qweight.shape
        scales = _scales_2d(scales, out_features, in_features)
        return cls("int8", in_features, out_features, in_features // scales.shape[1], qweight.contiguous(),
                   _compact(scales), None, bias)

    @classmethod
    def from_int4(cls, values: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """Unpacked int4 values [N, K] (any integer dtype, 0..15) with scales [N, G] and optional mins [N, G]:
        w = scales * (values - 8) without mins, w = scales * values + mins with them."""
        if values.dim() != 2 or values.dtype.is_floating_point:
            raise NemoliteError(f"int4 values must be a 2-D integer tensor, got {values.dtype} {list(values.shape)}")
        out_features, in_features = values.shape
        if in_features % BLOCK:
            raise NemoliteError(f"int4 weights need a multiple of {BLOCK} input columns, got {in_features}")
        if values.numel() and (int(values.min()) < 0 or int(values.max()) > 15):
            raise NemoliteError("int4 values must lie in 0..15")
        scales = _scales_2d(scales, out_features, in_features)
        group_size = in_features // scales.shape[1]
        if group_size % BLOCK:
            raise NemoliteError(f"int4 group size must be a multiple of {BLOCK}, got {group_size}")
        if mins is not None:
            mins = _scales_2d(mins, out_features, in_features)
            if mins.shape != scales.shape:
                raise NemoliteError(f"int4 mins {list(mins.shape)} do not match scales {list(scales.shape)}")
            scales, mins = _compact_pair(scales, mins)
        else:
            scales = _compact(scales)
        return cls("int4", in_features, out_features, group_size, pack_int4(values), scales, mins, bias)

    @classmethod
    def concatenate(cls, layers: list["QuantizedLinear"]) -> "QuantizedLinear | None":
        """One layer whose outputs are the layers' outputs side by side (rows stacked: values, scales and mins
        as stored, so every output is computed as before); None when their storage differs."""
        first = layers[0]
        key = lambda layer: (type(layer), layer.rows8, layer.method, layer.in_features, layer.group_size, layer.qweight.dtype,
                             layer.scales.dtype, layer.qweight.device, layer.mins is None, layer.bias is None,
                             None if layer.bias is None else layer.bias.dtype)
        if any(key(layer) != key(first) for layer in layers):
            return None
        cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(layer, name) for layer in layers])
        return cls(first.method, first.in_features, sum(layer.out_features for layer in layers), first.group_size,
                   cat("qweight"), cat("scales"), cat("mins"), cat("bias"))

    def interleave_rows(self) -> bool:
        """CPU inference: store the rows interleaved by eights, the layout of the CPU kernels that serve eight
        rows with each instruction (nemolite/csrc/quant_kernels.cpp). int4 on the bench model's layers, 2-core
        AVX512-VNNI machine: the row-major kernel's rate at one activation row, 1.46 x at 8 rows, 1.8 x at 32;
        int8 (CPUs with VNNI; groups of whole blocks) likewise. Same bytes, same shapes, other order: every
        other reader goes through ``row_major()``. True when the layer now has that layout."""
        kernel = {"int4": "int4_rows8", "int8": "int8_rows8"}[self.method]
        if (self.rows8 or not self.cpu_kernel or self.out_features % 8 or self.group_size % BLOCK
                or self.qweight.device.type != "cpu" or not kernels.available(kernel)):
            return False
        n, groups, chunks = self.out_features, self.scales.shape[1], self._chunks
        self.qweight = self.qweight.view(n // 8, 8, self.in_features // BLOCK, chunks, 4).transpose(1, 2) \
            .transpose(2, 3).contiguous().view(n, -1)
        rows = lambda t: None if t is None else t.view(n // 8, 8, groups).transpose(1, 2).contiguous().view(n, groups)
        self.scales, self.mins = rows(self.scales), rows(self.mins)
        self.rows8 = True
        return True

    def row_major(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight, scales, mins) in the row-major storage of the module docstring, whatever the layout."""
        if not self.rows8:
            return self.qweight, self.scales, self.mins
        return rows8_to_row_major(self.qweight, self.scales, self.mins, self.in_features, self._chunks)

    @property
    def _chunks(self) -> int:
        """4-byte chunks of a row's block of 32 columns: 8 (int8) or 4 (int4: two values a byte)."""
        return 8 if self.method == "int8" else 4

    # -- reference ------------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in ``dtype``, by the storage rule of the module docstring."""
        kernel = self.cpu_dequantize and self.qweight.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        return kernels.dequantize_layer(self.qweight, self.scales, self.mins, self.group_size, self.method == "int4",
                                        self.rows8, str(dtype).removeprefix("torch."), kernel)

    @property
    def weight_bytes(self) -> int:
        """Bytes a pass over the weight reads: values, scales and mins."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def extra_repr(self) -> str:
        zero = "" if self.method == "int8" else (", symmetric" if self.mins is None else ", with mins")
        return (f"{self.method}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}{zero}, scales={self.scales.dtype}, bias={self.bias is not None}"
                f"{', rows interleaved by 8' if self.rows8 else ''}")

    # -- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if self.cpu_kernel and x.device.type == "cpu" and (
                rows <= kernels.GEMV_MAX_ROWS or rows <= kernels.max_kernel_rows(x.dtype, self.method)):
            out = kernels.linear(self, x.reshape(rows, self.in_features))
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


def rows8_to_row_major(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, in_features: int,
                       chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Undo ``interleave_rows``: (qweight, scales, mins) row-major. ``chunks``: 4-byte chunks a block."""
    n, groups = qweight.shape[0], scales.shape[1]
    qweight = qweight.view(n // 8, in_features // BLOCK, chunks, 8, 4).transpose(2, 3) \
        .transpose(1, 2).contiguous().view(n, -1)
    rows = lambda t: None if t is None else t.view(n // 8, groups, 8).transpose(1, 2).contiguous().view(n, groups)
    return qweight, rows(scales), rows(mins)


def dequantize_reference(layer: QuantizedLinear) -> torch.Tensor:
    """fp32 weight, in plain torch (any device)."""
    qweight, scales, mins = layer.row_major()
    return dequantize_storage(qweight, scales, mins, layer.group_size, layer.method == "int4")


def dequantize_storage(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group: int,
                       int4: bool) -> torch.Tensor:
    """fp32 weight of row-major storage, in plain torch (any device)."""
    scales = scales.float().repeat_interleave(group, dim=1)
    if not int4:
        return qweight.float() * scales
    values = unpack_int4(qweight).float()
    if mins is None:
        return (values - 8) * scales
    return values * scales + mins.float().repeat_interleave(group, dim=1)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 → [N, K // 2] uint8, per 32 columns: byte j = column j | column j + 16 << 4."""
    n, k = values.shape
    v = values.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 values [N, K]."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack((blocks & 0xF, blocks >> 4), dim=2).reshape(n, half * 2)


def quantize_weight(weight: torch.Tensor, method: str, group_size: int | None = None, symmetric: bool = True,
                    bias: torch.Tensor | None = None) -> QuantizedLinear:
    """Quantize a float weight [N, K] (round to nearest, fp32 arithmetic).

    int8: one scale per row, amax / 127, values in -127..127. int4 symmetric: per group the scale is the
    value of largest magnitude divided by -8 (so that it maps to -8 exactly and the rest to -8..7, GGUF's
    Q4_0 rule); asymmetric: scale (max - min) / 15 and min (GGUF's Q4_1 rule)."""
    w = weight.detach().float()
    n, k = w.shape
    if method == "int8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        q = torch.where(scale > 0, w / scale, torch.zeros_like(w)).round_().clamp_(-127, 127).to(torch.int8)
        return QuantizedLinear.from_int8(q, scale, bias)
    if method != "int4":
        raise NemoliteError(f"unknown quantization method {method!r}")
    group_size = group_size or BLOCK
    if k % group_size or group_size % BLOCK:
        raise NemoliteError(f"int4 group size {group_size} must divide the {k} input columns and be a multiple of 32")
    groups = w.reshape(n, k // group_size, group_size)
    if symmetric:
        index = groups.abs().argmax(dim=2, keepdim=True)
        scale = _fp16_if_exact(groups.gather(2, index) / -8)
        inverse = torch.where(scale != 0, 1 / scale.float(), torch.zeros_like(scale.float()))
        values = (groups * inverse + 8.5).floor_().clamp_(0, 15)  # round half up, as GGUF's quantizer does
        return QuantizedLinear.from_int4(values.reshape(n, k).to(torch.uint8), scale.squeeze(2), None, bias)
    low, high = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)
    scale, low = _fp16_pair_if_exact((high - low) / 15, low)
    inverse = torch.where(scale != 0, 1 / scale.float(), torch.zeros_like(scale.float()))
    values = ((groups - low.float()) * inverse + 0.5).floor_().clamp_(0, 15)
    return QuantizedLinear.from_int4(values.reshape(n, k).to(torch.uint8), scale.squeeze(2), low.squeeze(2), bias)


def _scales_2d(scales: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    if scales.dim() == 1:
        scales = scales[:, None]
    if scales.dim() != 2 or scales.shape[0] != rows or scales.shape[1] == 0 or columns % scales.shape[1]:
        raise NemoliteError(f"scales of shape {list(scales.shape)} do not fit a [{rows}, {columns}] weight")
    if not scales.dtype.is_floating_point:
        raise NemoliteError(f"scales must be floating point, got {scales.dtype}")
    return scales


def _in_fp16_range(t: torch.Tensor) -> bool:
    """Every value zero or a normal fp16 number in magnitude."""
    magnitude = t.float().abs()
    return bool(((magnitude == 0) | ((magnitude >= FP16_NORMAL_MIN) & (magnitude <= FP16_MAX))).all())


def _fits_fp16(t: torch.Tensor) -> bool:
    f = t.float()
    return _in_fp16_range(f) and bool((f.half().float() == f).all())


def _compact(scales: torch.Tensor) -> torch.Tensor:
    """fp16 where that is exact (GGUF's scales are fp16 already), fp32 otherwise."""
    return scales.half().contiguous() if scales.dtype == torch.float16 or _fits_fp16(scales) else scales.float().contiguous()


def _compact_pair(scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _fits_fp16(scales) and _fits_fp16(mins):
        return scales.half().contiguous(), mins.half().contiguous()
    return scales.float().contiguous(), mins.float().contiguous()


def _fp16_if_exact(scales: torch.Tensor) -> torch.Tensor:
    """Scales rounded to fp16 when all lie in its normal range (then the values are computed against the
    rounded scale, as GGUF does); fp32 otherwise."""
    return scales.half() if _in_fp16_range(scales) else scales.float()


def _fp16_pair_if_exact(scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _fp16_if_exact(scales), _fp16_if_exact(mins)
    if a.dtype == torch.float16 and b.dtype == torch.float16:
        return a, b
    return scales.float(), mins.float()
