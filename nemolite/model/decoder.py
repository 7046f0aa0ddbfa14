"""The one decoder: every Nemotron-family checkpoint is this model with a different ModelConfig."""

from __future__ import annotations

import torch
from torch import nn

from nemolite.config import LayerSpec, ModelConfig
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
    """Embedding, layers, final norm: hidden states out (reward heads read these)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, i) for i, spec in enumerate(config.layers))
        self.norm = make_norm(config)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """input_ids, positions [B, T] -> hidden [B, T, D]."""
        x = self.embed_tokens(input_ids)
        rotary = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rotary, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(x)


class CausalLM(nn.Module):
    """Decoder plus its head; parameter names equal the Hugging Face checkpoint's keys.

    A language model's head is ``lm_head`` (logits over the vocabulary). A reward model's is ``score``
    (HF ``*ForSequenceClassification``, NeMo-Aligner ``rm_head``): a linear map with bias to one value
    per attribute, kept and run in float32 as NeMo-Aligner's head defaults to; it has no ``lm_head``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        if config.is_reward_model:
            self.lm_head = None
            self.score = nn.Linear(config.hidden_size, len(config.reward_attributes), bias=True)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
            self.score = None
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def materialize(self, dtype: torch.dtype, device: torch.device | str) -> "CausalLM":
        """A model built on the meta device → uninitialised storage in ``dtype`` on ``device`` (a reward
        head in float32), ready for a loader to fill."""
        self.to(dtype).to_empty(device=device)
        if self.score is not None:
            self.score.float()
        self.tie_weights()
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] in the model dtype (a reward model: fp32 rewards [B, T, A]).

        ``last_only`` keeps the last position ([B, 1, V]); ``logits_indices`` [K] keeps those
        positions of a single flattened batch ([1, K, V]), sparing the LM head everywhere else.
        """
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            positions = positions.expand(input_ids.shape[0], -1)
        hidden = self.model(input_ids, positions, cache)
        if last_only:
            hidden = hidden[:, -1:]
        elif logits_indices is not None:
            hidden = hidden[:, logits_indices]
        if self.score is not None:
            return self.score(hidden.float())
        return self.lm_head(hidden)
