"""NeMo checkpoints built in-process from a tiny HF model by the inverse mapping (NVIDIA/NeMo
``scripts/checkpoint_converters/convert_nemotron_nemo_to_hf.py``, run backwards)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nemolite.checkpoint.hf import load_hf_model
from nemolite.checkpoint.nemo import NemoCheckpoint, is_nemo_checkpoint, load_nemo_model
from nemolite.checkpoint.nemo_config import config_from_nemo
from nemolite.errors import NemoliteError
from tests.conftest import make_llama, make_nemotron, write_sentencepiece

TOKENIZER_ARTIFACT = "2b0c5bd45d3c4d7f8e0f6f1c2a9d7e11_tokenizer.model"
LEGACY_LAYER = {"input_layernorm": "input_layernorm", "query_key_value": "self_attention.query_key_value",
                "dense": "self_attention.dense", "post_attention_layernorm": "post_attention_layernorm",
                "fc1": "mlp.dense_h_to_4h", "fc2": "mlp.dense_4h_to_h"}
MCORE_LAYER = {"input_layernorm": "self_attention.linear_qkv.layer_norm_", "query_key_value":
               "self_attention.linear_qkv", "dense": "self_attention.linear_proj",
               "post_attention_layernorm": "mlp.linear_fc1.layer_norm_", "fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"}


def yaml_config(hf: dict, *, tp: int = 1, pp: int = 1, gated: bool = False, **overrides) -> dict:
    hf = {**hf, **(hf.get("rope_parameters") or {})}
    config = {
        "mcore_gpt": True, "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"], "num_attention_heads": hf["num_attention_heads"],
        "num_query_groups": hf["num_key_value_heads"], "kv_channels": None,
        "activation": "fast-swiglu" if gated else "squared-relu",
        "normalization": "rmsnorm" if gated else "layernorm1p",
        "layernorm_epsilon": hf.get("norm_eps", hf.get("rms_norm_eps")), "bias": False,
        "position_embedding_type": "rope", "rotary_percentage": hf.get("partial_rotary_factor", 1.0),
        "rotary_base": hf.get("rope_theta", 10000.0), "seq_length": hf["max_position_embeddings"],
        "max_position_embeddings": hf["max_position_embeddings"], "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "precision": 32,
        "tokenizer": {"library": "sentencepiece", "type": None, "model": f"nemo:{TOKENIZER_ARTIFACT}",
                      "sentencepiece_legacy": False},
    }
    config.update(overrides)
    return config


def fuse_qkv(q, k, v, heads, groups):
    """Inverse of the per-group split: per group, H/G q heads, then k, then v."""
    head_dim = q.shape[0] // heads
    q = q.reshape(groups, heads // groups, head_dim, -1)
    k, v = k.reshape(groups, 1, head_dim, -1), v.reshape(groups, 1, head_dim, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def nemo_state(hf: dict, state: dict, *, names: str, tp: int, gated: bool, padded_vocab: int) -> list[dict]:
    """Per-TP-rank state dicts with global layer numbers; ``names`` is "mcore" or "legacy"."""
    heads, groups = hf["num_attention_heads"], hf["num_key_value_heads"]
    layer_names = MCORE_LAYER if names == "mcore" else LEGACY_LAYER
    ranks = [dict() for _ in range(tp)]

    def put(key, tensor, dim=None):
        for rank in range(tp):
            ranks[rank][key] = tensor if dim is None else tensor.chunk(tp, dim=dim)[rank].clone()

    def padded(tensor):
        return torch.cat([tensor, torch.randn(padded_vocab - tensor.shape[0], tensor.shape[1])])

    embed = "model.embedding.word_embeddings.weight" if names == "mcore" else \
        "model.language_model.embedding.word_embeddings.weight"
    put(embed, padded(state["model.embed_tokens.weight"]), 0)
    for i in range(hf["num_hidden_layers"]):
        src = f"model.layers.{i}."
        layer = f"model.decoder.layers.{i}." if names == "mcore" else f"model.language_model.encoder.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for kind in ("weight", "bias"):
                if f"{src}{norm}.{kind}" in state:
                    suffix = f"{kind}" if names == "mcore" else f".{kind}"
                    put(layer + layer_names[norm] + suffix, state[f"{src}{norm}.{kind}"])
        q, k, v = (state[f"{src}self_attn.{p}_proj.weight"] for p in "qkv")
        put(layer + layer_names["query_key_value"] + ".weight", fuse_qkv(q, k, v, heads, groups), 0)
        put(layer + layer_names["dense"] + ".weight", state[f"{src}self_attn.o_proj.weight"], 1)
        up = state[f"{src}mlp.up_proj.weight"]
        if gated:  # each rank's shard is cat(gate_r, up_r)
            gate = state[f"{src}mlp.gate_proj.weight"]
            for rank in range(tp):
                ranks[rank][layer + layer_names["fc1"] + ".weight"] = torch.cat(
                    [gate.chunk(tp)[rank], up.chunk(tp)[rank]])
        else:
            put(layer + layer_names["fc1"] + ".weight", up, 0)
        put(layer + layer_names["fc2"] + ".weight", state[f"{src}mlp.down_proj.weight"], 1)
        put(layer + "self_attention.core_attention._extra_state", None)
        put(layer + "mlp.linear_fc1._extra_state", io.BytesIO(b"te state"))
    final = "model.decoder.final_layernorm." if names == "mcore" else "model.language_model.encoder.final_layernorm."
    for kind in ("weight", "bias"):
        if f"model.norm.{kind}" in state:
            put(final + kind, state[f"model.norm.{kind}"])
    output = "model.output_layer.weight" if names == "mcore" else "model.language_model.output_layer.weight"
    put(output, padded(state["lm_head.weight"]), 0)
    return ranks


def split_pipeline(rank_state: dict, num_layers: int, pp: int) -> list[dict]:
    """Stage s holds layers [s*L/pp, (s+1)*L/pp) renumbered from 0; embedding first, head last."""
    per_stage = num_layers // pp
    stages = [dict() for _ in range(pp)]
    for key, value in rank_state.items():
        parts = key.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            index = int(parts[at])
            parts[at] = str(index % per_stage)
            stages[index // per_stage][".".join(parts)] = value
        elif "word_embeddings" in key:
            stages[0][key] = value
        else:
            stages[-1][key] = value
    return stages


def write_nemo(hf_dir: Path, out: Path, *, names="mcore", tp=1, pp=1, gated=False, as_tar=True,
               gzip=False, config_overrides=None, extra_members=None) -> Path:
    import json

    hf = json.loads((hf_dir / "config.json").read_text())
    state = load_file(hf_dir / "model.safetensors")
    torch.manual_seed(1)
    padded_vocab = -(-hf["vocab_size"] // (128 * tp)) * 128 * tp
    ranks = nemo_state(hf, state, names=names, tp=tp, gated=gated, padded_vocab=padded_vocab)
    tree = out.with_suffix(".tree") if as_tar else out
    tree.mkdir(parents=True)
    (tree / "model_config.yaml").write_text(yaml.safe_dump(
        yaml_config(hf, tp=tp, pp=pp, gated=gated, **(config_overrides or {}))))
    (tree / TOKENIZER_ARTIFACT).write_bytes((hf_dir / "tokenizer.model").read_bytes())
    for tp_rank, rank_state in enumerate(ranks):
        for pp_rank, stage in enumerate(split_pipeline(rank_state, hf["num_hidden_layers"], pp)):
            if tp == 1 and pp == 1:
                torch.save(stage, tree / "model_weights.ckpt")
                continue
            folder = tree / (f"mp_rank_{tp_rank:02d}" if pp == 1 else f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}")
            folder.mkdir()
            torch.save(stage, folder / "model_weights.ckpt")
    if not as_tar:
        return tree
    with tarfile.open(out, "w:gz" if gzip else "w:") as tar:
        tar.add(tree, arcname=".")
        for name, data in (extra_members or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(scope="module")
def hf_nemotron(tmp_path_factory) -> Path:
    return make_nemotron(tmp_path_factory.mktemp("hf_nemotron"))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    directory = make_llama(tmp_path_factory.mktemp("hf_llama"), tokenizer=False, vocab_size=320, rope_scaling=None)
    write_sentencepiece(directory)
    return directory


def assert_same_logits(hf_dir: Path, nemo_path: Path) -> None:
    reference = load_hf_model(hf_dir, dtype="float32", device="cpu")
    loaded = load_nemo_model(nemo_path, dtype="float32", device="cpu")
    assert loaded.model.config.vocab_size == reference.config.vocab_size
    input_ids = torch.tensor([[2, 17, 250, 9, 31, 77, 5, 300]])
    with torch.no_grad():
        expected, actual = reference(input_ids), loaded.model(input_ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 320


@pytest.mark.parametrize("names", ["mcore", "legacy"])
@pytest.mark.parametrize("layout", ["tar", "gzip", "directory"])
def test_single_file_layouts_match_hf(hf_nemotron, tmp_path, names, layout):
    path = write_nemo(hf_nemotron, tmp_path / "model.nemo", names=names, as_tar=layout != "directory",
                      gzip=layout == "gzip")
    assert is_nemo_checkpoint(path)
    assert_same_logits(hf_nemotron, path)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_model_parallel_shards_are_merged(hf_nemotron, tmp_path, tp, pp):
    assert_same_logits(hf_nemotron, write_nemo(hf_nemotron, tmp_path / "model.nemo", tp=tp, pp=pp))


@pytest.mark.parametrize("tp", [1, 2])
def test_swiglu_rmsnorm_becomes_llama(hf_llama, tmp_path, tp):
    path = write_nemo(hf_llama, tmp_path / "model.nemo", tp=tp, gated=True)
    assert_same_logits(hf_llama, path)
    with NemoCheckpoint(path) as checkpoint:
        assert checkpoint.hf_config["model_type"] == "llama"


def test_hf_tensors_and_config_for_conversion(hf_nemotron, tmp_path):
    path = write_nemo(hf_nemotron, tmp_path / "model.nemo", tp=2)
    reference = load_file(hf_nemotron / "model.safetensors")
    with NemoCheckpoint(path) as checkpoint:
        assert checkpoint.hf_config["model_type"] == "nemotron"
        assert checkpoint.hf_config["vocab_size"] == 320 and checkpoint.padded_vocab_size == 512
        tensors = dict(checkpoint.hf_tensors())
        assert len(tensors) == checkpoint.num_tensors
        assert (checkpoint.tokenizer_dir / "tokenizer.model").is_file()
    assert tensors.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensors[name], tensor), name


CONVERSATION = [{"role": "system", "content": "the model returns a value"},
                {"role": "user", "content": "python reads files from disk"},
                {"role": "assistant", "content": "each line ends with a newline character"}]


def test_nemo_reward_model_scores_like_its_head_on_the_final_hidden_state(hf_nemotron, tmp_path):
    """NeMo-Aligner's regression reward model: rm_head on the final-norm hidden state of the last token
    (NVIDIA/NeMo-Aligner ``nemo_aligner/models/nlp/gpt/megatron_gpt_regression_reward_model.py``); the 340B checkpoint may also carry output_layer, which a reward model ignores."""
    from transformers import NemotronForCausalLM, NemotronForSequenceClassification

    from nemolite.checkpoint.convert import convert
    from nemolite.engine.llm import LLM
    from nemolite.reward import ATTRIBUTES, reward_prompt

    tree = write_nemo(hf_nemotron, tmp_path / "rm", as_tar=False)
    state = torch.load(tree / "model_weights.ckpt", weights_only=False)
    generator = torch.Generator().manual_seed(3)
    head_weight, head_bias = torch.randn(9, 64, generator=generator), torch.randn(9, generator=generator)
    state["model.rm_head.weight"], state["model.rm_head.bias"] = head_weight, head_bias
    state["model.rm_head._extra_state"] = None
    torch.save(state, tree / "model_weights.ckpt")

    llm = LLM(tree, dtype="float32", device="cpu")
    assert llm.config.reward_attributes == ATTRIBUTES and llm.model.lm_head is None
    scored = llm.reward(CONVERSATION, use_tqdm=False)[0]
    ids = llm.tokenizer.encode(reward_prompt(CONVERSATION), add_bos=False)
    assert ids[0] != llm.tokenizer.bos_token_id and ids[-1] != 3  # no BOS, no EOS
    base = NemotronForCausalLM.from_pretrained(hf_nemotron, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = base.model(torch.tensor([ids])).last_hidden_state[0, -1]  # after the final LayerNorm1P
    expected = hidden @ head_weight.T + head_bias
    assert list(scored["attributes"]) == list(ATTRIBUTES)
    assert torch.allclose(torch.tensor(list(scored["attributes"].values())), expected, atol=1e-4)
    weights = [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]
    assert scored["score"] == pytest.approx(float(expected @ torch.tensor(weights)), abs=1e-4)

    # Exported as HF NemotronForSequenceClassification: transformers scores it (its head has no bias).
    exported = convert(tree, tmp_path / "rm-hf")
    with torch.no_grad():
        logits = NemotronForSequenceClassification.from_pretrained(exported, dtype=torch.float32).eval()(
            torch.tensor([ids])).logits[0]
    assert torch.allclose(logits + head_bias, expected, atol=1e-4)
    again = LLM(exported, dtype="float32", device="cpu").reward(CONVERSATION, use_tqdm=False)[0]
    assert again["attributes"] == pytest.approx(scored["attributes"], abs=1e-5)


def test_path_traversal_member_is_refused(hf_nemotron, tmp_path):
    path = write_nemo(hf_nemotron, tmp_path / "evil.nemo", extra_members={"../escaped.txt": b"owned"})
    with pytest.raises(NemoliteError, match="unsafe path"):
        load_nemo_model(path, device="cpu")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("layout", ["tar", "directory"])
def test_truncated_checkpoint_gives_clear_error(hf_nemotron, tmp_path, layout):
    path = write_nemo(hf_nemotron, tmp_path / "model.nemo", as_tar=layout == "tar")
    victim = path if layout == "tar" else path / "model_weights.ckpt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(NemoliteError, match="truncated|corrupt|incomplete"):
        load_nemo_model(path, device="cpu")


def test_untrusted_pickle_is_refused(hf_nemotron, tmp_path):
    tree = write_nemo(hf_nemotron, tmp_path / "m", as_tar=False)
    state = torch.load(tree / "model_weights.ckpt", weights_only=False)
    state["evil"] = Path("x")  # any class outside the tensor allow-list
    torch.save(state, tree / "model_weights.ckpt")
    with pytest.raises(NemoliteError, match="refusing to unpickle"):
        load_nemo_model(tree, device="cpu")


HF_NEMOTRON = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "norm_eps": 1e-5, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
               "max_position_embeddings": 256}


@pytest.mark.parametrize("field,value,message", [
    ("activation", "gelu", "'activation'"),
    ("normalization", "batchnorm", "'normalization'"),
    ("position_embedding_type", "learned_absolute", "'position_embedding_type'"),
    ("num_query_groups", 3, "'num_query_groups'"),
    ("rotary_percentage", 1.5, "'rotary_percentage'"),
    ("hidden_size", "big", "'hidden_size'"),
    ("num_moe_experts", 8, "'num_moe_experts'"),
    ("share_embeddings_and_output_weights", "yes", "'share_embeddings_and_output_weights'"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(NemoliteError, match=message):
        config_from_nemo(yaml_config(HF_NEMOTRON, **{field: value}), 320)


def test_config_mapping():
    config = config_from_nemo(yaml_config(HF_NEMOTRON, kv_channels=24, num_query_groups=None), 320)
    assert (config.model_type, config.head_dim, config.layers[0].num_kv_heads) == ("nemotron", 24, 4)
    assert config.partial_rotary_factor == 0.5 and config.norm == "layernorm1p"
    llama = config_from_nemo(yaml_config(HF_NEMOTRON, activation="swiglu", normalization="rmsnorm",
                                         rotary_percentage=1.0, scale_positional_embedding=True), 320)
    assert llama.model_type == "llama" and llama.rope_scaling["rope_type"] == "llama3"
    with pytest.raises(NemoliteError, match="'activation'.*'normalization'"):
        config_from_nemo(yaml_config(HF_NEMOTRON, activation="swiglu"), 320)


def test_plain_layernorm_weights_are_shifted(hf_nemotron, tmp_path):
    """normalization: layernorm stores w itself; LayerNorm1P's stored weight is w - 1."""
    tree = write_nemo(hf_nemotron, tmp_path / "ln", as_tar=False, config_overrides={"normalization": "layernorm"})
    state = torch.load(tree / "model_weights.ckpt", weights_only=False)
    for key in state:
        if key.endswith("layer_norm_weight") or key == "model.decoder.final_layernorm.weight":
            state[key] = state[key] + 1
    torch.save(state, tree / "model_weights.ckpt")
    assert_same_logits(hf_nemotron, tree)


