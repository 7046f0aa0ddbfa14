"""A request in the engine: its prompt, its ``n`` sequences, and the snapshots handed to callers."""

from __future__ import annotations

import dataclasses

from nemolite.engine.outputs import CompletionOutput, RequestOutput
from nemolite.engine.sequence import Sequence


@dataclasses.dataclass(slots=True)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    # Set when this request alone failed in a step (its input or a bug it hit): the caller gets the
    # error instead of an output, and every other request of the batch goes on.
    error: BaseException | None = None

    def output(self, final: bool) -> RequestOutput:
        """A snapshot the caller may keep while the engine goes on."""
        first = self.seqs[0]
        prompt_logprobs = first.prompt_logprobs
        if prompt_logprobs is None and first.params.prompt_logprobs is not None and len(self.prompt_token_ids) == 1:
            prompt_logprobs = [None]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [snapshot(seq) for seq in self.seqs], finished=final,
                             prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs),
                             prompt_full_logprobs=None if first.prompt_full_logprobs is None
                             else list(first.prompt_full_logprobs),
                             reward=first.reward)

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)


def snapshot(seq: Sequence) -> CompletionOutput:
    """The output so far, without trailing text that could still turn out to start a stop string."""
    output, text = seq.output, seq.output.text
    if output.finish_reason is None and seq.params.stop:
        text = text[:max(0, len(text) - max(len(s) for s in seq.params.stop) + 1)]
    return dataclasses.replace(output, text=text, token_ids=list(output.token_ids),
                               logprobs=None if output.logprobs is None else list(output.logprobs),
                               full_logprobs=None if output.full_logprobs is None else list(output.full_logprobs))
