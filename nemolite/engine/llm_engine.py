"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out.

Owns the paged KV cache, the block manager, the scheduler and the model runner; turns each
sampled token into text and applies the stop rules. Knows nothing of HTTP or threads.
"""

from __future__ import annotations

import dataclasses
import itertools

from pathlib import Path

import torch

from nemolite.checkpoint import load_checkpoint, resolve_model_path
from nemolite.engine.block_manager import BlockManager
from nemolite.engine.kv_cache import PagedKVCache
from nemolite.engine.outputs import CompletionOutput, RequestOutput
from nemolite.engine.runner import ModelRunner
from nemolite.engine.sampler import apply_penalties, logprob_entry, make_generator, sample
from nemolite.engine.sampling_params import SamplingParams
from nemolite.engine.scheduler import Scheduler
from nemolite.engine.sequence import Sequence
from nemolite.errors import NemoliteError
from nemolite.model import CausalLM
from nemolite.tokenizer import IncrementalDetokenizer, Tokenizer


# A step with this many prompt tokens is made of GEMMs big enough to gain from every core even while
# an event loop shares them: demo-model prefill ran at 5.9k tok/s on one core of the 2-core box and
# 10.0k on two, where decode steps of small GEMMs got slower with two (see async_llm.shared_cpu_threads).
PREFILL_STEP_TOKENS = 128
DEFAULT_CPU_KV_BYTES = 2e9  # the CPU default, as vLLM's VLLM_CPU_KVCACHE_SPACE; --kv-cache-gb overrides it


@dataclasses.dataclass(slots=True)
class EngineArgs:
    kv_cache_gb: float | None = None  # None: room for max_num_seqs full contexts, within DEFAULT_CPU_KV_BYTES
    kv_cache_fraction: float | None = None  # or this fraction of the device's free memory
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    compile: bool = False  # torch.compile the decode step (minutes of compiling, then faster steps)
    tensor_parallel_size: int = 1  # > 1 or pipeline_parallel_size > 1: one process per rank (torchrun, srun)
    pipeline_parallel_size: int = 1
    cpu_threads: int | None = None  # intra-op threads on the CPU (torch.set_num_threads); None: torch's choice
    cpu_prefill_threads: int | None = None  # for steps with PREFILL_STEP_TOKENS or more prompt tokens; None: the same


@dataclasses.dataclass(slots=True)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]

    def output(self, final: bool) -> RequestOutput:
        """A snapshot the caller may keep while the engine goes on."""
        prompt_logprobs = self.seqs[0].prompt_logprobs
        if prompt_logprobs is None and self.seqs[0].params.prompt_logprobs is not None and len(self.prompt_token_ids) == 1:
            prompt_logprobs = [None]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [_snapshot(seq) for seq in self.seqs], finished=final,
                             prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs),
                             prompt_full_logprobs=None if self.seqs[0].prompt_full_logprobs is None
                             else list(self.seqs[0].prompt_full_logprobs),
                             reward=self.seqs[0].reward)

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, args: EngineArgs | None = None, seed: int = 0):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.args = args = args or EngineArgs()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.seed = seed
        self._step_threads: tuple[int, int] | None = None  # (decode steps, prefill steps) on the CPU
        if args.cpu_threads is not None and self.device.type == "cpu":
            if args.cpu_threads < 1:
                raise NemoliteError(f"--threads must be >= 1, got {args.cpu_threads}")
            torch.set_num_threads(args.cpu_threads)
            self._step_threads = (args.cpu_threads, args.cpu_prefill_threads or args.cpu_threads)
        if self.device.type == "cpu" and not args.compile:  # compiling prepacks weights its own way (freezing)
            model.prepack_linears()
        parallel = model.parallel
        num_blocks = self._num_blocks(args)
        if parallel.distributed:  # every rank holds the same block ids: the smallest budget rules
            count = torch.tensor([num_blocks], device=self.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
            num_blocks = int(count.item())
        self.cache = PagedKVCache(model.local_config, num_blocks, args.block_size, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens)
        if parallel.distributed:
            from nemolite.parallel.runner import ParallelRunner

            self.runner = ParallelRunner(model, self.cache, self.device, parallel)
        else:
            self.runner = ModelRunner(model, self.cache, self.device, compile=args.compile)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_counter = itertools.count()
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0

    @classmethod
    def from_pretrained(cls, model: str | Path | None, dtype: str | torch.dtype = "auto",
                        device: str | torch.device | None = None, seed: int = 0,
                        tokenizer: str | Path | None = None, **engine_args) -> "LLMEngine":
        """Load a checkpoint (None: the demo model) and its tokenizer; ``engine_args`` are EngineArgs fields.

        With ``tensor_parallel_size``/``pipeline_parallel_size`` above 1 every process of the job
        (torchrun, srun) makes this call: each loads its shard; rank 0 gets the engine, and on every
        other rank the call runs rank 0's steps until rank 0 closes its engine, then exits the process."""
        from nemolite.checkpoint import default_device
        from nemolite.parallel.groups import init_parallel

        args = EngineArgs(**engine_args)
        path = resolve_model_path(model)
        device = torch.device(device) if device is not None else default_device()
        parallel = init_parallel(args.tensor_parallel_size, args.pipeline_parallel_size, device.type)
        loaded, tokenizer_ = load_checkpoint(path, dtype, device, tokenizer, parallel)
        engine = cls(loaded, tokenizer_, args, seed=seed)
        if parallel.distributed and not parallel.is_driver:
            engine.runner.follow()
            torch.distributed.destroy_process_group()
            raise SystemExit(0)
        return engine

    def close(self) -> None:
        """Release what the engine holds beyond memory: in a parallel job, stop the other ranks."""
        self.runner.close()

    def _num_blocks(self, args: EngineArgs) -> int:
        per_block = PagedKVCache.bytes_per_block(self.model.local_config, args.block_size, self.dtype)
        if per_block == 0:  # no attention layer at all: blocks cost nothing
            return args.max_num_seqs * -(-self.config.max_position_embeddings // args.block_size)
        if args.kv_cache_gb is not None and args.kv_cache_fraction is not None:
            raise NemoliteError("give --kv-cache-gb or --kv-cache-fraction, not both")
        if args.kv_cache_fraction is not None:
            if not 0 < args.kv_cache_fraction <= 0.95:
                raise NemoliteError(f"--kv-cache-fraction must be in (0, 0.95], got {args.kv_cache_fraction}")
            budget = args.kv_cache_fraction * _free_memory(self.device)
        elif args.kv_cache_gb is not None:
            budget = args.kv_cache_gb * 1e9
        else:
            wanted = args.max_num_seqs * self.config.max_position_embeddings * per_block / args.block_size
            budget = min(wanted, 0.25 * _free_memory(self.device),
                         float("inf") if self.device.type == "cuda" else DEFAULT_CPU_KV_BYTES)
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise NemoliteError(f"a KV cache of {budget / 1e9:.3f} GB holds no block of {per_block} bytes; "
                                "raise --kv-cache-gb")
        return num_blocks

    def add_request(self, request_id: str | None, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> str:
        request_id = str(next(self._request_counter)) if request_id is None else request_id
        if request_id in self.requests:
            raise NemoliteError(f"request id {request_id!r} is already in use")
        self.validate_request(prompt_token_ids, params)
        seqs = []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, index, list(prompt_token_ids), params,
                           make_generator(self._seed(params, index), self.device))
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            seq.waits_for = seqs[0] if seqs else None
            seqs.append(seq)
        self.requests[request_id] = Request(request_id, prompt, list(prompt_token_ids), seqs)
        for seq in seqs:
            # The prompt runs only to be scored (prompt logprobs or a reward).
            scored = seq.index == 0 and (params.prompt_logprobs is not None or params.reward)
            if params.max_tokens == 0 and not scored:
                seq.output.finish_reason = "length"
                self.scheduler.finish(seq)
            else:
                self.scheduler.add(seq)
        return request_id

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise NemoliteError for a request this engine can never run; reads nothing that steps change."""
        context = self.config.max_position_embeddings
        if not prompt_token_ids:
            raise NemoliteError("the prompt is empty; give at least one token")
        if len(prompt_token_ids) >= context:
            raise NemoliteError(f"the prompt has {len(prompt_token_ids)} tokens but the model's context is "
                                f"{context}; shorten the prompt")
        if params.reward != self.config.is_reward_model:
            raise NemoliteError("this is a reward model: it scores conversations (POST /v1/reward) and generates "
                                "no text" if self.config.is_reward_model else
                                "this model has no reward head; serve a reward model to score responses")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise NemoliteError(f"prompt token ids must be in [0, {vocab})")
        longest = min(context, len(prompt_token_ids) + (params.max_tokens if params.max_tokens is not None else context))
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            raise NemoliteError(f"the KV cache ({self.block_manager.num_blocks} blocks of {self.args.block_size} "
                                f"tokens) cannot hold {longest} tokens; raise --kv-cache-gb or lower max_tokens")

    def _seed(self, params: SamplingParams, index: int) -> int:
        base = params.seed if params.seed is not None else self.seed * 1_000_003 + next(self._request_counter)
        return (base * 7919 + index) % (2**63)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else ():
            if not seq.finished:
                seq.output.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        """Work left, or finished requests whose outputs the next step() still has to report."""
        return bool(self.requests) or self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; the outputs of every request that moved (finished ones leave)."""
        return [request.output(finished) for request, finished in self.step_requests()]

    @torch.inference_mode()
    def step_requests(self) -> list[tuple[Request, bool]]:
        """``step`` without the snapshots: (request, finished) of every request that moved, for a caller
        that takes ``request.output(finished)`` of only those it reports, before the next step. Copying
        every moved request's tokens each step cost 13% of a 16-sequence step of the demo model."""
        batch = self.scheduler.schedule()
        if self.block_manager.handed_out:
            self.runner.zero_blocks(self.block_manager.handed_out)
            self.block_manager.handed_out.clear()
        if not batch:
            return [(request, True) for request in self._pop_finished()]
        if self._step_threads is not None and self._step_threads[0] != self._step_threads[1]:
            prefill = sum(num_tokens for _, num_tokens in batch if num_tokens > 1) >= PREFILL_STEP_TOKENS
            threads = self._step_threads[prefill]
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        step = self.runner.execute(batch)
        logits, samplers = step.sample_logits, step.samplers
        self._score_prompts(step)
        for seq, num_tokens in batch:
            self.block_manager.mark_computed(seq, num_tokens)
            if seq.num_output_tokens == 0:
                self.num_prompt_tokens += num_tokens
        if self.config.is_reward_model:  # the rows are rewards, not logits
            for row, seq in enumerate(samplers):
                seq.reward = logits[row].tolist()
            logits = logits[:0]
        if any(seq.params.max_tokens == 0 for seq in samplers):  # prompts run only to be scored
            keep = [row for row, seq in enumerate(samplers) if seq.params.max_tokens != 0]
            for seq in samplers:
                if seq.params.max_tokens == 0:
                    seq.output.finish_reason = "length"
                    self.scheduler.finish(seq)
            logits, samplers = logits[keep], [samplers[row] for row in keep]
        for row, seq in enumerate(samplers):
            params = seq.params
            if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
                apply_penalties(logits[row], params, seq.prompt_token_ids, seq.output.token_ids)
        banned = [self._banned(seq) for seq in samplers]
        results = sample(logits, [seq.params for seq in samplers], [seq.generator for seq in samplers],
                         banned) if samplers else []
        moved = {}
        for seq, (token, logprob, top, full) in zip(samplers, results):
            if full is not None:
                seq.output.full_logprobs.append(full)
            self._append_token(seq, token, logprob, top)
            moved[seq.request_id] = self.requests[seq.request_id]
        outputs = [(request, request.finished) for request in moved.values()]
        # Requests that finished without a token this step (max_tokens=0) are reported once, now.
        outputs += [(request, True) for request in self._pop_finished() if request.request_id not in moved]
        return outputs

    def _score_prompts(self, step) -> None:
        """Prompt logprobs: the row at position p scores prompt token p + 1."""
        row = 0
        logprobs = step.prompt_logits.log_softmax(-1) if step.prompt_ranges else None
        for seq, first, count in step.prompt_ranges:
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]
                seq.prompt_full_logprobs = [] if seq.params.full_logprobs else None
            for position in range(first, first + count):
                if len(seq.prompt_logprobs) == position + 1:  # not scored yet (a preempted prompt is recomputed)
                    token = seq.prompt_token_ids[position + 1]
                    entry = logprob_entry(logprobs[row], token, seq.params.prompt_logprobs)
                    for token_id, value in entry.items():
                        value.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
                    seq.prompt_logprobs.append(entry)
                    if seq.prompt_full_logprobs is not None:
                        seq.prompt_full_logprobs.append(logprobs[row].to("cpu", copy=True))
                row += 1

    def _banned(self, seq: Sequence) -> list[int] | None:
        if seq.num_output_tokens >= seq.params.min_tokens:
            return None
        return self._stop_ids(seq.params)

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        eos = [] if params.ignore_eos else self.tokenizer.eos_token_ids
        return list(dict.fromkeys([*params.stop_token_ids, *eos]))

    def _append_token(self, seq: Sequence, token: int, logprob: float, top) -> None:
        params, output = seq.params, seq.output
        seq.token_ids.append(token)
        output.token_ids.append(token)
        output.cumulative_logprob += logprob
        self.num_generated_tokens += 1
        if top is not None:
            for token_id, entry in top.items():
                entry.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
            output.logprobs.append(top)
        if token in self._stop_ids(params):
            output.finish_reason = "stop"
            output.stop_reason = token if token in params.stop_token_ids else None
        else:
            delta = seq.detokenizer.push(token)
            if delta and params.stop and seq.num_output_tokens >= params.min_tokens:
                longest = max(len(s) for s in params.stop)
                searched_from = max(0, len(output.text) - longest + 1)
                output.text += delta
                hit = _find_stop(output.text, params.stop, searched_from)
                if hit is not None:
                    end = hit[0] + len(hit[1]) if params.include_stop_str_in_output else hit[0]
                    output.text = output.text[:end]
                    output.finish_reason, output.stop_reason = "stop", hit[1]
            else:
                output.text += delta
        if output.finish_reason is None and (
                (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
                or len(seq) >= self.config.max_position_embeddings):
            output.finish_reason = "length"
        if output.finish_reason is not None:
            self.scheduler.finish(seq)

    def _pop_finished(self) -> list[Request]:
        done = [request for request in self.requests.values() if request.finished]
        for request in done:
            del self.requests[request.request_id]
        return done

    def stats(self) -> dict[str, float]:
        manager = self.block_manager
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_blocks_total": manager.num_blocks, "kv_blocks_free": manager.num_free_blocks,
                "prefix_cache_hit_rate": manager.prefix_hit_rate, "num_preemptions": self.scheduler.num_preemptions,
                "prompt_tokens": self.num_prompt_tokens, "generation_tokens": self.num_generated_tokens}


def _snapshot(seq: Sequence) -> CompletionOutput:
    """The output so far, without trailing text that could still turn out to start a stop string."""
    output, text = seq.output, seq.output.text
    if output.finish_reason is None and seq.params.stop:
        text = text[:max(0, len(text) - max(len(s) for s in seq.params.stop) + 1)]
    return dataclasses.replace(output, text=text, token_ids=list(output.token_ids),
                               logprobs=None if output.logprobs is None else list(output.logprobs),
                               full_logprobs=None if output.full_logprobs is None else list(output.full_logprobs))


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text[start:]``: (its position, the string)."""
    best = None
    for stop in stops:
        position = text.find(stop, start)
        if position >= 0 and (best is None or position < best[0]):
            best = (position, stop)
    return best


def _free_memory(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4e9
