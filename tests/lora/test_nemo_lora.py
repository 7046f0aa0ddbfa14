"""NeMo 1.x LoRA adapters (``.nemo``): nemolite's prompt logprobs against NeMo 2.4.1's own forward with the
adapter (``nemo_lora_writer.py``, in a subprocess), and, without NeMo, the reader on synthetic adapters laid out
as NeMo's ParallelLinearAdapter shards them, and what is refused.

NeMo 2.4.1 and megatron-core 0.13.1 come from ``NEMOLITE_TEST_NEMO241_PATH`` (``pip install --no-deps --target
DIR -r .ci/nemo-2.4.1.txt``); without it the NeMo tests skip.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from nemolite import LLM, LoRARequest, NemoliteError, SamplingParams
from nemolite.lora.formats import read_adapter
from nemolite.lora.nemo import is_nemo_adapter, read_nemo_adapter
from tests.conftest import DEVICE, run_nemo_writer

WRITER = Path(__file__).with_name("nemo_lora_writer.py")
# adapter -> its base model, as nemo_lora_writer.ADAPTERS writes them
ADAPTERS = {"nemotron_all": "nemotron", "nemotron_qkv_layer2": "nemotron", "nemotron_canonical_mlp": "nemotron",
            "llama_all": "llama", "llama_canonical": "llama"}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    site = os.environ.get("NEMOLITE_TEST_NEMO241_PATH")
    if not site:
        pytest.skip("NEMOLITE_TEST_NEMO241_PATH is not set (.ci/run sets it)")
    return run_nemo_writer(WRITER, tmp_path_factory.mktemp("nemo_lora"), [site])


@pytest.fixture(scope="module")
def engines(written) -> dict[str, LLM]:
    # canonical LoRA on an ungated MLP serves its gate and up halves as one LoRA of twice the rank (8)
    return {base: LLM(str(written / f"{base}_base.nemo"), dtype="float32", device=DEVICE, enable_lora=True,
                      max_loras=2, max_lora_rank=8, enable_prefix_caching=False) for base in ("nemotron", "llama")}


def nemolite_logprobs(llm: LLM, ids: list[int], lora: LoRARequest | None) -> torch.Tensor:
    output = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0),
                          lora_request=lora, use_tqdm=False)[0]
    return torch.tensor([entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:])])


def nemo_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    logprobs = logits.double().log_softmax(-1)
    return torch.tensor([logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)])


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_prompt_logprobs_equal_nemo_with_lora(written, engines, adapter):
    base = ADAPTERS[adapter]
    input_ids = torch.load(written / "input_ids.pt")
    expected, base_logits = torch.load(written / f"{adapter}_logits.pt"), torch.load(written / f"{base}_base_logits.pt")
    lora = LoRARequest(adapter, sorted(ADAPTERS).index(adapter) + 1, str(written / f"{adapter}.nemo"))
    for row, ids in enumerate(input_ids.tolist()):
        got = nemolite_logprobs(engines[base], ids, lora)
        reference = nemo_logprobs(expected[row], ids)
        assert (got - reference).abs().max().item() <= 1e-4, adapter
        assert (reference - nemo_logprobs(base_logits[row], ids)).abs().max().item() > 0.05  # the adapter shows
        assert (nemolite_logprobs(engines[base], ids, None) - nemo_logprobs(base_logits[row], ids)).abs().max() <= 1e-4


def test_extracted_and_nim_layouts_read_the_same(written, tmp_path):
    tar = written / "nemotron_all.nemo"
    extracted = tmp_path / "extracted"
    with tarfile.open(tar) as archive:
        archive.extractall(extracted, filter="data")
    nim = tmp_path / "nim"
    nim.mkdir()
    (nim / "nemotron_all.nemo").write_bytes(tar.read_bytes())
    reference = read_nemo_adapter(tar, "a", {})
    assert sorted(reference.weights) == sorted(f"model.layers.{i}.{p}" for i in range(3) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"))
    assert reference.weights["model.layers.0.self_attn.q_proj"].lora_b.shape == (4 * 24, 4)  # kv_channels, not 16
    for path in (extracted, nim):
        assert is_nemo_adapter(path)
        adapter = read_adapter(str(path), "a", {})
        for layer, weights in reference.weights.items():
            assert torch.equal(weights.lora_a, adapter.weights[layer].lora_a)
            assert torch.equal(weights.lora_b, adapter.weights[layer].lora_b)


# -- synthetic adapters in NeMo's layout, no NeMo needed ------------------------------------------------------------

NEMOTRON = dict(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                kv_channels=12, normalization="layernorm1p", activation="squared-relu")
LLAMA = dict(num_layers=4, hidden_size=32, ffn_hidden_size=40, num_attention_heads=4, num_query_groups=2,
             normalization="rmsnorm", activation="fast-swiglu")
ATTENTION, MLP = "self_attention.adapter_layer.", "mlp.adapter_layer."


def model_config(base: dict, variant: str = "nemo", tp: int = 1, pp: int = 1, **lora) -> dict:
    tuning = {"variant": variant, "target_modules": ["all"], "adapter_dim": 4, "alpha": 6, "adapter_dropout": 0.0,
              "layer_selection": None, "weight_tying": False, **lora}
    return {**base, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "peft": {"peft_scheme": "lora", "lora_tuning": tuning}}


def synthetic_state(base: dict, variant: str, r: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Whole (TP=1) adapter tensors as NeMo names them: {key: tensor}."""
    generator = torch.Generator().manual_seed(seed)
    hidden, ffn, heads = base["hidden_size"], base["ffn_hidden_size"], base["num_attention_heads"]
    head_dim = base.get("kv_channels", hidden // heads)
    groups, fc1 = base["num_query_groups"], base["ffn_hidden_size"] * (2 if base["activation"] == "fast-swiglu" else 1)
    adapters = {ATTENTION + "lora_dense_attention_adapter.": (heads * head_dim, hidden),
                MLP + "lora_4htoh_adapter.": (ffn, hidden)}
    if variant == "nemo":
        adapters[ATTENTION + "lora_kqv_adapter."] = (hidden, (heads + 2 * groups) * head_dim)
        adapters[MLP + "lora_hto4h_adapter."] = (hidden, fc1)
    else:
        for part, rows in (("q", hidden), ("k", groups * head_dim), ("v", groups * head_dim)):
            adapters[ATTENTION + f"lora_unfused_kqv_adapter.{part}_adapter."] = (hidden, rows)
        for part in ("gate", "up"):
            adapters[MLP + f"lora_unfused_hto4h_adapter.{part}_adapter."] = (hidden, fc1 // 2)
    state = {}
    for layer in range(base["num_layers"]):
        for prefix, (inputs, outputs) in adapters.items():
            key = f"model.decoder.layers.{layer}.{prefix}"
            state[key + "linear_in.weight"] = torch.randn(r, inputs, generator=generator)
            state[key + "linear_out.weight"] = torch.randn(outputs, r, generator=generator)
    return state


def shard(state: dict, tp: int, pp: int, num_layers: int, gated: bool) -> dict[tuple[int, int], dict]:
    """Split as ParallelLinearAdapter does: linear_in of a column-parallel target (kqv, hto4h) along r, of a
    row-parallel one (dense, 4htoh) along its input; linear_out along its rows, a fused gated hto4h's as
    [gate_r; up_r] per rank. Each pipeline stage numbers its layers from 0."""
    shards = {(t, p): {} for t in range(tp) for p in range(pp)}
    per_stage = num_layers // pp
    for key, tensor in state.items():
        layer = int(key.split(".")[3])
        stage, local = divmod(layer, per_stage)
        local_key = key.replace(f"layers.{layer}.", f"layers.{local}.")
        row_parallel = "dense_attention" in key or "4htoh" in key
        if key.endswith("linear_in.weight"):
            pieces = tensor.chunk(tp, dim=1 if row_parallel else 0)
        elif gated and "lora_hto4h_adapter" in key:
            gate, up = tensor.chunk(2, dim=0)
            pieces = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
        else:
            pieces = tensor.chunk(tp, dim=0)
        for t, piece in enumerate(pieces):
            shards[(t, stage)][local_key] = piece.clone()
    return shards


def write_nemo(path: Path, config: dict, shards: dict[tuple[int, int], dict]) -> Path:
    files = {"model_config.yaml": yaml.safe_dump(config).encode()}
    tp, pp = 1 + max(t for t, _ in shards), 1 + max(p for _, p in shards)
    for (t, p), state in shards.items():
        buffer = io.BytesIO()
        torch.save(state, buffer)
        folder = "" if tp == pp == 1 else f"mp_rank_{t:02d}/" if pp == 1 else f"tp_rank_{t:02d}_pp_rank_{p:03d}/"
        files[folder + "model_weights.ckpt"] = buffer.getvalue()
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_fused_qkv_rows_split_per_query_group(tmp_path):
    state = synthetic_state(NEMOTRON, "nemo")
    adapter = read_nemo_adapter(write_nemo(tmp_path / "a.nemo", model_config(NEMOTRON), {(0, 0): state}), "a", {})
    b = state["model.decoder.layers.1.self_attention.adapter_layer.lora_kqv_adapter.linear_out.weight"] * 1.5
    groups = b.reshape(2, 4, 12, 4)  # 2 query groups of (2 q heads, k, v), kv_channels 12
    weights = adapter.weights
    assert torch.equal(weights["model.layers.1.self_attn.q_proj"].lora_b, groups[:, :2].reshape(48, 4))
    assert torch.equal(weights["model.layers.1.self_attn.k_proj"].lora_b, groups[:, 2].reshape(24, 4))
    assert torch.equal(weights["model.layers.1.self_attn.v_proj"].lora_b, groups[:, 3].reshape(24, 4))
    a = state["model.decoder.layers.1.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight"]
    assert all(torch.equal(weights[f"model.layers.1.self_attn.{p}_proj"].lora_a, a) for p in "qkv")
    assert "model.layers.1.mlp.gate_proj" not in weights and weights["model.layers.1.mlp.up_proj"].rank == 4


@pytest.mark.parametrize("base, variant", [(NEMOTRON, "nemo"), (LLAMA, "nemo"), (NEMOTRON, "canonical"),
                                           (LLAMA, "canonical")])
@pytest.mark.parametrize("tp, pp", [(2, 1), (2, 2), (1, 2)])
def test_model_parallel_shards_merge_to_the_whole_adapter(tmp_path, base, variant, tp, pp):
    state = synthetic_state(base, variant)
    gated = base["activation"] == "fast-swiglu"
    whole = read_nemo_adapter(write_nemo(tmp_path / "whole.nemo", model_config(base, variant), {(0, 0): state}),
                              "w", {})
    sharded = read_nemo_adapter(write_nemo(tmp_path / "sharded.nemo", model_config(base, variant, tp, pp),
                                           shard(state, tp, pp, base["num_layers"], gated)), "s", {})
    assert sorted(whole.weights) == sorted(sharded.weights)
    for layer, weights in whole.weights.items():
        other = sharded.weights[layer]
        if variant == "canonical" and layer.endswith("up_proj") and not gated:
            # each rank adds [gate_r(x); up_r(x)] to its own rows of fc1: rows [g_0; u_0; g_1; u_1], not [g; u]
            key = f"model.decoder.layers.{layer.split('.')[2]}.{MLP}lora_unfused_hto4h_adapter.{{}}_adapter.linear_{{}}"
            x = torch.randn(3, base["hidden_size"])
            halves = [(x @ state[key.format(p, "in") + ".weight"].T @ state[key.format(p, "out") + ".weight"].T)
                      .chunk(tp, dim=-1) for p in ("gate", "up")]
            expected = torch.cat([part for rank in zip(*halves) for part in rank], dim=-1) * 1.5
            assert torch.allclose(x @ other.lora_a.T @ other.lora_b.T, expected, atol=1e-4), layer
            continue
        assert torch.equal(weights.lora_a, other.lora_a) and torch.equal(weights.lora_b, other.lora_b), layer
    if gated and variant == "nemo":
        out = state["model.decoder.layers.2.mlp.adapter_layer.lora_hto4h_adapter.linear_out.weight"] * 1.5
        assert torch.equal(whole.weights["model.layers.2.mlp.gate_proj"].lora_b, out[:40])
        assert torch.equal(whole.weights["model.layers.2.mlp.up_proj"].lora_b, out[40:])


def test_canonical_halves_of_an_ungated_fc1_are_one_lora_of_twice_the_rank(tmp_path):
    state = synthetic_state(NEMOTRON, "canonical")
    adapter = read_nemo_adapter(write_nemo(tmp_path / "c.nemo", model_config(NEMOTRON, "canonical"), {(0, 0): state}),
                                "c", {})
    key = "model.decoder.layers.0.mlp.adapter_layer.lora_unfused_hto4h_adapter.{}_adapter.linear_{}.weight"
    x = torch.randn(3, 32)
    nemo = torch.cat([x @ state[key.format(p, "in")].T @ state[key.format(p, "out")].T for p in ("gate", "up")], -1)
    up = adapter.weights["model.layers.0.mlp.up_proj"]
    assert up.rank == 8 and torch.allclose(x @ up.lora_a.T @ up.lora_b.T, nemo * 1.5, atol=1e-5)


def _refused(tmp_path, config, state=None, match=""):
    path = write_nemo(tmp_path / "bad.nemo", config, {(0, 0): state or synthetic_state(NEMOTRON, "nemo")})
    with pytest.raises(NemoliteError, match=match):
        read_adapter(str(path), "bad", {})


@pytest.mark.parametrize("change, match", [
    (dict(peft={"peft_scheme": "ptuning", "p_tuning": {}}), "peft_scheme.*ptuning"),
    (dict(peft={"peft_scheme": "ia3"}), "peft_scheme.*ia3"),
    (dict(peft={"peft_scheme": "lora,ptuning"}), "peft_scheme"),
    (dict(peft=None), "not an adapter"),
    (dict(peft={"peft_scheme": "lora"}), "no peft.lora_tuning"),
    (dict(virtual_pipeline_model_parallel_size=2), "virtual_pipeline_model_parallel_size"),
    (dict(tensor_model_parallel_size=2), "tensor_model_parallel_size.*split in 1"),  # a rank's file is missing
])
def test_refused_configs(tmp_path, change, match):
    _refused(tmp_path, {**model_config(NEMOTRON), **change}, match=match)


@pytest.mark.parametrize("lora, match", [
    (dict(weight_tying=True), "weight_tying"), (dict(target_modules=["attention_q"]), "attention_q"),
    (dict(variant="dora"), "variant"), (dict(adapter_dim=0), "adapter_dim"), (dict(alpha=-1), "alpha"),
    (dict(adapter_dim=8), "adapter_dim is 8"),
])
def test_refused_lora_fields(tmp_path, lora, match):
    _refused(tmp_path, model_config(NEMOTRON, **lora), match=match)


def test_refused_tensors(tmp_path):
    state = synthetic_state(NEMOTRON, "nemo")
    moe = {k.replace("lora_hto4h_adapter", "lora_moe_hto4h_adapter"): v for k, v in state.items()}
    _refused(tmp_path, model_config(NEMOTRON), moe, "lora_moe_hto4h_adapter")
    base = {**state, "model.decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(48, 32)}
    _refused(tmp_path, model_config(NEMOTRON), base, "linear_fc1.weight.*not a LoRA adapter weight")
    half = {k: v for k, v in state.items() if "layers.0.mlp.adapter_layer.lora_4htoh_adapter.linear_out" not in k}
    _refused(tmp_path, model_config(NEMOTRON), half, "not both")
    wrong = dict(state)
    wrong["model.decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_out.weight"] = torch.ones(64, 4)
    _refused(tmp_path, model_config(NEMOTRON), wrong, "kv_channels")


def test_refused_paths_and_models(tmp_path):
    with pytest.raises(NemoliteError, match="PEFT directory.*NeMo LoRA .nemo"):
        read_adapter(str(tmp_path), "empty", {})
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.nemo", "b.nemo"):
        write_nemo(two / name, model_config(NEMOTRON), {(0, 0): synthetic_state(NEMOTRON, "nemo")})
    with pytest.raises(NemoliteError, match="holds 2 .nemo files"):
        read_nemo_adapter(two, "two", {})
    path = write_nemo(tmp_path / "n.nemo", model_config(NEMOTRON), {(0, 0): synthetic_state(NEMOTRON, "nemo")})
    llama_shapes = {"model.layers.0.mlp.gate_proj": (40, 32)}
    with pytest.raises(NemoliteError, match="activation"):  # trained on squared-ReLU, served on a SwiGLU model
        read_nemo_adapter(path, "n", llama_shapes)
    from nemolite.checkpoint.nemo_config import config_from_nemo

    other = config_from_nemo({**NEMOTRON, "kv_channels": 8}, 320, tie_word_embeddings=False)
    with pytest.raises(NemoliteError, match="kv_channels.*12.*served model has 8"):
        read_nemo_adapter(path, "n", {}, other)
    same = config_from_nemo(NEMOTRON, 320, tie_word_embeddings=False)
    assert len(read_nemo_adapter(path, "n", {}, same).weights) == 4 * 6
