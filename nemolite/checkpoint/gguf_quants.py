"""GGUF tensor data → nemolite weights: float tensors, or ``QuantizedLinear`` without re-quantising.

Block layouts are ggml's (ggml/src/ggml-common.h, ``block_q8_0`` ... ``block_q6_K``, in
https://github.com/ggml-org/llama.cpp), decoded here in torch; the reference every decoder is tested
against is ``gguf.quants.dequantize`` (gguf-py/gguf/quants.py, PyPI ``gguf``), which these reproduce
bit for bit in fp32.

Native forms (the values and scales kept as they are stored):

- Q8_0 (32 × int8, fp16 d):            int8, group 32, scale d
- Q5_0 (32 × 5 bit, fp16 d):           int8, group 32, values q - 16, scale d
- Q4_0 (32 × 4 bit, fp16 d):           int4 symmetric, group 32: w = d (q - 8)
- Q4_1 (32 × 4 bit, fp16 d, m):        int4 with mins, group 32: w = d q + m
- Q4_K (256: 8 × 32 × 4 bit, 6-bit sc/m, fp16 d/dmin): int4 with mins, group 32, scale d·sc, min -dmin·m
- Q6_K (256: 16 × 16 × 6 bit, int8 sc, fp16 d):         int8, group 16, values q - 32, scale d·sc

Every other type ``gguf.quants`` can dequantize (Q5_1, Q2_K, Q3_K, Q5_K, IQ*, ...) becomes a float weight.
"""

from __future__ import annotations

import numpy as np
import torch

from nemolite.errors import NemoliteError
from nemolite.quant.linear import QuantizedLinear

QK_K = 256
# type name → (elements per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_0": (32, 18), "Q4_1": (32, 20),
          "Q4_K": (256, 144), "Q6_K": (256, 210)}
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
NATIVE = tuple(BLOCKS)


def _half(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 → [...] fp16 → fp32 (little-endian, as GGUF stores them)."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _blocks(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """[N, row_bytes] uint8 → [N, blocks_per_row, block_bytes]."""
    elements, nbytes = BLOCKS[type_name]
    rows, row_bytes = raw.shape
    if row_bytes % nbytes:
        raise NemoliteError(f"a {type_name} row of {row_bytes} bytes is not a whole number of {nbytes}-byte blocks")
    return raw.reshape(rows, row_bytes // nbytes, nbytes)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16·c] bytes → [..., 32·c] values: per 16 bytes, low nibbles then high nibbles (ggml's order)."""
    return torch.stack((qs & 0xF, qs >> 4), dim=-2).flatten(-2)


def decode_q8_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = _blocks(raw, "Q8_0")
    return b[..., 2:].contiguous().view(torch.int8).flatten(1), _half(b[..., :2])


def decode_q5_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = _blocks(raw, "Q5_0")
    high = b[..., 2:6].contiguous().view(torch.int32).to(torch.int64)  # [N, B, 1]: bit j is element j's fifth bit
    bits = ((high >> torch.arange(32)) & 1).to(torch.uint8)
    q = _nibbles(b[..., 6:22].unsqueeze(-2)).flatten(-2) | (bits << 4)
    return (q.to(torch.int8) - 16).flatten(1), _half(b[..., :2])


def decode_q4_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = _blocks(raw, "Q4_0")
    return _nibbles(b[..., 2:]).flatten(1), _half(b[..., :2])


def decode_q4_1(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = _blocks(raw, "Q4_1")
    return _nibbles(b[..., 4:]).flatten(1), _half(b[..., :2]), _half(b[..., 2:4])


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes → 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scales, mins


def decode_q4_k(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values 0..15 [N, K], scales d·sc [N, K/32] fp32, mins -dmin·m [N, K/32] fp32."""
    b = _blocks(raw, "Q4_K")
    d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])  # [N, B]
    sc, m = _k_scales_mins(b[..., 4:16])  # [N, B, 8]
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)  # per 64 elements: 32 bytes, low nibbles first
    values = torch.stack((qs & 0xF, qs >> 4), dim=-2).flatten(1)
    scales = (d[..., None] * sc.float()).flatten(1)
    mins = -(dmin[..., None] * m.float()).flatten(1)
    return values, scales, mins


def decode_q6_k(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values q - 32 [N, K], scales d·sc [N, K/16] fp32."""
    b = _blocks(raw, "Q6_K")
    rows, blocks = b.shape[:2]
    ql = b[..., :128].reshape(rows, blocks, 2, 1, 64)
    ql = torch.cat((ql & 0xF, ql >> 4), dim=3).reshape(rows, blocks, 8, 32)
    qh = b[..., 128:192].reshape(rows, blocks, 2, 1, 32)
    qh = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 1, 4, 1)) & 3).reshape(rows, blocks, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    sc = b[..., 192:208].contiguous().view(torch.int8).float()  # [N, B, 16]
    d = _half(b[..., 208:210])  # [N, B]
    return q.flatten(1), (d[..., None] * sc).flatten(1)


def quantized_linear(type_name: str, raw: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
    """The QuantizedLinear holding a [N, row_bytes] uint8 tensor of a NATIVE type as it is stored."""
    if type_name == "Q8_0":
        return QuantizedLinear.from_int8(*decode_q8_0(raw), bias=bias)
    if type_name == "Q5_0":
        return QuantizedLinear.from_int8(*decode_q5_0(raw), bias=bias)
    if type_name == "Q6_K":
        return QuantizedLinear.from_int8(*decode_q6_k(raw), bias=bias)
    if type_name == "Q4_0":
        values, scales = decode_q4_0(raw)
        return QuantizedLinear.from_int4(values, scales.half(), None, bias=bias)
    if type_name == "Q4_1":
        values, scales, mins = decode_q4_1(raw)
        return QuantizedLinear.from_int4(values, scales.half(), mins.half(), bias=bias)
    if type_name == "Q4_K":
        return QuantizedLinear.from_int4(*decode_q4_k(raw), bias=bias)
    raise NemoliteError(f"GGUF type {type_name} has no native quantized form in nemolite")


def dequantize(type_name: str, raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 tensor of ``shape`` from raw GGUF data (native types decoded here, the rest by gguf.quants)."""
    if type_name in FLOATS:
        return raw.contiguous().view(FLOATS[type_name]).reshape(shape).float()
    rows = raw.reshape(-1, raw.shape[-1])
    if type_name in ("Q8_0", "Q5_0", "Q6_K"):
        q, s = {"Q8_0": decode_q8_0, "Q5_0": decode_q5_0, "Q6_K": decode_q6_k}[type_name](rows)
        return (q.float() * s.repeat_interleave(q.shape[1] // s.shape[1], dim=1)).reshape(shape)
    if type_name == "Q4_0":
        q, s = decode_q4_0(rows)
        return ((q.float() - 8) * s.repeat_interleave(32, dim=1)).reshape(shape)
    if type_name in ("Q4_1", "Q4_K"):
        q, s, m = (decode_q4_1 if type_name == "Q4_1" else decode_q4_k)(rows)
        return (q.float() * s.repeat_interleave(32, dim=1) + m.repeat_interleave(32, dim=1)).reshape(shape)
    return _dequantize_with_gguf(type_name, raw, shape)


def _dequantize_with_gguf(type_name: str, raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[type_name]
        values = gguf.quants.dequantize(raw.numpy(), qtype)
    except (KeyError, NotImplementedError) as error:
        raise NemoliteError(f"GGUF tensor type {type_name} cannot be read: neither nemolite nor the gguf package "
                            f"({getattr(gguf, '__version__', '?')}) dequantizes it ({error!r})") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
