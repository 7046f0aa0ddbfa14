"""NeMo checkpoints (``.nemo`` tar, its extracted directory, dist-checkpoint directories) without NeMo.

``NemoCheckpoint(path)`` reads ``model_config.yaml``, the tokenizer artifact and the weights'
index (no tensor data), and yields Hugging Face-named tensors one at a time from
``hf_tensors()``: fused QKV split per query group, gated ``linear_fc1`` split into gate/up,
padded vocabulary rows dropped. ``load_nemo_model`` streams them into a ``CausalLM``.

Memory: the model's weights plus one tensor (a TP-sharded tensor: its shards plus the merged
copy). Pre-1.6 ``torch.save`` files (not zip) are loaded whole by ``torch.load``; gzipped
``.nemo`` files are extracted to a temporary directory first (disk, not memory).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from nemolite.checkpoint.hf import resolve_dtype
from nemolite.checkpoint.host_memory import move_to_huge_pages
from nemolite.checkpoint.nemo_archive import NemoArchive
from nemolite.checkpoint.nemo_config import hf_config_from_nemo, nemo_model_facts, read_model_config
from nemolite.checkpoint.nemo_weights import read_weights
from nemolite.config import config_from_hf
from nemolite.errors import NemoliteError
from nemolite.model import CausalLM
from nemolite.parallel.tensor import shard_tensor
from nemolite.progress import Progress
from nemolite.reward import reward_model_hf_config

CONFIG_FILE = "model_config.yaml"
# MCore per-layer names → HF per-layer names, for tensors copied unchanged (norms may get -1 below).
LAYER_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1_up.weight": "mlp.up_proj.weight",
    "mlp.linear_fc1_up.bias": "mlp.up_proj.bias",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc2.bias": "mlp.down_proj.bias",
}
GLOBAL_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "rm_head.weight": "score.weight",  # NeMo-Aligner's regression reward head
    "rm_head.bias": "score.bias",
}


def is_nemo_checkpoint(path: str | Path) -> bool:
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / CONFIG_FILE).is_file()
    return path.is_file() and path.suffix == ".nemo"


class NemoCheckpoint:
    """An open NeMo checkpoint; use as a context manager (a tar's temporary files go on close)."""

    def __init__(self, path: str | Path):
        self.archive = NemoArchive(path)
        try:
            self._open()
        except BaseException:
            self.archive.close()
            raise

    def _open(self) -> None:
        archive = self.archive
        if not archive.exists(CONFIG_FILE):
            raise NemoliteError(f"{archive.path} has no {CONFIG_FILE}: is it a NeMo checkpoint?")
        try:
            text = archive.read_bytes(CONFIG_FILE).decode("utf-8")
        except UnicodeDecodeError as error:
            raise NemoliteError(f"{archive.path / CONFIG_FILE} is not UTF-8 text: {error}") from None
        self.raw_config = read_model_config(text, archive.path / CONFIG_FILE)
        self.facts = nemo_model_facts(self.raw_config)
        self.tokenizer_dir, bos, eos, tokenizer_size = self._tokenizer()
        self.state = read_weights(archive, self.facts.gated_mlp)
        embedding = self.state.get("embedding.word_embeddings.weight")
        if embedding is None:
            raise NemoliteError(f"{archive.path} has no embedding.word_embeddings.weight; the checkpoint is "
                                "incomplete or not a GPT model")
        self.padded_vocab_size = embedding.shape[0]
        vocab = tokenizer_size or self.padded_vocab_size
        if vocab > self.padded_vocab_size:
            raise NemoliteError(f"the tokenizer has {vocab} tokens but the embedding only "
                                f"{self.padded_vocab_size} rows: tokenizer and weights do not belong together")
        dtype = str(embedding.dtype).removeprefix("torch.")
        self.hf_config = hf_config_from_nemo(self.raw_config, vocab, "output_layer.weight" not in self.state,
                                             bos, eos, dtype)
        if "rm_head.weight" in self.state:
            self.hf_config = reward_model_hf_config(self.hf_config, self.state["rm_head.weight"].shape[0])
        self.config = config_from_hf(self.hf_config)

    def _tokenizer(self) -> tuple[Path | None, int | None, int | None, int | None]:
        """Copy the SentencePiece artifact out as ``<temp>/tokenizer.model``; (dir, bos, eos, size)."""
        facts = self.facts
        if facts.tokenizer_model is None:
            return None, None, None, None
        if facts.tokenizer_library != "sentencepiece":
            raise NemoliteError(f"model_config.yaml field 'tokenizer.library' is {facts.tokenizer_library!r}; "
                                "nemolite reads 'sentencepiece' tokenizers from .nemo files (pass tokenizer=DIR "
                                "for others)")
        name = facts.tokenizer_model
        if not self.archive.exists(name):
            name = Path(name).name
        if not self.archive.exists(name):
            raise NemoliteError(f"model_config.yaml field 'tokenizer.model' names {facts.tokenizer_model!r}, "
                                f"which is not a file inside {self.archive.path} (nothing outside the checkpoint "
                                "is read)")
        directory = Path(self.archive.temp_dir()) / "tokenizer"
        directory.mkdir(exist_ok=True)
        self.archive.copy_out(name, directory / "tokenizer.model")
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(str(directory / "tokenizer.model"))
        except (OSError, RuntimeError) as error:
            raise NemoliteError(f"tokenizer artifact {name} in {self.archive.path} is unreadable: {error}") from None
        bos, eos = processor.bos_id(), processor.eos_id()
        return directory, bos if bos >= 0 else None, eos if eos >= 0 else None, processor.GetPieceSize()

    def __enter__(self) -> "NemoCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.archive.close()

    @property
    def num_tensors(self) -> int:
        return sum(len(self._hf_names(name)) for name in self.state)

    @property
    def num_bytes(self) -> int:
        """Bytes of the stored tensors ``hf_tensors`` reads (padded vocabulary rows included), for progress."""
        return sum(math.prod(lazy.shape) * lazy.dtype.itemsize for name, lazy in self.state.items()
                   if self._hf_names(name))

    def _hf_names(self, name: str) -> list[str]:
        if name in GLOBAL_NAMES:
            unused = self.config.tie_word_embeddings or self.config.is_reward_model  # a reward model has no LM head
            return [] if name == "output_layer.weight" and unused else [GLOBAL_NAMES[name]]
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
        if not match:
            return [name]
        prefix, sub = f"model.layers.{match.group(1)}.", match.group(2)
        kind = sub.rsplit(".", 1)[-1]
        if sub.startswith("self_attention.linear_qkv.") and kind in ("weight", "bias"):
            return [f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv"]
        if sub.startswith("mlp.linear_fc1.") and kind in ("weight", "bias"):
            separate_up = name.replace("linear_fc1.", "linear_fc1_up.") in self.state
            if self.facts.gated_mlp and not separate_up:
                return [f"{prefix}mlp.gate_proj.{kind}", f"{prefix}mlp.up_proj.{kind}"]
            return [f"{prefix}mlp.{'gate' if separate_up else 'up'}_proj.{kind}"]
        return [prefix + LAYER_NAMES[sub]] if sub in LAYER_NAMES else [name]

    def hf_tensors(self, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) one at a time; unknown keys come through under their own names. With
        ``wanted``, tensors none of whose HF names it accepts are not even read (another rank's)."""
        for name, lazy in sorted(self.state.items(), key=lambda item: _layer_order(item[0])):
            hf_names = self._hf_names(name)
            if not hf_names or (wanted is not None and not any(map(wanted, hf_names))):
                continue
            tensor = lazy.read()
            if tuple(tensor.shape) != tuple(lazy.shape):
                raise NemoliteError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(lazy.shape)}")
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                tensor = tensor[: self.config.vocab_size]
            if len(hf_names) == 3:
                yield from zip(hf_names, self._split_qkv(name, tensor))
            elif len(hf_names) == 2:
                yield from zip(hf_names, tensor.chunk(2, dim=0))
            else:
                if not self.facts.zero_centred_norm and self.facts.has_norm_bias and _is_norm_weight(name):
                    tensor = tensor.float() - 1  # plain LayerNorm stores w; the model (LayerNorm1P) adds 1
                yield hf_names[0], tensor

    def _split_qkv(self, name: str, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[(H + 2G) * hd, ...] grouped per query group as (H/G q heads, k, v) -> q, k, v."""
        heads, groups, head_dim = self.config.num_attention_heads, self.facts.num_query_groups, self.facts.head_dim
        if qkv.shape[0] != (heads + 2 * groups) * head_dim:
            raise NemoliteError(f"{name} has {qkv.shape[0]} rows; model_config.yaml implies "
                                f"(num_attention_heads + 2 * num_query_groups) * kv_channels = "
                                f"{(heads + 2 * groups) * head_dim}")
        per_group = qkv.reshape(groups, heads // groups + 2, head_dim, *qkv.shape[1:])
        rest = qkv.shape[1:]
        q = per_group[:, : heads // groups].reshape(heads * head_dim, *rest)
        k = per_group[:, -2].reshape(groups * head_dim, *rest)
        v = per_group[:, -1].reshape(groups * head_dim, *rest)
        return q, k, v


def _layer_order(name: str) -> tuple[int, str]:
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    return (int(match.group(1)) + 1 if match else 0 if name.startswith("embedding") else 1 << 30), name


def _is_norm_weight(name: str) -> bool:
    return name.endswith("layer_norm_weight") or name == "decoder.final_layernorm.weight"


class LoadedNemo(NamedTuple):
    model: CausalLM  # a reward model (rm_head) carries its head as ``model.score``
    tokenizer: object | None  # nemolite.tokenizer.Tokenizer, or None when the checkpoint has none


def load_nemo_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                    tokenizer: str | Path | None = None, parallel=None) -> LoadedNemo:
    """Load a NeMo checkpoint into a ready ``CausalLM`` (eval mode) and its tokenizer; with ``parallel``
    (a ParallelState) only this rank's shard, reading only the tensors it needs."""
    from nemolite.checkpoint import default_device
    from nemolite.tokenizer import Tokenizer

    device = torch.device(device) if device is not None else default_device()
    with NemoCheckpoint(path) as checkpoint:
        config = checkpoint.config
        torch_dtype = resolve_dtype(dtype, config)
        with torch.device("meta"):
            model = CausalLM(config, parallel)
            whole = CausalLM(config) if model.parallel.distributed else model
        expected = whole.checkpoint_parameters()
        model.materialize(torch_dtype, device)
        params = model.checkpoint_parameters()
        move_to_huge_pages(list(params.values()), copy=False)
        filled, unexpected = set(), []
        whole_model = not model.parallel.distributed  # a rank reads only its own tensors: no totals, no bars
        progress = Progress(f"loading {Path(path).name}", total=checkpoint.num_tensors if whole_model else None,
                            total_bytes=checkpoint.num_bytes if whole_model else None,
                            bar=None if whole_model else False)
        with torch.no_grad(), progress:
            for name, tensor in checkpoint.hf_tensors(lambda hf_name: hf_name in params or hf_name not in expected):
                progress.update(1, tensor.numel() * tensor.element_size())
                if name not in expected:
                    unexpected.append(name)
                    continue
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise NemoliteError(f"{path}: {name} has shape {list(tensor.shape)} but model_config.yaml "
                                        f"implies {list(expected[name].shape)}")
                params[name].data.copy_(shard_tensor(name, tensor, config, model.parallel))
                filled.add(name)
        missing = sorted(set(params) - filled)
        if missing or unexpected:
            raise NemoliteError(f"NeMo checkpoint {path} does not match its model_config.yaml: missing tensors "
                                f"{_short(missing)}; unexpected tensors {_short(unexpected)}")
        tokenizer_dir = tokenizer or checkpoint.tokenizer_dir
        loaded_tokenizer = None
        if tokenizer_dir is not None:
            loaded_tokenizer = Tokenizer.from_pretrained(tokenizer_dir, model_type=config.model_type,
                                                         bos_token_id=config.bos_token_id,
                                                         eos_token_ids=config.eos_token_ids)
    return LoadedNemo(model.eval(), loaded_tokenizer)


def _short(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    return "[" + ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") + "]"
