"""The dequantisation rule of each pre-quantized HF format (see nemolite.checkpoint.hf_quant).

Every format turns one layer's stored tensors into one of three decoded forms, which are then sliced
to this rank's part (tensor parallelism) and built into a ``QuantizedLinear``:

- ``Int4(values 0..15 [N, K], scales [N, G], zeros [N, G] | None)``: w = scales · (values − zeros),
  zeros None meaning 8 (symmetric) — exact in ``from_int4`` (mins = −scales · zeros);
- ``Int8(values int8 [N, K], scales [N, G])``: exact in ``from_int8``;
- ``Float(w fp32 [N, K])``: requantized to int8 per output channel (FP8 formats, act-order GPTQ).

Sources of each rule (the producers' own code):
- compressed-tensors: src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py
  (``pack_to_int32``/``unpack_from_int32``: values + 2^(bits−1) packed along K into int32, low bits
  first; asymmetric zero points packed the same way along N), .../fp8_quantized.py and naive_quantized.py
  (weight · weight_scale), src/compressed_tensors/quantization/lifecycle/forward.py (``dequantize``:
  (x_q − zero_point) · scale, ``g_idx`` for activation order), github.com/neuralmagic/compressed-tensors.
- ModelOpt: modelopt/torch/export/quant_utils.py (``to_quantized_weight``: FP8 weight / weight_scale;
  INT4_AWQ weight / weight_scale rounded to −8..7, two values per int8 byte), github.com/NVIDIA/TensorRT-Model-Optimizer.
- vLLM fp8: vllm/model_executor/layers/quantization/fp8.py (per-tensor ``weight_scale``, or
  ``weight_scale_inv`` per ``weight_block_size`` block, multiplied), github.com/vllm-project/vllm.
- GPTQ: AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py ``pack``/dequantisation (qweight
  [K/pf, N] packed along K, qzeros [G, N/pf] packed along N storing zero − 1 in the ``gptq`` (v1)
  checkpoint format, scales [G, N], g_idx [K]), github.com/AutoGPTQ/AutoGPTQ; gptqmodel's ``gptq_v2``
  stores the zero itself (github.com/ModelCloud/GPTQModel, gptqmodel/utils/model.py convert_gptq_v1_to_v2).
- AWQ: AutoAWQ awq/modules/linear/gemm.py ``WQLinear_GEMM.from_linear`` (qweight [K, N/8] packed along N
  in the order [0, 2, 4, 6, 1, 3, 5, 7], qzeros [K/g, N/8] likewise, scales [K/g, N]) and
  awq/utils/packing_utils.py (``AWQ_REVERSE_ORDER``), github.com/casper-hansen/AutoAWQ.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from nemolite.checkpoint.hf import SafetensorsEntry, read_into
from nemolite.checkpoint.hf_quant import supported_text
from nemolite.errors import NemoliteError
from nemolite.quant.linear import QuantizedLinear, quantize_weight

# Scales of activations and of the KV cache: the CPU path is weight-only and keeps both in float.
IGNORED = ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "k_scale", "v_scale",
           "input_global_scale")


@dataclasses.dataclass
class Int4:
    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


@dataclasses.dataclass
class Int8:
    values: torch.Tensor
    scales: torch.Tensor


@dataclasses.dataclass
class Float:
    weight: torch.Tensor


@dataclasses.dataclass
class PreScaled:
    inner: Int4 | Int8 | Float
    scale: torch.Tensor  # [K]: the layer computes W (x ⊙ scale)


class PreScaledLinear(QuantizedLinear):
    """y = W (x ⊙ pre_quant_scale): ModelOpt's AWQ export keeps the AWQ input scale of a layer whose input
    comes from no norm it could fold it into (o_proj, down_proj; in Nemotron also up_proj). ``dequantize``
    is the stored W, as for every QuantizedLinear; the scale applies to the input."""

    @classmethod
    def of(cls, layer: QuantizedLinear, scale: torch.Tensor) -> "PreScaledLinear":
        layer.__class__ = cls
        layer.register_buffer("pre_quant_scale", scale.float().contiguous())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.pre_quant_scale.to(x.dtype))


@dataclasses.dataclass
class PackedLayer:
    prefix: str
    entries: dict[str, SafetensorsEntry]  # by suffix: "weight_packed", "weight_scale", ...
    shape: tuple[int, int]  # the float weight's [N, K]


class Format:
    """One format: which tensors a quantized layer has (``marker`` names them) and how they decode."""

    name = "?"
    marker = "weight_scale"
    suffixes: tuple[str, ...] = ()

    def __init__(self, quant: dict, path: Path):
        self.quant, self.path = quant, path

    def fail(self, what: str) -> NemoliteError:
        return NemoliteError(f"checkpoint {self.path} ({self.name}): {what} is not supported; {supported_text()}")

    def split(self, entries: dict[str, SafetensorsEntry]) -> dict[str, PackedLayer]:
        """Take every quantized layer's tensors out of ``entries`` (and the ignored activation/KV scales);
        returns the layers by their float weight's name."""
        for name in [n for n in entries if n.rpartition(".")[2] in IGNORED]:
            del entries[name]
        layers = {}
        for prefix in sorted(n[:-len(self.marker) - 1] for n in entries if n.endswith("." + self.marker)):
            own = {s: entries.pop(f"{prefix}.{s}") for s in self.suffixes if f"{prefix}.{s}" in entries}
            layers[prefix + ".weight"] = PackedLayer(prefix, own, self.shape(prefix, own))
        if not layers:
            raise NemoliteError(f"checkpoint {self.path} says it is {self.name}-quantized but holds no "
                                f"*.{self.marker} tensors; it is incomplete or mislabelled")
        return layers

    def shape(self, prefix: str, own: dict[str, SafetensorsEntry]) -> tuple[int, int]:
        weight = own.get("weight")
        if weight is None or len(weight.shape) != 2:
            raise NemoliteError(f"{self.path}: quantized layer {prefix} has no 2-D weight")
        return weight.shape

    def decode(self, layer: PackedLayer, tensors: dict[str, torch.Tensor]) -> Int4 | Int8 | Float:
        raise NotImplementedError

    def load(self, layer: PackedLayer, files, part, bias: torch.Tensor | None) -> QuantizedLinear:
        """This rank's ``QuantizedLinear`` (part: (dimension, start, length) or None)."""
        tensors = {}
        for suffix, entry in layer.entries.items():
            tensors[suffix] = torch.empty(entry.shape, dtype=entry.dtype)
            read_into(entry, tensors[suffix], files.handle(entry.file))
        decoded = self.decode(layer, tensors)
        n, k = layer.shape
        inner = getattr(decoded, "inner", decoded)
        for t in (getattr(inner, "values", None), getattr(inner, "weight", None)):
            if t is not None and tuple(t.shape) != (n, k):
                raise NemoliteError(f"{self.path}: {layer.prefix} decodes to {list(t.shape)}, not [{n}, {k}]")
        pre_scale = None
        if isinstance(decoded, PreScaled):
            decoded, pre_scale = decoded.inner, decoded.scale
        if part is not None:
            if pre_scale is not None and part[0] == 1:
                pre_scale = pre_scale[part[1]:part[1] + part[2]].contiguous()
            decoded = slice_decoded(decoded, *part, layer.prefix)
        layer_out = self.build(decoded, bias)
        return layer_out if pre_scale is None else PreScaledLinear.of(layer_out, pre_scale)

    @staticmethod
    def build(decoded, bias):
        if isinstance(decoded, Float):
            return quantize_weight(decoded.weight, "int8", bias=bias)
        if isinstance(decoded, Int8):
            return QuantizedLinear.from_int8(decoded.values, decoded.scales, bias)
        mins = None if decoded.zeros is None else -(decoded.scales.float() * decoded.zeros.float())
        return QuantizedLinear.from_int4(decoded.values, decoded.scales.float(), mins, bias)


