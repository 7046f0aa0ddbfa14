"""Produce NVIDIA ModelOpt HF exports (FP8, INT4_AWQ) of the nemolite demo model with mtq.quantize +
export_hf_checkpoint, and modelopt's own weight-only reference: each quantized layer's fake-quantized
weight (weight_quantizer(weight), times the AWQ pre_quant_scale of its input) in a plain fp32 model.

Run in its own virtual environment (never nemolite's), e.g. /work/venvs/mopt: pip install torch==2.13.0 && pip install nvidia-modelopt==0.47.0 transformers requests torch==2.13.0  # ~7.5 min

    python tests/checkpoint/quant_producers/modelopt_checkpoints.py OUT_DIR mo-fp8 mo-int4-awq

then ``NEMOLITE_TEST_QUANT_FIXTURES=OUT_DIR pytest tests/checkpoint/test_hf_quant.py`` checks nemolite's
logits against each reference.pt; compare_with_reference.py OUT_DIR/* prints the differences.
"""
import sys, shutil, time, copy
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint

SRC = Path(__file__).resolve().parents[3] / "nemolite" / "demo" / "model"
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("quantized-fixtures")
IDS = torch.tensor([[2, 17, 300, 45, 1000, 7, 99, 512, 3000, 8, 64, 2048]])

def forward_loop(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(8):
            model(torch.randint(4, 4096, (2, 64), generator=g))

def produce(name, cfg):
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32)
    t = time.time()
    cfg = copy.deepcopy(cfg)
    model = mtq.quantize(model, cfg, forward_loop)
    print(name, "quantize", round(time.time() - t, 1), "s", flush=True)
    with torch.no_grad():
        full_before = model(IDS).logits
    # the export first resmooths/requantizes layers sharing an input (q/k/v get one AWQ input scale,
    # folded into the LayerNorm1P as (w+1)*s-1; FP8 q/k/v one weight scale) in place: run that step here,
    # then take modelopt's own dequantised weights, then export (which compresses the model in place)
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    requantize_resmooth_fused_llm_layers(model)
    plain = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32)
    own = {k: v.detach().float() for k, v in model.state_dict().items()}
    dense = {k: own[k].clone() for k in plain.state_dict()}
    with torch.no_grad():
        for mname, module in model.named_modules():
            wq = getattr(module, "weight_quantizer", None)
            if wq is None or not getattr(wq, "is_enabled", False):
                continue
            w = wq(module.weight.float())
            iq = getattr(module, "input_quantizer", None)
            pqs = getattr(iq, "pre_quant_scale", None) if iq is not None else None
            if pqs is not None:
                w = w * pqs.float().reshape(1, -1)
            dense[mname + ".weight"] = w
        plain.load_state_dict(dense)
        logits = plain(IDS).logits
        full = model(IDS).logits
    export_hf_checkpoint(model, export_dir=str(out))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SRC / f, out / f)
    torch.save({"ids": IDS, "logits": logits, "library_logits": full, "weights": dense}, out / "reference.pt")
    print(name, "weight-only vs library forward", (logits - full).abs().max().item(),
          "library forward before vs after export", (full - full_before).abs().max().item(), flush=True)


if __name__ == "__main__":
    cfgs = {"mo-fp8": mtq.FP8_DEFAULT_CFG, "mo-int4-awq": mtq.INT4_AWQ_CFG}
    for name in sys.argv[2:]:
        produce(name, cfgs[name])
