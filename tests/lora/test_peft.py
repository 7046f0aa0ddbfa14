"""PEFT adapters: nemolite's prompt logprobs against transformers + peft (fp32), and what is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nemolite import LLM, LoRARequest, NemoliteError, SamplingParams
from tests.conftest import DEVICE
from tests.lora.conftest import ADAPTERS, write_peft_adapter

PROMPTS = [[2, 17, 45, 99, 3, 250, 31, 8, 77, 120, 200, 5, 64], [2, 300, 12, 19, 101, 7]]


def reference_logprobs(base, adapter, ids: list[int]) -> list[float]:
    """The logprob of each prompt token after the first under transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def nemolite_logprobs(llm: LLM, ids: list[int], lora: LoRARequest | None) -> list[float]:
    output = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0),
                          lora_request=lora, use_tqdm=False)[0]
    return [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:])]


@pytest.fixture(scope="module")
def lora_llm(lora_base):
    return LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_loras=2, max_lora_rank=8,
               enable_prefix_caching=False)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_prompt_logprobs_equal_transformers_with_peft(lora_llm, lora_base, peft_adapters, name):
    lora = LoRARequest(name, sorted(ADAPTERS).index(name) + 1, str(peft_adapters[name]))
    for ids in PROMPTS:
        expected = reference_logprobs(lora_base, peft_adapters[name], ids)
        base = reference_logprobs(lora_base, None, ids)
        got = nemolite_logprobs(lora_llm, ids, lora)
        assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-4
        assert max(abs(a - b) for a, b in zip(expected, base)) > 0.05  # the adapter changes the model


def test_llama_gate_proj_adapter(llama_lora_base, tmp_path):
    adapter = write_peft_adapter(llama_lora_base, tmp_path / "llama", r=4, lora_alpha=16,
                                 target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], safe=False)
    assert (adapter / "adapter_model.bin").exists()  # read without unpickling code
    llm = LLM(llama_lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=4)
    ids = [0, 17, 45, 99, 3, 250, 31, 8]
    got = nemolite_logprobs(llm, ids, LoRARequest("llama", 1, str(adapter)))
    expected = reference_logprobs(llama_lora_base, adapter, ids)
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-4


def test_base_requests_of_a_lora_engine_are_the_base_model(lora_llm, lora_base):
    ids = PROMPTS[0]
    assert max(abs(a - b) for a, b in zip(nemolite_logprobs(lora_llm, ids, None),
                                          reference_logprobs(lora_base, None, ids))) <= 1e-4


def _edited(source, tmp_path, **changes):
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("field, value", [("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"),
                                          ("fan_in_fan_out", True), ("peft_type", "IA3"),
                                          ("target_modules", ["q_proj", "gate_proj"]),
                                          ("target_modules", "model\\.nothing\\..*")])
def test_unsupported_configurations_are_refused_by_field(lora_llm, peft_adapters, tmp_path, field, value):
    adapter = _edited(peft_adapters["qv"], tmp_path, **{field: value})
    with pytest.raises(NemoliteError, match=field if field != "target_modules" else "gate_proj|matches no layer"):
        lora_llm.generate(prompt_token_ids=[PROMPTS[1]], lora_request=LoRARequest("bad", 90, str(adapter)),
                          use_tqdm=False)


def test_rank_above_the_engine_maximum_is_refused(lora_base, peft_adapters):
    llm = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=4)
    with pytest.raises(NemoliteError, match="max-lora-rank 8"):
        llm.generate(prompt_token_ids=[PROMPTS[1]], use_tqdm=False,
                     lora_request=LoRARequest("all", 1, str(peft_adapters["all-rslora"])))


