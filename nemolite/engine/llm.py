"""``LLM``: load a checkpoint and generate offline, as vLLM users know it (batched by the engine)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from nemolite.engine.llm_engine import LLMEngine
from nemolite.engine.outputs import CompletionOutput, RequestOutput
from nemolite.engine.sampling_params import SamplingParams
from nemolite.errors import NemoliteError
from nemolite.tokenizer import Tokenizer

OnText = Callable[[str], None]


class LLM:
    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype = "auto",
                 device: str | torch.device | None = None, seed: int = 0, tokenizer: str | Path | None = None,
                 **engine_args):
        self.engine = LLMEngine.from_pretrained(model, dtype, device, seed, tokenizer, **engine_args)
        self.model, self.tokenizer, self.config = self.engine.model, self.engine.tokenizer, self.engine.config

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None, use_tqdm: bool = True,
                 lora_request=None) -> list[RequestOutput]:
        """``lora_request``: a LoRARequest for every prompt, or a list with one (or None) per prompt."""
        texts, token_ids = self._prompts(prompts, prompt_token_ids)
        params = self._params_per_prompt(sampling_params, len(token_ids))
        loras = self._loras_per_prompt(lora_request, len(token_ids))
        return self._run(list(zip(texts, token_ids, params, loras)), use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the checkpoint's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        params = self.chat_params(sampling_params)
        prompts = [self.tokenizer.apply_chat_template(conversation) for conversation in conversations]
        loras = self._loras_per_prompt(lora_request, len(prompts))
        return self._run([(p, self.tokenizer.encode(p, add_bos=False), params, lora)
                          for p, lora in zip(prompts, loras)], use_tqdm)

    def reward(self, conversations: list[dict] | list[list[dict]], weights=None,
               use_tqdm: bool = True, lora_request=None) -> list[dict]:
        """Score one conversation or several with a reward model: the last message of each is the assistant
        response scored. Returns ``{"attributes": {name: value}, "score": weighted score}`` per conversation
        (weights: a list in head order or ``{attribute: weight}``; default HelpSteer2's)."""
        from nemolite.reward import resolve_weights, reward_result, reward_token_ids

        conversations = conversations if conversations and isinstance(conversations[0], list) else [conversations]
        names = self.config.reward_attributes
        weights = resolve_weights(weights, names)
        params = SamplingParams(reward=True)
        loras = self._loras_per_prompt(lora_request, len(conversations))
        outputs = self._run([(None, reward_token_ids(self.tokenizer, conversation), params, lora)
                             for conversation, lora in zip(conversations, loras)], use_tqdm)
        return [reward_result(output.reward, names, weights) for output in outputs]

    def chat_params(self, sampling_params: SamplingParams | None) -> SamplingParams:
        """The caller's parameters plus the template's end-of-turn stops."""
        return with_chat_stops(self.tokenizer, sampling_params or SamplingParams())

    def stream(self, prompt_token_ids: list[int], params: SamplingParams, on_text: OnText) -> CompletionOutput:
        """Generate one completion, calling ``on_text`` with each piece of new text."""
        request_id = self.engine.add_request(None, None, list(prompt_token_ids), params)
        streamed, output = 0, None
        while output is None or not output.finished:
            for request, done in self.engine.step_requests():
                if request.request_id != request_id:
                    continue
                if request.error is not None:
                    raise request.error
                output = request.output(done)
                text = output.outputs[0].text
                if len(text) > streamed:
                    on_text(text[streamed:])
                    streamed = len(text)
        return output.outputs[0]

    def _run(self, requests: list[tuple[str | None, list[int], SamplingParams, object]],
             use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        ids: list[str] = []
        try:
            for prompt, token_ids, params, lora_request in requests:
                ids.append(self.engine.add_request(None, prompt, token_ids, params, lora_request))
        except NemoliteError:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm or len(ids) < 2, file=sys.stderr) as bar:
            while len(finished) < len(ids):
                for request, done in self.engine.step_requests():
                    if request.error is not None:
                        for request_id in ids:
                            self.engine.abort_request(request_id)
                        raise request.error
                    if done:
                        finished[request.request_id] = request.output(True)
                        bar.update(1)
        return [finished[request_id] for request_id in ids]

    def _prompts(self, prompts, prompt_token_ids) -> tuple[list[str | None], list[list[int]]]:
        if prompts is None and prompt_token_ids is None:
            raise NemoliteError("give prompts (a string or a list of strings) or prompt_token_ids")
        if prompts is not None and prompt_token_ids is not None:
            raise NemoliteError("give either prompts or prompt_token_ids, not both")
        if prompt_token_ids is not None:
            if not isinstance(prompt_token_ids, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompt_token_ids):
                raise NemoliteError("prompt_token_ids must be a list of token-id lists, e.g. [[1, 2, 3]]")
            vocab = self.config.vocab_size
            for index, ids in enumerate(prompt_token_ids):
                if not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                    raise NemoliteError(f"prompt_token_ids[{index}] must be a non-empty list of ids in [0, {vocab})")
            return [None] * len(prompt_token_ids), [list(ids) for ids in prompt_token_ids]
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise NemoliteError("prompts must be a string or a list of strings")
        token_ids = [self.tokenizer.encode(p) for p in prompts]
        for index, ids in enumerate(token_ids):
            if not ids:
                raise NemoliteError(f"prompt {index} is empty and this tokenizer adds no BOS token; give some text")
        return list(prompts), token_ids

    @staticmethod
    def _loras_per_prompt(lora_request, count: int) -> list:
        if lora_request is None or not isinstance(lora_request, (list, tuple)):
            return [lora_request] * count
        if len(lora_request) != count:
            raise NemoliteError(f"got {len(lora_request)} LoRA requests for {count} prompts; give one or one each")
        return list(lora_request)

    @staticmethod
    def _params_per_prompt(sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        sampling_params = list(sampling_params)
        if len(sampling_params) != count:
            raise NemoliteError(f"got {len(sampling_params)} SamplingParams for {count} prompts; give one or one each")
        return sampling_params


def with_chat_stops(tokenizer: Tokenizer, params: SamplingParams) -> SamplingParams:
    """``params`` plus the stop strings and token ids that end an assistant turn in ``tokenizer``'s chat format."""
    stop_strings, stop_ids = tokenizer.chat_stop()
    if not stop_strings and not stop_ids:
        return params
    return dataclasses.replace(params, stop=list(dict.fromkeys([*params.stop, *stop_strings])),
                               stop_token_ids=list(dict.fromkeys([*params.stop_token_ids, *stop_ids])))
