"""Per-request output processing: each sampled token becomes text, logprobs and a finish reason.

Stop rules (EOS, stop token ids, stop strings held back until they cannot be a stop's start,
``min_tokens``, ``max_tokens``, the context), incremental detokenising, and the decoded text of
logprob entries, as vLLM's output processor does it; the engine calls it once per sequence per step.
"""

from __future__ import annotations

import torch

from nemolite.config import ModelConfig
from nemolite.engine.outputs import Logprob
from nemolite.engine.sampler import logprob_entry
from nemolite.engine.sampling_params import SamplingParams
from nemolite.engine.sequence import Sequence
from nemolite.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, config: ModelConfig):
        self.tokenizer = tokenizer
        self.max_model_len = config.max_position_embeddings
        self.num_generated_tokens = 0

    def stop_ids(self, params: SamplingParams) -> list[int]:
        eos = [] if params.ignore_eos else self.tokenizer.eos_token_ids
        return list(dict.fromkeys([*params.stop_token_ids, *eos]))

    def banned(self, seq: Sequence) -> list[int] | None:
        """Tokens ``seq`` may not draw now: its stop tokens while it is short of ``min_tokens``."""
        if seq.num_output_tokens >= seq.params.min_tokens:
            return None
        return self.stop_ids(seq.params)

    def score_prompt(self, seq: Sequence, logprobs: torch.Tensor, first: int) -> None:
        """Prompt logprobs from rows [count, V] of log-softmaxed logits: the row at position p scores
        prompt token p + 1."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
            seq.prompt_full_logprobs = [] if seq.params.full_logprobs else None
        for row, position in enumerate(range(first, first + logprobs.shape[0])):
            if len(seq.prompt_logprobs) != position + 1:  # scored already (a preempted prompt is recomputed)
                continue
            entry = logprob_entry(logprobs[row], seq.prompt_token_ids[position + 1], seq.params.prompt_logprobs)
            self._decode_entry(entry)
            seq.prompt_logprobs.append(entry)
            if seq.prompt_full_logprobs is not None:
                seq.prompt_full_logprobs.append(logprobs[row].to("cpu", copy=True))

    def append_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, Logprob] | None,
                     full: torch.Tensor | None) -> bool:
        """Add a sampled token to ``seq``'s output; True when that ends the sequence."""
        params, output = seq.params, seq.output
        if full is not None:
            output.full_logprobs.append(full)
        seq.token_ids.append(token)
        output.token_ids.append(token)
        output.cumulative_logprob += logprob
        self.num_generated_tokens += 1
        if top is not None:
            self._decode_entry(top)
            output.logprobs.append(top)
        if token in self.stop_ids(params):
            output.finish_reason = "stop"
            output.stop_reason = token if token in params.stop_token_ids else None
        else:
            delta = seq.detokenizer.push(token)
            if delta and params.stop and seq.num_output_tokens >= params.min_tokens:
                longest = max(len(s) for s in params.stop)
                searched_from = max(0, len(output.text) - longest + 1)
                output.text += delta
                hit = find_stop(output.text, params.stop, searched_from)
                if hit is not None:
                    end = hit[0] + len(hit[1]) if params.include_stop_str_in_output else hit[0]
                    output.text = output.text[:end]
                    output.finish_reason, output.stop_reason = "stop", hit[1]
            else:
                output.text += delta
        if output.finish_reason is None and (
                (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
                or len(seq) >= self.max_model_len):
            output.finish_reason = "length"
        return output.finish_reason is not None

    def _decode_entry(self, entry: dict[int, Logprob]) -> None:
        for token_id, value in entry.items():
            value.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text[start:]``: (its position, the string)."""
    best = None
    for stop in stops:
        position = text.find(stop, start)
        if position >= 0 and (best is None or position < best[0]):
            best = (position, stop)
    return best