def slice_decoded(decoded, dim: int, start: int, length: int, prefix: str):
    """Rows (zero rows past the end: vocabulary padding) or columns [start, start + length)."""
    fields = {f.name: getattr(decoded, f.name) for f in dataclasses.fields(decoded)}
    full = next(iter(fields.values()))
    if dim == 0:
        def rows(t):
            if t is None:
                return None
            piece = t[start:start + length]
            if len(piece) < length:
                piece = torch.cat([piece, piece.new_zeros((length - len(piece),) + tuple(t.shape[1:]))])
            return piece.contiguous()
        return type(decoded)(**{name: rows(t) for name, t in fields.items()})
    k = full.shape[1]
    out = {}
    for name, t in fields.items():
        if t is None or t.shape[1] == k:
            out[name] = None if t is None else t[:, start:start + length].contiguous()
        else:  # per-group tensors: a shard cutting through groups keeps its part of each (same scale)
            group = k // t.shape[1]
            part = math.gcd(group, start, length)
            if part < group and (part % 32 or not isinstance(decoded, Int4)) and not isinstance(decoded, Int8):
                raise NemoliteError(f"{prefix}: quantization groups of {group} columns do not split at this "
                                    f"tensor-parallel rank's columns [{start}, {start + length}); use another --tensor-parallel-size")
            t = t.repeat_interleave(group // part, 1) if part < group else t
            out[name] = t[:, start // part:(start + length) // part].contiguous()
    return type(decoded)(**out)


# -- shared rules -----------------------------------------------------------------------------------------

def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """Unsigned ``bits``-bit values from int32 words along ``dim``: word j holds elements j·pf + i in
    bits [bits·i, bits·(i + 1)) (pf = 32 / bits); with ``order``, nibble i holds element j·pf + order[i]."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    if dim == 0:
        values = (words.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R, pf, C]
        if order is not None:
            values = values[:, _inverse(order)]
        return values.reshape(packed.shape[0] * per, packed.shape[1]).to(torch.int32)
    values = (words.unsqueeze(2) >> shifts) & ((1 << bits) - 1)  # [R, C, pf]
    if order is not None:
        values = values[:, :, _inverse(order)]
    return values.reshape(packed.shape[0], packed.shape[1] * per).to(torch.int32)


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for nibble, element in enumerate(order):
        inverse[element] = nibble
    return inverse


def expand_scale(scale: torch.Tensor, n: int, k: int, block: tuple[int, int] | None = None) -> torch.Tensor:
    """A per-tensor, per-row, per-group or per-block scale as an fp32 [N, K] (or broadcastable) tensor."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(1, 1)
    if scale.dim() == 1:
        scale = scale[:, None]
    rows, columns = scale.shape
    if block is None:
        if n % rows or k % columns:
            raise NemoliteError(f"a scale of shape {list(scale.shape)} does not tile a [{n}, {k}] weight")
        block = (n // rows, k // columns)
    return scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]


def grouped(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g_idx: torch.Tensor | None,
            bits: int) -> Int4 | Int8 | Float:
    """values [N, K] unsigned, scales/zeros [N, G] (zeros in the same unsigned range; None: 2^(bits−1)),
    g_idx [K] the group of each column (None: contiguous groups). Exact int4/int8 where the groups are
    contiguous; with activation order (g_idx not sorted) dequantised here and requantized to int8 per
    channel by the caller (QuantizedLinear has no input permutation)."""
    n, k = values.shape
    groups = scales.shape[1]
    contiguous = torch.arange(k) // (k // groups) if k % groups == 0 else None
    if g_idx is not None and (contiguous is None or not torch.equal(g_idx.long(), contiguous)):
        z = zeros.float() if zeros is not None else torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32)
        index = g_idx.long()
        return Float((values.float() - z[:, index]) * scales.float()[:, index])
    if zeros is not None and bool((zeros == 2 ** (bits - 1)).all()):
        zeros = None
    if bits == 4:
        return Int4(values.to(torch.uint8), scales, zeros)
    if bits == 8 and zeros is None:
        return Int8((values - 128).to(torch.int8), scales)
    group = k // groups
    z = zeros.float().repeat_interleave(group, 1) if zeros is not None else 128.0
    return Float((values.float() - z) * scales.float().repeat_interleave(group, 1))


# -- compressed-tensors ---------------------------------------------------------------------------------

class CompressedTensors(Format):
    name = "compressed-tensors"

    def __init__(self, quant: dict, path: Path):
        super().__init__(quant, path)
        groups = quant.get("config_groups") or {}
        formats = {quant.get("format")} | {g.get("format") for g in groups.values() if isinstance(g, dict)}
        formats.discard(None)
        if len(formats) != 1:
            raise self.fail(f"format {sorted(formats) or '(none)'} (one of float-quantized, pack-quantized, "
                            "int-quantized, naive-quantized is needed)")
        self.format = formats.pop()
        # (targets, weight args) per config group; each layer takes the group that names it best
        # (compressed-tensors' order: its exact name, then a "re:" pattern, then a class such as Linear),
        # so a file may hold int4 layers and an int8 head, as `nemolite convert --quantization int4-head` writes.
        self.groups = [(g.get("targets") or [], g["weights"]) for g in groups.values()
                       if isinstance(g, dict) and g.get("weights")]
        for targets, args in self.groups:
            if not isinstance(args, dict) or not isinstance(targets, list) or \
                    not all(isinstance(t, str) for t in targets):
                raise NemoliteError(f"{path}: a config group of quantization_config needs a list of target names "
                                    "and a dict of weight arguments")
        if not self.groups:
            raise self.fail("a config without weight quantization")
        for _, args in self.groups:
            self.check(args)
        self.marker, self.suffixes = {
            "float-quantized": ("weight_scale", ("weight", "weight_scale")),
            "pack-quantized": ("weight_packed", ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                                 "weight_g_idx")),
        }.get(self.format, ("weight_scale", ("weight", "weight_scale", "weight_zero_point", "weight_g_idx")))

    def check(self, args: dict) -> None:
        bits, kind, strategy = int(args.get("num_bits", 8)), args.get("type", "int"), args.get("strategy")
        if self.format == "float-quantized":
            if kind != "float" or bits != 8:
                raise self.fail(f"float-quantized {kind} {bits}-bit weights (FP8 e4m3 is)")
        elif self.format == "pack-quantized":
            if kind != "int" or bits not in (4, 8):
                raise self.fail(f"pack-quantized {kind} {bits}-bit weights (int4/int8 are)")
        elif self.format in ("int-quantized", "naive-quantized"):
            if kind != "int" or bits != 8:
                raise self.fail(f"{self.format} {kind} {bits}-bit weights (int8 is)")
        else:
            raise self.fail(f"format {self.format!r}")
        if strategy not in ("tensor", "channel", "group", "block"):
            raise self.fail(f"weight strategy {strategy!r}")

    def scheme(self, prefix: str) -> dict:
        """The weight args of the config group that targets layer ``prefix``."""
        def rank(targets: list[str]) -> int:
            if prefix in targets:
                return 0
            if any(t.startswith("re:") and re.match(t[3:], prefix) for t in targets):
                return 1
            return 2 if "Linear" in targets else 3  # every layer read here is a Linear
        best = min(self.groups, key=lambda group: rank(group[0]))
        if rank(best[0]) == 3:
            raise NemoliteError(f"{self.path}: no config group of quantization_config targets layer {prefix}")
        return best[1]

    def shape(self, prefix, own):
        if self.format != "pack-quantized":
            return super().shape(prefix, own)
        if "weight_shape" not in own:
            raise NemoliteError(f"{self.path}: packed layer {prefix} has no weight_shape")
        entry = own["weight_shape"]
        shape = torch.empty(entry.shape, dtype=entry.dtype)
        with open(entry.file, "rb", buffering=0) as handle:
            read_into(entry, shape, handle)
        if shape.numel() != 2:
            raise NemoliteError(f"{self.path}: {prefix}.weight_shape is {shape.tolist()}, not [N, K]")
        return int(shape[0]), int(shape[1])

    def decode(self, layer, t):
        n, k = layer.shape
        g_idx = t.get("weight_g_idx")
        args = self.scheme(layer.prefix)
        bits = int(args.get("num_bits", 8))
        if self.format == "float-quantized":
            if g_idx is not None:
                raise self.fail("FP8 with activation order")
            block = tuple(args["block_structure"]) if args.get("block_structure") else None
            return Float(t["weight"].float() * expand_scale(t["weight_scale"], n, k, block))
        offset = 2 ** (bits - 1)
        scales = t["weight_scale"].float()
        if scales.numel() == 1 or (scales.dim() == 2 and scales.shape[1] == 1) or scales.dim() == 1:
            scales = expand_scale(scales, n, 1).expand(n, 1)  # per tensor / per channel: one group of K
        elif args.get("strategy") == "block":
            raise self.fail("block-wise int weights")
        zero = t.get("weight_zero_point")
        if self.format == "pack-quantized":
            values = unpack_int32(t["weight_packed"], bits, 1)[:, :k]
            if zero is not None and zero.dtype == torch.int32 and zero.shape[0] != n:  # packed along N
                zero = unpack_int32(zero, bits, 0)[:n] - offset
        else:
            values = t["weight"].to(torch.int32) + offset
        zeros = None if zero is None else (zero.to(torch.int32).reshape(n, -1) + offset).expand(n, scales.shape[1])
        return grouped(values, scales, zeros, g_idx, bits)


