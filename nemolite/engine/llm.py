"""``LLM``: load a checkpoint and generate, as vLLM users know it.

Each sequence is decoded on its own over a contiguous KV cache; the batching engine
replaces this loop without changing the API.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from nemolite.checkpoint import default_device, resolve_model_path
from nemolite.checkpoint.hf import load_hf_model
from nemolite.engine.outputs import CompletionOutput, Logprob, RequestOutput
from nemolite.engine.sampler import make_generator, sample
from nemolite.engine.sampling_params import SamplingParams
from nemolite.errors import NemoliteError
from nemolite.model import CausalLM, KVCache
from nemolite.tokenizer import IncrementalDetokenizer, Tokenizer

OnText = Callable[[str], None]


class LLM:
    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype = "auto",
                 device: str | torch.device | None = None, seed: int = 0, tokenizer: str | Path | None = None):
        path = resolve_model_path(model)
        self.device = torch.device(device) if device is not None else default_device()
        self.model: CausalLM = load_hf_model(path, dtype=dtype, device=self.device)
        self.config = self.model.config
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = Tokenizer.from_pretrained(tokenizer or path, model_type=self.config.model_type,
                                                   bos_token_id=self.config.bos_token_id,
                                                   eos_token_ids=self.config.eos_token_ids)
        self.model_path = path
        self.seed = seed
        self._request_counter = itertools.count()

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        texts, token_ids = self._prompts(prompts, prompt_token_ids)
        params = self._params_per_prompt(sampling_params, len(token_ids))
        from tqdm import tqdm

        outputs = []
        for text, ids, request_params in tqdm(list(zip(texts, token_ids, params)), desc="Generating",
                                              disable=not use_tqdm or len(token_ids) < 2, file=sys.stderr):
            outputs.append(self._generate_request(text, ids, request_params))
        return outputs

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the checkpoint's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        params = self.chat_params(sampling_params)
        prompts = [self.tokenizer.apply_chat_template(conversation) for conversation in conversations]
        token_ids = [self.tokenizer.encode(prompt, add_bos=False) for prompt in prompts]
        return [self._generate_request(prompt, ids, params) for prompt, ids in zip(prompts, token_ids)]

    def chat_params(self, sampling_params: SamplingParams | None) -> SamplingParams:
        """The caller's parameters plus the template's end-of-turn stops."""
        params = sampling_params or SamplingParams()
        stop_strings, stop_ids = self.tokenizer.chat_stop()
        if not stop_strings and not stop_ids:
            return params
        import dataclasses

        return dataclasses.replace(params, stop=list(dict.fromkeys([*params.stop, *stop_strings])),
                                   stop_token_ids=list(dict.fromkeys([*params.stop_token_ids, *stop_ids])))

    def stream(self, prompt_token_ids: list[int], params: SamplingParams, on_text: OnText) -> CompletionOutput:
        """Generate one completion, calling ``on_text`` with each piece of new text."""
        return self._generate_sequence(prompt_token_ids, params, 0, self._seed_for(params, 0), on_text)

    def _generate_request(self, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        request_id = next(self._request_counter)
        completions = [self._generate_sequence(prompt_ids, params, index, self._seed_for(params, request_id, index))
                       for index in range(params.n)]
        return RequestOutput(str(request_id), prompt, prompt_ids, completions)

    def _seed_for(self, params: SamplingParams, request_id: int, index: int = 0) -> int:
        base = params.seed if params.seed is not None else self.seed * 1_000_003 + request_id
        return (base * 7919 + index) % (2**63)

    @torch.inference_mode()
    def _generate_sequence(self, prompt_ids: list[int], params: SamplingParams, index: int, seed: int,
                           on_text: OnText | None = None) -> CompletionOutput:
        context = self.config.max_position_embeddings
        if len(prompt_ids) >= context:
            raise NemoliteError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
                                "shorten the prompt")
        budget = context - len(prompt_ids)
        max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)
        output = CompletionOutput(index=index, text="", token_ids=[], cumulative_logprob=0.0,
                                  logprobs=[] if params.logprobs is not None else None)
        if max_tokens == 0:
            output.finish_reason = "length"
            return output
        generator = make_generator(seed, self.device)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.tokenizer.eos_token_ids))
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        longest_stop = max((len(s) for s in params.stop), default=0)
        cache = KVCache(self.config, 1, len(prompt_ids) + max_tokens, self.dtype, self.device)
        inputs = torch.tensor([prompt_ids], device=self.device)
        streamed = 0
        while True:
            logits = self.model(inputs, cache=cache, last_only=True)[0, -1]
            banned = sorted(stop_ids) if len(output.token_ids) < params.min_tokens else None
            token, logprob, top = sample(logits, params, generator, banned)
            output.token_ids.append(token)
            output.cumulative_logprob += logprob
            if top is not None:
                for token_id, entry in top.items():
                    entry.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
                output.logprobs.append(top)
            if token in stop_ids:
                output.finish_reason = "stop"
                output.stop_reason = token if token in params.stop_token_ids else None
                break
            delta = detokenizer.push(token)
            if delta:
                searched_from = max(0, len(output.text) - longest_stop + 1)
                output.text += delta
                hit = (_find_stop(output.text, params.stop, searched_from)
                       if len(output.token_ids) >= params.min_tokens else None)
                if hit is not None:
                    output.text = output.text[:hit[0]]
                    output.finish_reason, output.stop_reason = "stop", hit[1]
                    break
            if len(output.token_ids) >= max_tokens:
                output.finish_reason = "length"
                break
            if on_text:
                # Hold back what could still become the start of a stop string.
                safe_end = len(output.text) - max(0, longest_stop - 1)
                if safe_end > streamed:
                    on_text(output.text[streamed:safe_end])
                    streamed = safe_end
            inputs = torch.tensor([[token]], device=self.device)
        if on_text and len(output.text) > streamed:
            on_text(output.text[streamed:])
        return output

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
    def _params_per_prompt(sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        sampling_params = list(sampling_params)
        if len(sampling_params) != count:
            raise NemoliteError(f"got {len(sampling_params)} SamplingParams for {count} prompts; give one or one each")
        return sampling_params


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text[start:]``: (its position, the string)."""
    best = None
    for stop in stops:
        position = text.find(stop, start)
        if position >= 0 and (best is None or position < best[0]):
            best = (position, stop)
    return best


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
