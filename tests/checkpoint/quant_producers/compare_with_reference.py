"""nemolite's logits and weights for pre-quantized checkpoints against each producer's reference.pt (run in
nemolite's environment): python tests/checkpoint/quant_producers/compare_with_reference.py OUT_DIR/*"""
import sys, torch
from pathlib import Path
from nemolite.checkpoint.hf import load_hf_model
from nemolite.quant.linear import QuantizedLinear
for d in sys.argv[1:]:
    d = Path(d)
    ref = torch.load(d / "reference.pt")
    model = load_hf_model(d, "float32")
    with torch.no_grad():
        logits = model(ref["ids"])
    names = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for m in names.values():
        eff = m.dequantize() * (m.pre_quant_scale[None, :] if hasattr(m, "pre_quant_scale") else 1)
        m.dequantize = lambda eff=eff: eff
    wdiff = max((m.dequantize() - ref["weights"][n + ".weight"]).abs().max().item() for n, m in names.items())
    wrel = max(((m.dequantize() - ref["weights"][n + ".weight"]).abs().max() / ref["weights"][n + ".weight"].abs().max()).item() for n, m in names.items())
    kinds = sorted({repr(m).split("(")[1].split(",")[0] for m in names.values()})
    scale = ref["logits"].abs().max().item()
    print(f"{d.name}: {len(names)} QuantizedLinear {kinds}; logits max|diff| {(logits - ref['logits']).abs().max().item():.3g} "
          f"(logits max {scale:.3g}); weights max|diff| {wdiff:.3g} (rel to row amax {wrel:.3g})"
          + (f"; vs library's full forward {(logits - ref['library_logits']).abs().max().item():.3g}" if "library_logits" in ref else ""))
