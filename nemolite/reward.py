"""Reward models (NeMo-Aligner regression heads, Nemotron-4-340B-Reward): attributes, prompt, weighted score.

A reward model is a base decoder whose final hidden state at the last token goes through a
linear head to one value per attribute (NVIDIA/NeMo-Aligner
``nemo_aligner/models/nlp/gpt/megatron_gpt_regression_reward_model.py``; the nvidia/Nemotron-4-340B-Reward card). This module holds what every
door to it shares: the attribute names, the HelpSteer2 weights, the prompt format and the score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nemolite.errors import NemoliteError
from nemolite.tokenizer import nemotron_chat_prompt, validate_messages

# Nemotron-4-340B-Reward's nine outputs, in head order; the first four were never trained.
ATTRIBUTES = ("quality", "toxicity", "humor", "creativity",
              "helpfulness", "correctness", "coherence", "complexity", "verbosity")
# The five the hosted API returns (the build.nvidia.com nvidia/nemotron-4-340b-reward API), in its order.
HELPSTEER2_ATTRIBUTES = ATTRIBUTES[4:]
DEFAULT_WEIGHTS = (0.0, 0.0, 0.0, 0.0, 0.3, 0.74, 0.46, 0.47, -0.33)
REWARD_LABEL_PREFIX = "<extra_id_2>"


def reward_prompt(messages: list[dict]) -> str:
    """The text a reward model scores: the conversation in the Nemotron-4 format, then ``<extra_id_2>``
    (where SteerLM writes the attribute labels). Tokenize it with no BOS and no EOS."""
    messages = validate_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise NemoliteError("a reward model scores an assistant response: the last message must have role "
                            "'assistant'")
    return nemotron_chat_prompt(messages, add_generation_prompt=False) + REWARD_LABEL_PREFIX


def reward_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """``reward_prompt(messages)`` tokenized as NeMo-Aligner does: no BOS, no EOS."""
    return tokenizer.encode(reward_prompt(messages), add_bos=False)


def attribute_names(count: int) -> tuple[str, ...]:
    """Names for a head with ``count`` outputs: the 340B-Reward names for nine, ``attribute_i`` otherwise."""
    return ATTRIBUTES if count == len(ATTRIBUTES) else tuple(f"attribute_{i}" for i in range(count))


def reward_model_hf_config(hf_config: dict, num_attributes: int) -> dict:
    """An LM's HF config turned into its reward model's (``*ForSequenceClassification``, one label per
    attribute), as ``nemolite convert`` writes a NeMo reward model and as transformers reads it."""
    names = attribute_names(num_attributes)
    architecture = hf_config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
    return {**hf_config, "architectures": [architecture], "num_labels": num_attributes,
            "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)}}


MAX_WEIGHT = 1e6


def resolve_weights(weights: Sequence[float] | Mapping[str, float] | None,
                    names: Sequence[str] = ATTRIBUTES) -> list[float]:
    """Attribute weights as a list in head order: None gives the defaults (HelpSteer2's for nine
    attributes, uniform otherwise); a mapping names some attributes, the rest weigh 0."""
    if not names:
        raise NemoliteError("this model has no reward head; serve a reward model to score responses")
    if weights is None:
        return list(DEFAULT_WEIGHTS) if tuple(names) == ATTRIBUTES else [1.0 / len(names)] * len(names)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise NemoliteError(f"unknown reward attributes {unknown}; this model has {list(names)}")
        values = [weights.get(name, 0.0) for name in names]
    else:
        values = list(weights)
        if len(values) != len(names):
            raise NemoliteError(f"give {len(names)} attribute weights (one per attribute: {list(names)}), "
                                f"got {len(values)}")
    # Bounded so that a weighted score stays a finite JSON number (1e308 x 2 is inf, which JSON cannot hold).
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= MAX_WEIGHT for v in values):
        raise NemoliteError(f"attribute weights must be numbers in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
    return [float(v) for v in values]


def weighted_score(values: Sequence[float], weights: Sequence[float]) -> float:
    """The scalar reward: the dot product of attribute values and weights (NeMo-Aligner's merge_attributes)."""
    return float(sum(v * w for v, w in zip(values, weights, strict=True)))


def reward_result(values: Sequence[float], names: Sequence[str], weights: Sequence[float]) -> dict:
    """One scored response as every door returns it: ``{"attributes": {name: value}, "score": float}``."""
    return {"attributes": dict(zip(names, values, strict=True)), "score": weighted_score(values, weights)}


async def score_conversation(engine, messages: list[dict],
                             weights: Sequence[float] | Mapping[str, float] | None = None) -> dict:
    """Score the last (assistant) message of ``messages`` with the reward model behind ``engine`` (an
    ``AsyncLLM``); batched with whatever else the engine runs."""
    from nemolite.engine.sampling_params import SamplingParams

    names = engine.config.reward_attributes
    weights = resolve_weights(weights, names)
    token_ids = reward_token_ids(engine.tokenizer, messages)
    final = None
    async for final in engine.generate(token_ids, SamplingParams(reward=True), stream=False):
        pass
    return reward_result(final.reward, names, weights)