def test_llm_accepts_a_nemo_file(hf_nemotron, tmp_path):
    from nemolite import LLM, SamplingParams

    path = write_nemo(hf_nemotron, tmp_path / "model.nemo")
    params = SamplingParams(max_tokens=6, temperature=0.0)
    nemo_text = LLM(path, dtype="float32", device="cpu").generate(["the model"], params)[0].outputs[0]
    hf_text = LLM(hf_nemotron, dtype="float32", device="cpu").generate(["the model"], params)[0].outputs[0]
    assert nemo_text.token_ids == hf_text.token_ids


def test_torch_dist_model_weights_directory(hf_nemotron, tmp_path):
    """model_weights/ written with torch.distributed.checkpoint: global tensors, layers stacked on dim 0."""
    import json

    import torch.distributed.checkpoint as dcp

    tree = write_nemo(hf_nemotron, tmp_path / "dist", as_tar=False)
    state = torch.load(tree / "model_weights.ckpt", weights_only=False)
    (tree / "model_weights.ckpt").unlink()
    stacked: dict[str, list] = {}
    flat = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        parts = key.split(".")
        if "layers" in parts:
            at = parts.index("layers")
            stacked.setdefault(".".join(parts[:at + 1] + parts[at + 2:]), []).append(value)
        else:
            flat[key] = value
    flat.update({key: torch.stack(values) for key, values in stacked.items()})
    weights = tree / "model_weights"
    dcp.save(flat, checkpoint_id=weights, no_dist=True)
    (weights / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                        "common_backend": "torch", "common_backend_version": 1}))
    assert_same_logits(hf_nemotron, tree)
    archive = tmp_path / "dist.nemo"
    with tarfile.open(archive, "w:") as tar:
        tar.add(tree, arcname=".")
    assert_same_logits(hf_nemotron, archive)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_convert_nemo_to_hf_loads_in_transformers(hf_nemotron, tmp_path, tp, pp):
    from transformers import NemotronForCausalLM

    from nemolite.cli import main

    nemo_file = write_nemo(hf_nemotron, tmp_path / "model.nemo", tp=tp, pp=pp)
    destination = tmp_path / "converted"
    assert main(["convert", str(nemo_file), str(destination), "--max-shard-size", "60KB"]) == 0
    assert (destination / "tokenizer.model").is_file()
    assert (destination / "model.safetensors.index.json").is_file()
    input_ids = torch.tensor([[2, 17, 250, 9, 31, 77, 5, 300]])
    reference = NemotronForCausalLM.from_pretrained(hf_nemotron, torch_dtype=torch.float32).eval()
    converted = NemotronForCausalLM.from_pretrained(destination, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids).logits, reference(input_ids).logits, atol=1e-4, rtol=1e-4)
