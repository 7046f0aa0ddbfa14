"""Weight-only quantization: int8 per output channel (or per group) and group-wise int4.

``QuantizedLinear`` (nemolite.quant.linear) is the one internal form every quantized weight takes,
whether quantized at load (``LLM(path, quantization="int4")``) or read from a pre-quantized file
(GGUF, compressed-tensors, ModelOpt, GPTQ/AWQ): loaders hand it integer values and scales, and it
packs them for the CPU kernels (nemolite/csrc/quant_kernels.cpp).
"""

from __future__ import annotations

from nemolite.quant.linear import QuantizedLinear, quantize_weight
from nemolite.quant.spec import QuantSpec, parse_quantization
from nemolite.quant.model import quantize_model, quantized_weight_bytes

__all__ = ["QuantSpec", "QuantizedLinear", "parse_quantization", "quantize_model", "quantize_weight",
           "quantized_weight_bytes"]
