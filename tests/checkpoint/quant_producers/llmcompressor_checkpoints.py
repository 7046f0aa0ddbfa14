"""Produce compressed-tensors checkpoints of the nemolite demo model with llmcompressor's oneshot, and the
library's own dequantised reference logits (compressed-tensors decompress -> transformers forward, fp32).

Run in its own virtual environment (never nemolite's), e.g. /work/venvs/llmc: pip install torch==2.13.0 && pip install llmcompressor==0.14.0.1 torch==2.13.0  # ~3.5 min

    python tests/checkpoint/quant_producers/llmcompressor_checkpoints.py OUT_DIR ct-fp8-dynamic ct-fp8-static ct-w4a16 ct-w4a16-asym ct-w8a16 ct-w8a8

then ``NEMOLITE_TEST_QUANT_FIXTURES=OUT_DIR pytest tests/checkpoint/test_hf_quant.py`` checks nemolite's
logits against each reference.pt; compare_with_reference.py OUT_DIR/* prints the differences.
"""
import sys, json, shutil, time
from pathlib import Path
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

SRC = Path(__file__).resolve().parents[3] / "nemolite" / "demo" / "model"
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("quantized-fixtures")
IDS = torch.tensor([[2, 17, 300, 45, 1000, 7, 99, 512, 3000, 8, 64, 2048]])

def calibration():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, 4096, (64,), generator=g).tolist() for _ in range(16)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 64 for _ in rows]})

def produce(name, recipe):
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
    t = time.time()
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    data = {} if "fp8" in name else {"dataset": calibration(), "max_seq_length": 64, "num_calibration_samples": 16}
    oneshot(model=model, recipe=recipe, processor=processor, **data)
    model.save_pretrained(out, save_compressed=True)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SRC / f, out / f)
    print(name, "oneshot+save", round(time.time() - t, 1), "s", flush=True)
    reference(out)


def reference(out):
    """The library's own decompression (transformers + compressed-tensors, run_compressed=False) into dense
    weights, put in a plain fp32 model: weight-only logits, what nemolite computes."""
    from transformers import CompressedTensorsConfig
    q = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False),
                                             dtype=torch.float32)
    state = q.state_dict()
    plain = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32)
    dense = {k: state[k].float() for k in plain.state_dict()}
    plain.load_state_dict(dense)
    with torch.no_grad():
        logits = plain(IDS).logits
        full = q(IDS).logits  # with the scheme's activation quantization too, for information
    torch.save({"ids": IDS, "logits": logits, "library_logits": full, "weights": dense}, out / "reference.pt")
    print(out.name, "weight-only vs library forward max diff", (logits - full).abs().max().item(), flush=True)


if __name__ == "__main__":
    from llmcompressor.modifiers.quantization import QuantizationModifier
    which = sys.argv[2:]
    recipes = {
        "ct-fp8-dynamic": QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]),
        "ct-fp8-static": QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"]),
        "ct-w4a16": GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
        "ct-w4a16-asym": GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"]),
        "ct-w8a16": GPTQModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]),
        "ct-w8a8": GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    }
    for name in which:
        if name.startswith('ref:'):
            reference(OUT / name[4:])
        else:
            produce(name, recipes[name])
