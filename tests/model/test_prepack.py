"""CPU linears on oneDNN-prepacked weights: the same logits as the plain model, the plain copy freed."""

from __future__ import annotations

import pytest
import torch

from nemolite.checkpoint.hf import load_hf_model
from nemolite.model.layers import Linear
from tests.conftest import make_nemotron


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)],
                         ids=["untied", "tied-with-biases"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_prepacked_model_gives_the_same_logits(tmp_path, overrides, dtype, tolerance):
    directory = make_nemotron(tmp_path, tokenizer=False, num_hidden_layers=3, **overrides)
    model = load_hf_model(directory, dtype=dtype, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).float()
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    if not model.prepack_linears():
        pytest.skip("this torch build has no oneDNN for this dtype")
    assert all(module.packed is not None for module in linears)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == bool(overrides)
    for module in linears:  # freed, except the tied head's weight, which the embedding reads
        kept = tied and module is model.lm_head
        assert module.weight.numel() == (module.in_features * module.out_features if kept else 0)
    with torch.no_grad():
        got = model(ids).float()
    assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()


def test_the_cpu_engine_prepacks_and_other_devices_do_not(nemotron_llm):
    linears = [module for module in nemotron_llm.model.modules() if isinstance(module, Linear)]
    on_cpu = next(nemotron_llm.model.parameters()).device.type == "cpu"
    if on_cpu and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert linears and all((module.packed is not None) == on_cpu for module in linears)