def test_adapter_without_lora_engine_and_bad_paths(lora_base, lora_llm, tmp_path):
    llm = LLM(lora_base, dtype="float32", device=DEVICE)
    with pytest.raises(NemoliteError, match="enable_lora=True"):
        llm.generate(prompt_token_ids=[PROMPTS[1]], lora_request=LoRARequest("a", 1, str(tmp_path)), use_tqdm=False)
    with pytest.raises(NemoliteError, match="does not exist"):
        lora_llm.generate(prompt_token_ids=[PROMPTS[1]], use_tqdm=False,
                          lora_request=LoRARequest("a", 91, str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NemoliteError, match="not an adapter"):
        lora_llm.generate(prompt_token_ids=[PROMPTS[1]], use_tqdm=False,
                          lora_request=LoRARequest("a", 92, str(tmp_path / "empty")))
    with pytest.raises(ValueError):
        LoRARequest("a", 0, str(tmp_path))


def test_one_id_one_adapter(lora_llm, peft_adapters):
    lora_llm.generate(prompt_token_ids=[PROMPTS[1]], use_tqdm=False,
                      lora_request=LoRARequest("qv", 60, str(peft_adapters["qv"])))
    with pytest.raises(NemoliteError, match="already adapter"):
        lora_llm.generate(prompt_token_ids=[PROMPTS[1]], use_tqdm=False,
                          lora_request=LoRARequest("other", 60, str(peft_adapters["layers"])))


@pytest.mark.parametrize("quantization", ["int8", "int4-g32"])
def test_adapters_on_a_quantized_base(lora_base, peft_adapters, quantization):
    lora = LoRARequest("all", 1, str(peft_adapters["all-rslora"]))
    quantized = LLM(lora_base, dtype="float32", device=DEVICE, quantization=quantization, enable_lora=True,
                    max_lora_rank=8)
    exact = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=8)
    ids = PROMPTS[0]
    with_adapter = nemolite_logprobs(quantized, ids, lora)
    # the adapter's update survives quantization of the base: close to the float model with it, far from without
    assert max(abs(a - b) for a, b in zip(with_adapter, nemolite_logprobs(exact, ids, lora))) < 0.02
    assert max(abs(a - b) for a, b in zip(with_adapter, nemolite_logprobs(quantized, ids, None))) > 0.1


def test_adapter_on_a_reward_model(reward_model_dir, tmp_path):
    """A LoRA of the decoder layers scores through a reward model's head (LLM.reward takes lora_request too):
    the same as the adapter merged into the model."""
    from nemolite.cli import main

    adapter = write_peft_adapter(reward_model_dir, tmp_path / "adapter", r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
    assert main(["merge-lora", str(reward_model_dir), str(adapter), str(tmp_path / "merged")]) == 0
    conversation = [{"role": "user", "content": "the model returns"}, {"role": "assistant", "content": "a value"}]
    served = LLM(reward_model_dir, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=4)
    lora = LoRARequest("a", 1, str(adapter))
    got = served.reward([conversation], lora_request=lora, use_tqdm=False)[0]["attributes"]
    merged = LLM(tmp_path / "merged", dtype="float32", device=DEVICE).reward([conversation], use_tqdm=False)[0]
    base = served.reward([conversation], use_tqdm=False)[0]["attributes"]
    assert max(abs(got[k] - merged["attributes"][k]) for k in got) <= 1e-4
    assert max(abs(got[k] - base[k]) for k in got) > 1e-3


def test_an_adapter_file_larger_than_any_adapter_of_the_model_is_refused_unread(lora_base, peft_adapters, tmp_path):
    from safetensors.torch import save_file

    adapter = tmp_path / "huge"
    shutil.copytree(peft_adapters["qv"], adapter)
    # one declared tensor bigger than every layer of the model at max_lora_rank together (nothing else checked yet)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 2**21)},
              str(adapter / "adapter_model.safetensors"))
    llm = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=4)
    with pytest.raises(NemoliteError, match="nothing was read"):
        llm.generate(prompt_token_ids=[PROMPTS[1]], lora_request=LoRARequest("huge", 1, str(adapter)), use_tqdm=False)