# -- ModelOpt -----------------------------------------------------------------------------------------------

class ModelOpt(Format):
    name = "modelopt"

    def __init__(self, quant: dict, path: Path):
        super().__init__(quant, path)
        self.algo = str(quant.get("quant_algo") or "").upper()
        if self.algo == "FP8":
            self.suffixes = ("weight", "weight_scale")
        elif self.algo in ("INT4_AWQ", "W4A16_AWQ"):  # ModelOpt 0.47 writes W4A16_AWQ
            self.suffixes = ("weight", "weight_scale", "pre_quant_scale")
            self.group = int(quant.get("group_size") or quant.get("awq_block_size") or 128)
        else:
            raise self.fail(f"quant_algo {self.algo or '(none)'!r}")

    def shape(self, prefix, own):
        weight, scale = own.get("weight"), own.get("weight_scale")
        if self.algo == "FP8" or weight is None or scale is None or len(weight.shape) != 2:
            return super().shape(prefix, own)
        n = scale.shape[0]  # INT4_AWQ: two values per byte, packed along N or K (see decode)
        return (n, weight.shape[1]) if weight.shape[0] * 2 == n else (n, weight.shape[1] * 2)

    def decode(self, layer, t):
        n, k = layer.shape
        if self.algo == "FP8":
            return Float(t["weight"].float() * expand_scale(t["weight_scale"], n, k))
        packed = t["weight"].view(torch.uint8).to(torch.int32)
        low, high = packed & 0xF, packed >> 4
        if packed.shape[0] * 2 == n:  # [N/2, K]: rows 2i (low nibble) and 2i + 1 (high)
            values = torch.stack((low, high), dim=1).reshape(n, k)
        else:  # [N, K/2]: columns 2j and 2j + 1
            values = torch.stack((low, high), dim=2).reshape(n, k)
        values = (values ^ 8)  # two's complement nibble −8..7 → q + 8 in 0..15
        decoded = grouped(values, t["weight_scale"].float().reshape(n, -1), None, None, 4)
        if "pre_quant_scale" in t:  # AWQ's per-input-column scale the export could not fold into a norm
            decoded = PreScaled(decoded, t["pre_quant_scale"].float().reshape(k))
        return decoded


