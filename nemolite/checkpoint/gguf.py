"""GGUF checkpoints (llama.cpp's format): ``LLM("model.gguf")``, or a directory holding one .gguf file.

Read with the ``gguf`` package's ``GGUFReader`` (gguf-py in https://github.com/ggml-org/llama.cpp;
format: docs/gguf.md of https://github.com/ggml-org/ggml). Architectures ``nemotron`` (Nemotron-3/4,
Minitron), ``llama`` and ``deci`` (Llama-3.1-Nemotron NAS), as llama.cpp's convert_hf_to_gguf.py writes
them (conversion/nemotron.py, llama.py, deci.py there):

- tensor names ``token_embd``, ``blk.N.attn_q`` ... map to the HF names nemolite's CausalLM uses;
- ``nemotron`` norm weights are stored +1 (the converter folds LayerNorm1P's +1 into them): 1 is subtracted
  (in fp32, so the stored value comes back exactly);
- ``llama``/``deci`` Q and K rows are permuted for ggml's interleaved RoPE (``LlamaModel.permute``): undone;
- ``deci`` stores per-layer head counts (0: no-op attention; no KV heads: a linear replacement) and FFN
  widths (0: no-op FFN) as arrays;
- Llama-3 RoPE scaling is stored as the ``rope_freqs`` factors; they are matched to rope_scaling parameters.

Quantized weights (gguf_quants.NATIVE) become QuantizedLinear layers holding their values and scales as
stored; embeddings and other types are dequantized to the model dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nemolite.checkpoint.gguf_quants import FLOATS, NATIVE, dequantize, quantized_linear
from nemolite.config import LayerSpec, ModelConfig
from nemolite.errors import NemoliteError

log = logging.getLogger(__name__)

ARCHITECTURES = ("nemotron", "llama", "deci")
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "ffn_gate": "mlp.gate_proj"}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output_norm.bias": "model.norm.bias", "output.weight": "lm_head.weight"}


def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names: a .gguf file, or the one .gguf file of a directory without an HF
    config.json or a NeMo model_config.yaml; None when ``path`` is not a GGUF checkpoint."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists() or (path / "model_config.yaml").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise NemoliteError(f"{path} holds {len(files)} .gguf files ({', '.join(f.name for f in files[:6])}); "
                            "pass the one to load")
    return files[0] if files else None


class GGUFCheckpoint:
    """An open GGUF file: metadata (key → Python value) and tensors by name."""

    def __init__(self, file: Path):
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(file), "r")
        except (OSError, ValueError, KeyError, IndexError) as error:
            raise NemoliteError(f"{file} is not a readable GGUF file ({type(error).__name__}: {error})") from None
        self.file = file
        self.meta = {key: field.contents() for key, field in self.reader.fields.items() if not key.startswith("GGUF.")}
        self.tensors = {t.name: t for t in self.reader.tensors}
        if int(self.meta.get("split.count", 1) or 1) > 1:
            raise NemoliteError(f"{file} is one part of a split GGUF model; merge it first with llama-gguf-split --merge")
        self.arch = self.meta.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise NemoliteError(f"GGUF architecture {self.arch!r} is not supported; nemolite loads "
                                f"{', '.join(ARCHITECTURES)}")

    def get(self, key: str, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """The torch shape (GGUF lists dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes as a uint8 [rows, row_bytes] tensor (a copy, out of the memory map)."""
        tensor = self.tensors[name]
        data = torch.from_numpy(tensor.data.copy()).contiguous().view(torch.uint8)
        rows = self.shape(name)[0] if len(tensor.shape) > 1 else 1
        return data.reshape(rows, -1)

    def float(self, name: str) -> torch.Tensor:
        return dequantize(self.type_name(name), self.raw(name), self.shape(name))


def _per_layer(value, count: int, what: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count or not all(isinstance(v, int) and v >= 0 for v in values):
        raise NemoliteError(f"GGUF {what} must be a count or {count} counts, got {value!r}")
    return [int(v) for v in values]


def config_from_gguf(checkpoint: GGUFCheckpoint) -> ModelConfig:
    g, arch = checkpoint.get, checkpoint.arch
    num_layers, hidden = g("block_count"), g("embedding_length")
    if not isinstance(num_layers, int) or not isinstance(hidden, int):
        raise NemoliteError(f"GGUF file lacks {arch}.block_count or {arch}.embedding_length")
    heads = _per_layer(g("attention.head_count"), num_layers, f"{arch}.attention.head_count")
    kv_heads = _per_layer(g("attention.head_count_kv", g("attention.head_count")), num_layers,
                          f"{arch}.attention.head_count_kv")
    ffn = _per_layer(g("feed_forward_length"), num_layers, f"{arch}.feed_forward_length")
    num_heads = max(heads)
    head_dim = g("attention.key_length") or hidden // max(num_heads, 1)
    layers = []
    for index in range(num_layers):
        if arch == "deci" and heads[index] == 0:
            attention = "no_op"
        elif arch == "deci" and kv_heads[index] == 0:
            attention = "linear"
        else:
            attention = "attention"
        if arch == "deci" and ffn[index] == 0:
            mlp = "no_op"
        elif arch == "deci" and f"blk.{index}.ffn_up.weight" not in checkpoint.tensors:
            raise NemoliteError(f"GGUF deci layer {index} has no FFN tensors nemolite knows")
        else:
            mlp = "relu2" if arch == "nemotron" else "swiglu"
        layers.append(LayerSpec(attention, kv_heads[index] if attention == "attention" else 0, mlp,
                                ffn[index] if mlp != "no_op" else 0))
    rope_dim = g("rope.dimension_count") or head_dim
    eps = g("attention.layer_norm_epsilon") if arch == "nemotron" else g("attention.layer_norm_rms_epsilon")
    rope_scaling = _rope_scaling(checkpoint, rope_dim)
    vocab = checkpoint.shape("token_embd.weight")[0]
    model_type = {"deci": "nemotron-nas"}.get(arch, arch)
    eos = [checkpoint.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelConfig(
        model_type=model_type, vocab_size=vocab, hidden_size=hidden, num_attention_heads=num_heads,
        head_dim=int(head_dim), layers=layers, norm="layernorm1p" if arch == "nemotron" else "rmsnorm",
        norm_eps=float(eps if eps is not None else 1e-5), rope_theta=float(g("rope.freq_base", 10000.0)),
        partial_rotary_factor=rope_dim / head_dim, rope_scaling=rope_scaling,
        max_position_embeddings=int(g("context_length", 4096)),
        tie_word_embeddings="output.weight" not in checkpoint.tensors,
        attention_bias="blk.0.attn_q.bias" in checkpoint.tensors or "blk.0.attn_output.bias" in checkpoint.tensors,
        mlp_bias="blk.0.ffn_up.bias" in checkpoint.tensors,
        bos_token_id=checkpoint.meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(e for e in eos if e is not None)),
        torch_dtype={"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(
            checkpoint.type_name("token_embd.weight"), "bfloat16"),
    ).validate()


def _rope_scaling(checkpoint: GGUFCheckpoint, rope_dim: int) -> dict | None:
    kind = checkpoint.get("rope.scaling.type", "none")
    factor = checkpoint.get("rope.scaling.factor")
    if "rope_freqs.weight" in checkpoint.tensors:  # Llama-3 scaling, stored as one factor per frequency
        return _llama3_scaling(checkpoint, rope_dim)
    if kind in ("none", None) or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise NemoliteError(f"GGUF RoPE scaling {kind!r} is not supported (nemolite has linear and llama3)")


def _llama3_scaling(checkpoint: GGUFCheckpoint, rope_dim: int) -> dict:
    """The llama3 rope_scaling whose factors (inv_freq / scaled inv_freq) are the file's rope_freqs."""
    from nemolite.model.layers import rope_inverse_frequencies

    stored = checkpoint.float("rope_freqs.weight").flatten()
    factor = float(stored.max())
    theta = float(checkpoint.get("rope.freq_base", 10000.0))
    probe = ModelConfig("llama", 1, rope_dim, 1, rope_dim, [LayerSpec()], rope_theta=theta)
    plain = rope_inverse_frequencies(probe)
    if len(stored) != len(plain):
        raise NemoliteError(f"GGUF rope_freqs holds {len(stored)} factors for a rotary dimension of {rope_dim}")
    candidates = [(8192, 1.0, 4.0)]  # Llama-3.1's
    # Between the two wavelength bounds the factor f gives smooth = (1/f - 1/factor) / (1 - 1/factor), linear
    # in 1/wavelength: smooth = a/wavelength + b with a = original/(high - low), b = -low/(high - low). Only the
    # factors matter (nemolite then computes the same frequencies), so low = 1 is taken and the rest solved for.
    wavelength = 2 * torch.pi / plain.double()
    middle = ((stored > 1) & (stored < factor)).nonzero().flatten()
    if factor > 1 and len(middle):
        smooth = (1 / stored[middle].double() - 1 / factor) / (1 - 1 / factor)
        if len(middle) >= 2:
            a = float((smooth[-1] - smooth[0]) / (1 / wavelength[middle[-1]] - 1 / wavelength[middle[0]]))
            b = float(smooth[0] - a / wavelength[middle[0]])
            if b < 0:
                candidates.append((-a / b, 1.0, 1 - 1 / b))
        for high in (4.0, 2.0, 8.0):  # one point: original = (smooth (high - 1) + 1) wavelength
            candidates.append((float((smooth[0] * (high - 1) + 1) * wavelength[middle[0]]), 1.0, high))
    elif factor > 1 and bool((stored == 1).any()):  # a jump from 1 to factor: original between the two
        last_one, first_scaled = wavelength[stored == 1].max(), wavelength[stored == factor].min()
        candidates.append((float((4 * last_one * first_scaled).sqrt()), 1.0, 4.0))
    for original, low, high in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": original}
        probe.rope_scaling = scaling
        if torch.allclose(plain / rope_inverse_frequencies(probe), stored, rtol=1e-4, atol=0):
            return scaling
    raise NemoliteError("GGUF rope_freqs factors match no llama3 RoPE scaling nemolite knows")


def hf_name(name: str, config: ModelConfig | None = None) -> str | None:
    """nemolite's (HF) parameter name of a GGUF tensor; None for tensors that are not parameters. A deci
    layer whose attention is a linear replacement stores that matrix as its ``attn_output``."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        index = int(parts[1])
        if (parts[2] == "attn_output" and config is not None and index < config.num_layers
                and config.layers[index].attention == "linear"):
            return f"model.layers.{index}.self_attn.linear_attn.{parts[3]}"
        return f"model.layers.{index}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute on the rows (dim 0) of any per-row data."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def load_gguf_model(file: Path, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu",
                    parallel=None, quantization=None):
    """(CausalLM, GGUFCheckpoint) for a GGUF file; ``quantization`` quantizes the layers stored as floats
    (and the LM head with ``lm_head``), keeping those stored quantized as they are."""
    from nemolite.checkpoint.hf import resolve_dtype
    from nemolite.model import CausalLM
    from nemolite.quant.model import fused_bias, install, quantize_model

    if parallel is not None and getattr(parallel, "distributed", False):
        raise NemoliteError("GGUF checkpoints load on one device only (no tensor or pipeline parallelism); "
                            "convert to a Hugging Face checkpoint for a parallel job")
    checkpoint = GGUFCheckpoint(Path(file))
    config = config_from_gguf(checkpoint)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = CausalLM(config)
    params = model.checkpoint_parameters()
    modules = dict(model.named_modules())
    names = {hf_name(n, config): n for n in checkpoint.tensors if hf_name(n) is not None}
    unknown = sorted(n for n in checkpoint.tensors if hf_name(n) is None and n != "rope_freqs.weight")
    missing, extra = sorted(params.keys() - names.keys()), sorted(names.keys() - params.keys())
    if unknown or missing or extra:
        raise NemoliteError(f"GGUF file {file} does not match its {checkpoint.arch} metadata: unknown tensors "
                            f"{unknown[:8]}, missing {missing[:8]}, unexpected {extra[:8]}")
    for name in names:
        if tuple(params[name].shape) != checkpoint.shape(names[name]):
            raise NemoliteError(f"GGUF tensor {names[name]} has shape {list(checkpoint.shape(names[name]))}, "
                                f"the metadata implies {list(params[name].shape)}")
    model.materialize(torch_dtype, device)
    params = model.checkpoint_parameters()
    quantized = {}
    with torch.no_grad():
        for name, gguf_name in names.items():
            type_name = checkpoint.type_name(gguf_name)
            if type_name not in FLOATS and type_name not in NATIVE:
                log.info("GGUF tensor %s (%s) is dequantized to %s", gguf_name, type_name, torch_dtype)
            module_name = name.rpartition(".")[0]
            if name.endswith(".weight") and type_name in NATIVE and "embed_tokens" not in name:
                quantized[module_name] = (gguf_name, type_name)
                continue
            value = checkpoint.float(gguf_name)
            if checkpoint.arch == "nemotron" and "norm." in name and name.endswith(".weight"):
                value = value - 1  # the converter stored LayerNorm1P's weight + 1
            params[name].data.copy_(_unpermuted(checkpoint, config, name, value))
        for module_name, (gguf_name, type_name) in quantized.items():
            module = modules[module_name]
            raw = _unpermuted(checkpoint, config, module_name + ".weight", checkpoint.raw(gguf_name))
            layer = quantized_linear(type_name, raw, fused_bias(module))
            install(model, module_name, module, layer.to(device))
        if quantization is not None:  # the layers the file holds in float
            quantize_model(model, quantization)
    if quantized:
        _trim_heap()
    return model.eval(), checkpoint


def _trim_heap() -> None:
    """Hand the float buffers freed while decoding back to the system (glibc keeps them otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _unpermuted(checkpoint: GGUFCheckpoint, config: ModelConfig, name: str, rows: torch.Tensor) -> torch.Tensor:
    if checkpoint.arch == "nemotron" or not name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight",
                                                          "k_proj.bias")):
        return rows
    layer = config.layers[int(name.split(".")[2])]
    heads = config.num_attention_heads if ".q_proj." in name else layer.num_kv_heads
    return _unpermute(rows, heads)


def load_gguf(file: Path, dtype="auto", device=None, tokenizer=None, parallel=None, quantization=None):
    """(CausalLM, Tokenizer): the tokenizer from the file's metadata unless ``tokenizer`` names a directory."""
    from nemolite.checkpoint.gguf_vocab import tokenizer_from_gguf
    from nemolite.tokenizer import Tokenizer

    model, checkpoint = load_gguf_model(file, dtype, device or "cpu", parallel, quantization)
    config = model.config
    if tokenizer is not None:
        return model, Tokenizer.from_pretrained(tokenizer, model_type=config.model_type,
                                                bos_token_id=config.bos_token_id, eos_token_ids=config.eos_token_ids)
    return model, tokenizer_from_gguf(checkpoint.meta, config.model_type)
