"""Request outputs, shaped as vLLM's (``RequestOutput.outputs[i].text`` ...)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one {token_id: Logprob} per generated token
    full_logprobs: list | None = None  # with SamplingParams.full_logprobs: one [V] fp32 CPU tensor per generated token
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then {token_id: Logprob}.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # With prompt_logprobs and full_logprobs: the [V] logprob row that scored each prompt token after the first.
    prompt_full_logprobs: list | None = None
    # With SamplingParams.reward: the reward model's value of each attribute (ModelConfig.reward_attributes).
    reward: list[float] | None = None