# -- vLLM fp8 -------------------------------------------------------------------------------------------------

class VllmFp8(Format):
    name = "fp8"

    def __init__(self, quant: dict, path: Path):
        super().__init__(quant, path)
        block = quant.get("weight_block_size")
        self.block = tuple(block) if block else None
        self.marker = "weight_scale_inv" if self.block else "weight_scale"
        self.suffixes = ("weight", self.marker)

    def decode(self, layer, t):
        n, k = layer.shape
        return Float(t["weight"].float() * expand_scale(t[self.marker], n, k, self.block))


# -- GPTQ / AWQ ---------------------------------------------------------------------------------------------

class Gptq(Format):
    name = "gptq"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, quant: dict, path: Path):
        super().__init__(quant, path)
        self.bits = int(quant.get("bits", 4))
        if self.bits not in (4, 8):
            raise self.fail(f"{self.bits}-bit GPTQ")
        checkpoint_format = str(quant.get("checkpoint_format", "gptq")).lower()
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise self.fail(f"checkpoint_format {checkpoint_format!r}")
        self.zero_offset = 1 if checkpoint_format == "gptq" else 0  # v1 stores zero − 1

    def shape(self, prefix, own):
        q = own["qweight"]
        return q.shape[1], q.shape[0] * 32 // self.bits

    def decode(self, layer, t):
        n, k = layer.shape
        values = unpack_int32(t["qweight"], self.bits, 0).T  # [N, K]
        zeros = (unpack_int32(t["qzeros"], self.bits, 1)[:, :n] + self.zero_offset).T
        return grouped(values, t["scales"].float().T, zeros, t.get("g_idx"), self.bits)


class Awq(Format):
    name = "awq"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales")
    ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column ORDER[i] of its 8

    def __init__(self, quant: dict, path: Path):
        super().__init__(quant, path)
        bits = int(quant.get("bits", quant.get("w_bit", 4)))
        version = str(quant.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not quant.get("zero_point", True):
            raise self.fail(f"AWQ {version} with {bits} bits, zero_point={quant.get('zero_point', True)}")

    def shape(self, prefix, own):
        q = own["qweight"]
        return q.shape[1] * 8, q.shape[0]

    def decode(self, layer, t):
        values = unpack_int32(t["qweight"], 4, 1, self.ORDER).T  # [N, K]
        zeros = unpack_int32(t["qzeros"], 4, 1, self.ORDER).T
        return grouped(values, t["scales"].float().T, zeros, None, 4)

