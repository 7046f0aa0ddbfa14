"""GGUF checkpoints, as llama.cpp's own tools write them.

Files come from llama.cpp's convert_hf_to_gguf.py (``NEMOLITE_TEST_LLAMA_CPP``: the llama.cpp source
directory, e.g. the ``vendor/llama.cpp`` of the llama-cpp-python sdist, which .ci/run downloads) and, for the
K-quants, from its llama-quantize (``NEMOLITE_TEST_LLAMA_QUANTIZE``: the binary; CI has none, those tests
skip). Q4_0/Q4_1/Q5_0/Q5_1 files are the converter's F32 file with its weights quantized by the ``gguf``
package (``gguf.quants.quantize``, the reference quantizer in gguf-py). Every dequantized weight is compared
with ``gguf.quants.dequantize`` (the reference decoder) bit for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_llama, make_nemotron, write_sentencepiece

gguf = pytest.importorskip("gguf")

LLAMA_CPP = os.environ.get("NEMOLITE_TEST_LLAMA_CPP")
LLAMA_QUANTIZE = os.environ.get("NEMOLITE_TEST_LLAMA_QUANTIZE") or shutil.which("llama-quantize")
needs_converter = pytest.mark.skipif(not LLAMA_CPP or not (Path(LLAMA_CPP) / "convert_hf_to_gguf.py").is_file(),
                                     reason="NEMOLITE_TEST_LLAMA_CPP (llama.cpp sources with convert_hf_to_gguf.py) "
                                            "is not set; .ci/run sets it")
needs_quantize = pytest.mark.skipif(not LLAMA_QUANTIZE, reason="no llama-quantize binary "
                                    "(NEMOLITE_TEST_LLAMA_QUANTIZE); CI does not build llama.cpp")
DEMO = Path(__file__).resolve().parents[2] / "nemolite" / "demo" / "model"


def convert(model_dir: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, with the gguf-py next to it."""
    env = {**os.environ, "PYTHONPATH": str(Path(LLAMA_CPP) / "gguf-py"), "NO_LOCAL_GGUF": ""}
    result = subprocess.run([sys.executable, str(Path(LLAMA_CPP) / "convert_hf_to_gguf.py"), str(model_dir),
                             "--outtype", outtype, "--outfile", str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def llama_quantize(source: Path, out: Path, kind: str) -> Path:
    result = subprocess.run([LLAMA_QUANTIZE, str(source), str(out), kind], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def requantize(source: Path, out: Path, qtype) -> Path:
    """``source`` with every 2-D weight quantized to ``qtype`` by gguf.quants.quantize (metadata copied)."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if len(tensor.shape) == 2:
            data = gguf.quants.quantize(data.astype(np.float32), qtype)
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def reference_weights(file: Path) -> dict[str, tuple[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(file))
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def demo_bf16(gguf_dir) -> Path:
    return convert(DEMO, gguf_dir / "demo-bf16.gguf", "bf16")


@pytest.fixture(scope="session")
def demo_q8_0(gguf_dir) -> Path:
    return convert(DEMO, gguf_dir / "demo-q8_0.gguf", "q8_0")


@pytest.fixture(scope="session")
def nemotron_f32(gguf_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A random Nemotron (random LayerNorm1P weights and biases) and its F32 GGUF."""
    hf = make_nemotron(tmp_path_factory.mktemp("nemotron-hf"))
    return hf, convert(hf, gguf_dir / "nemotron-f32.gguf", "f32")


def hf_and_gguf_logits(hf: Path, file: Path, dtype="float32", **kwargs):
    from nemolite.checkpoint import load_checkpoint

    ids = torch.arange(3, 60).remainder(300)[None]
    reference, _ = load_checkpoint(hf, dtype, torch.device("cpu"))
    model, tokenizer = load_checkpoint(file, dtype, torch.device("cpu"), **kwargs)
    with torch.no_grad():
        return reference(ids).float(), model(ids).float(), model, tokenizer


# -- the dequantisers, bit for bit against gguf.quants.dequantize ---------------------------------------------

@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_native_decoders_match_gguf_on_every_bit_pattern(type_name):
    """Random block bytes (every nibble and bit layout; scales made finite) decode as gguf.quants does, both
    to float and through QuantizedLinear's reference dequantiser."""
    from nemolite.checkpoint.gguf_quants import BLOCKS, dequantize, quantized_linear
    from nemolite.quant.linear import dequantize_reference

    elements, nbytes = BLOCKS[type_name]
    rng = np.random.default_rng(0)
    rows, columns = 6, 1024
    raw = rng.integers(0, 256, size=(rows, columns // elements, nbytes), dtype=np.uint8)
    halves = {"Q8_0": [0], "Q5_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[type_name]
    for start in halves:
        raw[..., start:start + 2] = (rng.standard_normal((rows, columns // elements, 1)) * 0.02) \
            .astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, -1)
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    as_float = dequantize(type_name, torch.from_numpy(raw), (rows, columns)).numpy()
    layer = quantized_linear(type_name, torch.from_numpy(raw))
    np.testing.assert_array_equal(as_float, reference)
    np.testing.assert_array_equal(dequantize_reference(layer).numpy(), reference)
    assert layer.method == ("int4" if type_name in ("Q4_0", "Q4_1", "Q4_K") else "int8")
    assert layer.group_size == (16 if type_name == "Q6_K" else 32)


# -- files from llama.cpp's converter -------------------------------------------------------------------------

@needs_converter
def test_bf16_demo_model_loads_exactly_as_its_hf_checkpoint(demo_bf16):
    """The converter's BF16 file gives back every parameter of the HF checkpoint bit for bit (LayerNorm1P
    weights stored +1 in fp32, recovered by subtracting 1)."""
    from nemolite.checkpoint import load_checkpoint

    reference, _ = load_checkpoint(DEMO, "auto", torch.device("cpu"))
    model, _ = load_checkpoint(demo_bf16, "auto", torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.bfloat16
    mine, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    assert model.config.rotary_dim == reference.config.rotary_dim == 32


@needs_converter
def test_gguf_tokenizer_encodes_as_the_sentencepiece_model(demo_bf16):
    """The SentencePiece model rebuilt from tokenizer.ggml.* encodes and decodes like tokenizer.model."""
    import pydoc
    import textwrap

    from nemolite.checkpoint import load_checkpoint
    from nemolite.tokenizer import Tokenizer

    _, tokenizer = load_checkpoint(demo_bf16, "auto", torch.device("cpu"))
    reference = Tokenizer.from_pretrained(DEMO, model_type="nemotron", bos_token_id=2, eos_token_ids=[3])
    text = pydoc.render_doc(textwrap, renderer=pydoc.plaintext) + "  two  spaces\tünïcode 東京 🙂\n"
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == reference.decode(reference.encode(text))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.pad_token) == (2, [3], "<pad>")
    assert tokenizer.chat_format == "nemotron" and tokenizer.chat_template is None


@needs_converter
def test_nemotron_f32_logits_match_hf(nemotron_f32):
    hf, file = nemotron_f32
    expected, got, model, _ = hf_and_gguf_logits(hf, file)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_converter
def test_converter_q8_0_layers_are_its_blocks(demo_q8_0):
    """Q8_0 weights become int8 group-32 QuantizedLinear layers (fp16 scales as stored) whose dequantized
    weight is gguf.quants.dequantize's; the embedding is a float table of the same values."""
    from nemolite.checkpoint import load_checkpoint
    from nemolite.checkpoint.gguf import hf_name
    from nemolite.quant import QuantizedLinear
    from nemolite.quant.linear import dequantize_reference

    model, _ = load_checkpoint(demo_q8_0, "float32", torch.device("cpu"))
    modules = dict(model.named_modules())
    checked = 0
    for name, (type_name, reference) in reference_weights(demo_q8_0).items():
        target = hf_name(name)
        if type_name != "Q8_0":
            continue
        if "embed_tokens" in target:
            np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), reference)
            continue
        layer = modules[target.rpartition(".")[0]]
        assert isinstance(layer, QuantizedLinear) and layer.method == "int8" and layer.group_size == 32
        assert layer.scales.dtype == torch.float16
        np.testing.assert_array_equal(dequantize_reference(layer).numpy(), reference)
        checked += 1
    assert checked == 6 * 6 + 1  # q k v o up down per layer, and the LM head


@needs_converter
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_quantized_nemotron(nemotron_f32, gguf_dir, qtype):
    """Weights quantized by gguf.quants: native types load as their blocks, Q5_1 (no native form) as floats;
    every weight equals gguf.quants.dequantize's, so the logits equal those of the dequantized model."""
    from nemolite.checkpoint import load_checkpoint
    from nemolite.checkpoint.gguf import hf_name
    from nemolite.quant import QuantizedLinear
    from nemolite.quant.linear import dequantize_reference

    hf, f32 = nemotron_f32
    file = requantize(f32, gguf_dir / f"nemotron-{qtype}.gguf", gguf.GGMLQuantizationType[qtype])
    model, _ = load_checkpoint(file, "float32", torch.device("cpu"))
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    for name, (type_name, reference) in reference_weights(file).items():
        target = hf_name(name)
        module = modules.get(target.rpartition(".")[0])
        if isinstance(module, QuantizedLinear):
            assert type_name != "Q5_1"
            np.testing.assert_array_equal(dequantize_reference(module).numpy(), reference)
        elif type_name == qtype:
            np.testing.assert_array_equal(params[target].detach().numpy(), reference)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("QuantizedLinear" in kinds) == (qtype != "Q5_1")
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        logits = model(ids)
    assert torch.isfinite(logits).all()


@needs_converter
def test_quantization_option_quantizes_only_float_layers(demo_q8_0, demo_bf16):
    from nemolite.checkpoint import load_checkpoint
    from nemolite.quant import QuantizedLinear, QuantSpec

    spec = QuantSpec("int4", 32)
    model, _ = load_checkpoint(demo_q8_0, "auto", torch.device("cpu"), quantization=spec)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.method == "int8" for m in layers)  # stored Q8_0: kept, not re-quantised
    model, _ = load_checkpoint(demo_bf16, "auto", torch.device("cpu"), quantization=spec)
    methods = [m.method for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert methods == ["int4"] * 36  # the float file's decoder layers (the head stays float without -head)


@needs_converter
def test_llama_with_llama3_rope_and_permuted_qk(gguf_dir, tmp_path_factory):
    """A Llama: Q/K rows un-permuted, the llama3 RoPE factors (rope_freqs) matched to rope_scaling."""
    hf = make_llama(tmp_path_factory.mktemp("llama-hf"), tokenizer=False, vocab_size=320)
    write_sentencepiece(hf)
    file = convert(hf, gguf_dir / "llama-f32.gguf", "f32")
    expected, got, model, tokenizer = hf_and_gguf_logits(hf, file)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    scaling = model.config.rope_scaling
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    assert tokenizer.encode("the model returns") == tokenizer.encode("the model returns", add_bos=True)


@needs_converter
def test_deci_nas_layers(gguf_dir, tmp_path_factory):
    """A Llama-3.1-Nemotron NAS model: per-layer KV heads and FFN widths, a linear attention replacement,
    a no-op attention and a no-op FFN, as the converter writes their arrays."""
    import json

    from nemolite.checkpoint.hf import load_hf_model, save_hf_model

    raw = {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "vocab_size": 320,
           "hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 4, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 2, "eos_token_id": 3,
           "tie_word_embeddings": False, "dtype": "float32",
           "block_configs": [
               {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
                "ffn": {"ffn_mult": 1.5, "no_op": False, "replace_with_linear": False}},
               {"attention": {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True},
                "ffn": {"ffn_mult": 3.0, "no_op": False, "replace_with_linear": False}},
               {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
                "ffn": {"ffn_mult": 1.0, "no_op": False, "replace_with_linear": False}},
               {"attention": {"n_heads_in_group": 4, "no_op": False, "replace_with_linear": False},
                "ffn": {"ffn_mult": None, "no_op": True, "replace_with_linear": False}}]}
    from nemolite.config import config_from_hf
    from nemolite.model import CausalLM
    from tests.conftest import randomize_norms

    hf = tmp_path_factory.mktemp("deci-hf")
    torch.manual_seed(0)
    model = CausalLM(config_from_hf(raw))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    randomize_norms(model)
    save_hf_model(model, hf, raw)
    write_sentencepiece(hf)
    from transformers import LlamaTokenizerFast  # the converter reads DeciLM's vocabulary from tokenizer.json

    LlamaTokenizerFast(vocab_file=str(hf / "tokenizer.model")).save_pretrained(hf)
    assert load_hf_model(hf).config.layers == model.config.layers
    file = convert(hf, gguf_dir / "deci-f32.gguf", "f32")
    expected, got, loaded, _ = hf_and_gguf_logits(hf, file)
    assert [layer.attention for layer in loaded.config.layers] == ["attention", "linear", "no_op", "attention"]
    assert [layer.mlp for layer in loaded.config.layers] == ["swiglu", "swiglu", "swiglu", "no_op"]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert json.loads((hf / "config.json").read_text())["block_configs"][1]["attention"]["replace_with_linear"]


@needs_converter
def test_directory_dispatch_and_llm(demo_bf16, tmp_path):
    from nemolite import LLM, SamplingParams
    from nemolite.checkpoint import model_config
    from nemolite.errors import NemoliteError

    directory = tmp_path / "one"
    directory.mkdir()
    (directory / "demo.gguf").symlink_to(demo_bf16)
    assert model_config(directory).model_type == "nemotron"
    llm = LLM(str(directory), dtype="float32")
    out = llm.generate(["The json module"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    (directory / "other.gguf").symlink_to(demo_bf16)
    with pytest.raises(NemoliteError, match="2 .gguf files"):
        model_config(directory)


@needs_converter
def test_parallel_is_refused(demo_bf16):
    from types import SimpleNamespace

    from nemolite.checkpoint.gguf import load_gguf_model
    from nemolite.errors import NemoliteError

    with pytest.raises(NemoliteError, match="one device only"):
        load_gguf_model(demo_bf16, parallel=SimpleNamespace(distributed=True))


def test_unsupported_architecture_is_refused(tmp_path):
    from nemolite.checkpoint.gguf import GGUFCheckpoint
    from nemolite.errors import NemoliteError

    file = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(file), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NemoliteError, match="architecture 'gpt2' is not supported"):
        GGUFCheckpoint(file)


# -- llama-quantize (K-quants): only where the binary is given ------------------------------------------------

@needs_converter
@needs_quantize
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K_M", "Q6_K"])
def test_llama_quantize_files(demo_bf16, gguf_dir, kind):
    """llama-quantize's Q4_0, Q4_K_M (Q4_K with Q6_K for some tensors) and Q6_K: every quantized layer holds
    the file's blocks (dequantizing to gguf.quants.dequantize's values), and the model's perplexity on the
    demo's own kind of text stays near the BF16 file's."""
    from nemolite.checkpoint import load_checkpoint
    from nemolite.checkpoint.gguf import hf_name
    from nemolite.quant import QuantizedLinear
    from nemolite.quant.linear import dequantize_reference

    file = llama_quantize(demo_bf16, gguf_dir / f"demo-{kind}.gguf", kind)
    model, tokenizer = load_checkpoint(file, "float32", torch.device("cpu"))
    modules = dict(model.named_modules())
    seen = set()
    for name, (type_name, reference) in reference_weights(file).items():
        module = modules.get(hf_name(name).rpartition(".")[0])
        if isinstance(module, QuantizedLinear):
            seen.add(type_name)
            np.testing.assert_array_equal(dequantize_reference(module).numpy(), reference)
    assert seen >= {"Q4_K_M": {"Q4_K", "Q6_K"}}.get(kind, {kind})
    reference_model, _ = load_checkpoint(demo_bf16, "float32", torch.device("cpu"))
    import pydoc
    import json as json_module

    ids = torch.tensor([tokenizer.encode(pydoc.render_doc(json_module, renderer=pydoc.plaintext))[:512]])

    def perplexity(m):
        with torch.no_grad():
            logits = m(ids).float()
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp())

    assert perplexity(model) < 1.15 * perplexity(reference_model)
