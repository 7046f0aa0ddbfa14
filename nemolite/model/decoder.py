"""The one decoder: every Nemotron-family checkpoint is this model with a different ModelConfig."""

from __future__ import annotations

import torch
from torch import nn

from nemolite.config import LayerSpec, ModelConfig
from nemolite.parallel.groups import SINGLE
from nemolite.parallel.tensor import parallelize, shard_config
from nemolite.model.layers import Attention, Linear, LinearReplacement, RotaryEmbedding, make_mlp, make_norm


class DecoderLayer(nn.Module):
    """Pre-norm block ``h = x + attn(norm(x)); y = h + mlp(norm(h))``; no_op sublayers are absent."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, layer_index: int):
        super().__init__()
        self.spec = spec
        if spec.attention != "no_op":
            self.input_layernorm = make_norm(config)
            self.self_attn = (Attention(config, spec, layer_index) if spec.attention == "attention"
                              else LinearReplacement(config.hidden_size, "linear_attn"))
        if spec.mlp != "no_op":
            self.post_attention_layernorm = make_norm(config)
            self.mlp = make_mlp(config, spec)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], cache) -> torch.Tensor:
        if self.spec.attention != "no_op":
            x = x + self.self_attn(self.input_layernorm(x), rotary, cache)
        if self.spec.mlp != "no_op":
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class DecoderModel(nn.Module):
    """Embedding, layers, final norm: hidden states out (reward heads read these). A pipeline stage
    other than the first has no embedding (it takes the previous stage's hidden states), and one
    other than the last no final norm."""

    def __init__(self, config: ModelConfig, first_stage: bool = True, last_stage: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if first_stage else None
        self.layers = nn.ModuleList(DecoderLayer(config, spec, i) for i, spec in enumerate(config.layers))
        self.norm = make_norm(config) if last_stage else None
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache=None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [B, T] (or a previous stage's hidden_states [B, T, D]) -> hidden [B, T, D]."""
        x = self.embed_tokens(input_ids) if hidden_states is None else hidden_states
        rotary = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rotary, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return x if self.norm is None else self.norm(x)


class CausalLM(nn.Module):
    """Decoder plus its head; parameter names equal the Hugging Face checkpoint's keys.

    A language model's head is ``lm_head`` (logits over the vocabulary). A reward model's is ``score``
    (HF ``*ForSequenceClassification``, NeMo-Aligner ``rm_head``): a linear map with bias to one value
    per attribute, kept and run in float32 as NeMo-Aligner's head defaults to; it has no ``lm_head``.

    With ``parallel`` (a rank of a tensor/pipeline-parallel job) the modules hold this rank's shard
    (nemolite.parallel.tensor); ``config`` stays the checkpoint's, ``local_config`` is the shard's.
    """

    def __init__(self, config: ModelConfig, parallel=None):
        super().__init__()
        self.config = config
        self.parallel = parallel = parallel or SINGLE
        self.local_config = local = shard_config(config, parallel) if parallel.distributed else config
        self.model = DecoderModel(local, parallel.is_first_stage, parallel.is_last_stage)
        self.lm_head = self.score = None
        if parallel.is_last_stage and config.is_reward_model:
            self.score = nn.Linear(config.hidden_size, len(config.reward_attributes), bias=True)
        elif parallel.is_last_stage:
            self.lm_head = Linear(config.hidden_size, local.vocab_size, bias=False)
            self.lm_head.is_lm_head = True  # quantized as QuantSpec.head says (nemolite.quant.model)
        self.tie_weights()
        parallelize(self, parallel)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def prepack_linears(self) -> int:
        """CPU inference: every Linear's weight in oneDNN's blocked layout, the plain copy freed except
        a tied LM head's (the embedding reads it). Weights are read-only from then on. Returns how many
        were packed (0 off the CPU or without oneDNN)."""
        tied = self.model.embed_tokens is not None and \
            getattr(self.lm_head, "weight", None) is self.model.embed_tokens.weight
        return sum(module.prepack(keep_weight=tied and module is self.lm_head)
                   for module in self.modules() if isinstance(module, Linear))

    def fuse_projections(self) -> int:
        """Inference: each attention's q, k, v and each SwiGLU MLP's gate and up as one layer (their weights
        stacked, the separate layers dropped: parameter names no longer match the checkpoint's). Outputs
        are the same row by row. Returns how many layers were fused."""
        return sum(module.fuse_projections() for module in list(self.modules()) if hasattr(module, "fuse_projections")
                   and module is not self)

    def checkpoint_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters to fill, by checkpoint tensor name. A tied LM head on a last pipeline stage
        without the embedding is filled from the embedding's tensor."""
        params = dict(self.named_parameters())  # tied weights appear once, under the embedding's name
        if self.config.tie_word_embeddings and "lm_head.weight" in params:
            params["model.embed_tokens.weight"] = params.pop("lm_head.weight")
        return params

    def materialize(self, dtype: torch.dtype, device: torch.device | str) -> "CausalLM":
        """A model built on the meta device → uninitialised storage in ``dtype`` on ``device`` (a reward
        head in float32), ready for a loader to fill."""
        self.to(dtype).to_empty(device=device)
        if self.score is not None:
            self.score.float()
        self.tie_weights()
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False, logits_indices: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] in the model dtype (a reward model: fp32 rewards [B, T, A]).

        ``last_only`` keeps the last position ([B, 1, V]); ``logits_indices`` [K] keeps those
        positions of a single flattened batch ([1, K, V]), sparing the LM head everywhere else.
        A pipeline stage before the last returns its hidden states [B, T, D] for the next one.
        """
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            positions = positions.expand(input_ids.shape[0], -1)
        hidden = self.model(input_ids, positions, cache, hidden_states)
        if not self.parallel.is_last_stage:
            return hidden
        if last_only:
            hidden = hidden[:, -1:]
        elif logits_indices is not None:
            hidden = hidden[:, logits_indices]
        if self.score is not None:
            return self.score(hidden.float())
        return self.lm_head(hidden)
