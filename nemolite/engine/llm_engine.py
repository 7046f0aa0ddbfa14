"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out.

Owns the paged KV cache, the block manager, the scheduler and the model runner; the output
processor turns each sampled token into text and applies the stop rules. Knows nothing of HTTP or
threads.

A failure that one request causes (its data, or a bug only its parameters reach) ends that request
alone, with the error kept on it for its caller; every other request of the step goes on with the
tokens it would have had. Only an engine fault (out of memory, a device or collective error)
propagates out of ``step``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path

import torch

from nemolite.checkpoint import load_checkpoint, resolve_model_path
from nemolite.engine.block_manager import BlockManager
from nemolite.engine.kv_budget import num_kv_blocks
from nemolite.engine.kv_cache import PagedKVCache, kv_storage_dtype
from nemolite.engine.output_processor import OutputProcessor
from nemolite.engine.outputs import RequestOutput
from nemolite.engine.request import Request
from nemolite.engine.runner import ModelRunner, StepLogits
from nemolite.engine.sampler import apply_penalties, make_generator, needs_processing, sample
from nemolite.engine.sampling_params import SamplingParams
from nemolite.engine.scheduler import ScheduledBatch, Scheduler
from nemolite.engine.sequence import Sequence
from nemolite.engine.structured import (GrammarCompiler, MaskFiller, SequenceGrammar, apply_token_bitmask,
                                       closing_window, steer_to_close)
from nemolite.engine.validation import RequestLimits, validate_request
from nemolite.errors import NemoliteError
from nemolite.model import CausalLM
from nemolite.quant.model import interleave_rows
from nemolite.quant.spec import parse_quantization
from nemolite.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

# A step with this many prompt tokens is made of GEMMs big enough to gain from every core even while
# an event loop shares them: demo-model prefill ran at 5.9k tok/s on one core of the 2-core box and
# 10.0k on two, where decode steps of small GEMMs got slower with two (see async_llm.shared_cpu_threads).
PREFILL_STEP_TOKENS = 128


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
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)
    quantization: str | None = None  # weight-only at load: "int8", "int4", "int4-g128-asym"... (nemolite.quant.spec)
    kv_cache_dtype: str = "auto"  # "fp8": e4m3 K/V with the checkpoint's k/v scales (1.0 when absent), 2x the blocks
    enable_lora: bool = False  # serve LoRA adapters (nemolite.lora): requests name theirs with a LoRARequest
    max_loras: int = 4  # adapters one step may mix (device slots)
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # adapters kept read in host memory (None: max_loras)


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
        model.fuse_projections()  # q/k/v and gate/up each one layer: fewer, larger GEMMs and kernel calls
        if self.device.type == "cpu":
            interleave_rows(model)  # int4 weights in the CPU kernel's layout
        self.lora = None
        if args.enable_lora:  # wraps the (fused) linear layers, so after fusing and before any compiling
            from nemolite.lora.manager import LoRAManager

            self.lora = LoRAManager(model, args.max_loras, args.max_lora_rank, args.max_cpu_loras)
        if self.device.type == "cpu" and not args.compile:  # compiling prepacks weights its own way (freezing)
            model.prepack_linears()
        parallel = model.parallel
        kv_dtype = kv_storage_dtype(args.kv_cache_dtype, self.dtype)
        if kv_dtype != self.dtype and args.compile:
            raise NemoliteError("--kv-cache-dtype fp8 runs the eager decode step; drop --compile")
        num_blocks = num_kv_blocks(model.local_config, self.config.max_position_embeddings, args.block_size,
                                   args.max_num_seqs, kv_dtype, self.device, args.kv_cache_gb,
                                   args.kv_cache_fraction)
        if parallel.distributed:  # every rank holds the same block ids: the smallest budget rules
            count = torch.tensor([num_blocks], device=self.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
            num_blocks = int(count.item())
        self.cache = PagedKVCache(model.local_config, num_blocks, args.block_size, self.dtype, self.device,
                                  kv_dtype, getattr(model, "kv_cache_scales", None))
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                                   args.max_loras if args.enable_lora else None)
        if parallel.distributed:
            from nemolite.parallel.runner import ParallelRunner

            self.runner = ParallelRunner(model, self.cache, self.device, parallel, lora=self.lora)
        else:
            self.runner = ModelRunner(model, self.cache, self.device, compile=args.compile, lora=self.lora)
        self.output_processor = OutputProcessor(tokenizer, self.config)
        self.grammars = GrammarCompiler(tokenizer)  # structured outputs, compiled once each (thread-safe)
        self._masks = MaskFiller(tokenizer.vocab_size, self.device)
        self._own_stops = frozenset(tokenizer.chat_stop()[0])  # with_chat_stops adds them, not the client
        self.requests: dict[str, Request] = {}
        self._failed: dict[str, Request] = {}  # requests that failed since the last step reported them
        self._seq_ids = itertools.count()
        self._request_counter = itertools.count()
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
        quantization = parse_quantization(args.quantization)  # a bad spelling fails before any loading
        path = resolve_model_path(model)
        device = torch.device(device) if device is not None else default_device()
        parallel = init_parallel(args.tensor_parallel_size, args.pipeline_parallel_size, device.type)
        loaded, tokenizer_ = load_checkpoint(path, dtype, device, tokenizer, parallel, quantization)
        engine = cls(loaded, tokenizer_, args, seed=seed)
        if parallel.distributed and not parallel.is_driver:
            engine.runner.follow()
            torch.distributed.destroy_process_group()
            raise SystemExit(0)
        return engine

    def close(self) -> None:
        """Release what the engine holds beyond memory: in a parallel job, stop the other ranks."""
        self._masks.close()
        self.runner.close()

    def add_request(self, request_id: str | None, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, lora_request=None) -> str:
        """Queue a request; ``lora_request`` (a nemolite.LoRARequest) runs it with that adapter, read now
        if this engine has not read it yet."""
        request_id = str(next(self._request_counter)) if request_id is None else request_id
        if request_id in self.requests:
            raise NemoliteError(f"request id {request_id!r} is already in use")
        self.validate_request(prompt_token_ids, params)
        # Compiled here unless a server compiled it already on a worker thread (then a cache hit).
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        lora_id, salt = self.add_lora(lora_request) if lora_request is not None else (0, b"")
        seqs = []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, index, list(prompt_token_ids), params,
                           make_generator(self._seed(params, index), self.device), lora_id, salt)
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            seq.waits_for = seqs[0] if seqs else None
            if grammar is not None:
                seq.grammar = SequenceGrammar(grammar.deep_copy(), params.structured_outputs.closes_as_json)
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

    def add_lora(self, lora_request) -> tuple[int, bytes]:
        """Register (and read) an adapter: its id and the prefix-cache salt of its sequences."""
        from nemolite.lora import LoRARequest

        if not isinstance(lora_request, LoRARequest):
            raise NemoliteError(f"lora_request must be a nemolite.LoRARequest, not {type(lora_request).__name__}")
        if self.lora is None:
            raise NemoliteError(f"LoRA adapter {lora_request.lora_name!r} asked for, but this engine was started "
                                "without LoRA: pass enable_lora=True (nemolite serve --enable-lora)")
        known = lora_request.lora_int_id in self.lora.requests
        self.lora.add(lora_request)
        if not known and self.model.parallel.distributed:
            self.runner.add_lora(lora_request)
        salt = f"lora:{lora_request.lora_int_id}:{lora_request.lora_path}".encode()
        return lora_request.lora_int_id, salt

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter no running request uses; False if it is unknown."""
        if self.lora is None:
            return False
        if any(seq.lora_id == lora_id for seq in (*self.scheduler.running, *self.scheduler.waiting)):
            raise NemoliteError(f"LoRA adapter {lora_id} is in use by running requests; unload it when they end")
        removed = self.lora.remove(lora_id)
        if removed and self.model.parallel.distributed:
            self.runner.remove_lora(lora_id)
        return removed

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise NemoliteError for a request this engine must not run (see nemolite.engine.validation)."""
        validate_request(prompt_token_ids, params, self.config,
                         self.block_manager.num_blocks * self.args.block_size, self.args.limits,
                         self.tokenizer.eos_token_ids, self._own_stops)

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
        return bool(self.requests) or bool(self._failed) or self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; the outputs of every request that moved (finished ones leave)."""
        return [request.output(finished) for request, finished in self.step_requests()]

    @torch.inference_mode()
    def step_requests(self) -> list[tuple[Request, bool]]:
        """``step`` without the snapshots: (request, finished) of every request that moved, for a caller
        that takes ``request.output(finished)`` of only those it reports, before the next step. Copying
        every moved request's tokens each step cost 13% of a 16-sequence step of the demo model.
        A request that failed comes with ``request.error`` set and finished True."""
        batch = self.scheduler.schedule()
        if self.block_manager.handed_out:
            self.runner.zero_blocks(self.block_manager.handed_out)
            self.block_manager.handed_out.clear()
        moved: dict[str, Request] = {}
        if batch:
            if self._step_threads is not None and self._step_threads[0] != self._step_threads[1]:
                prefill = sum(num_tokens for _, num_tokens in batch if num_tokens > 1) >= PREFILL_STEP_TOKENS
                threads = self._step_threads[prefill]
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
            masks = self._step_masks(batch)
            for part, step in self._execute(batch):
                self._process(part, step, moved, masks)
        outputs = [(request, request.finished) for request in moved.values() if request.error is None]
        # Requests that finished without a token this step (max_tokens=0) are reported once, now.
        outputs += [(request, True) for request in self._pop_finished() if request.request_id not in moved]
        failed, self._failed = list(self._failed.values()), {}
        return outputs + [(request, True) for request in failed]

    def _execute(self, batch: ScheduledBatch) -> list[tuple[ScheduledBatch, StepLogits]]:
        """The forward pass of ``batch``. If it fails for another reason than an engine fault, each
        request's sequences run again on their own (writing the same K/V again), so that only the
        request whose data fails is failed. Not under TP/PP: every rank must run the same steps."""
        try:
            return [(batch, self.runner.execute(batch))]
        except Exception as error:  # noqa: BLE001 - sorted out below
            if is_engine_fault(error) or self.model.parallel.distributed:
                raise
            first_error = error
        by_request: dict[str, ScheduledBatch] = {}
        for seq, num_tokens in batch:
            by_request.setdefault(seq.request_id, []).append((seq, num_tokens))
        if len(by_request) == 1:
            self._fail(batch[0][0].request_id, first_error)
            return []
        steps = []
        for request_id, part in by_request.items():
            try:
                steps.append((part, self.runner.execute(part)))
            except Exception as error:  # noqa: BLE001
                if is_engine_fault(error):
                    raise
                self._fail(request_id, error)
        return steps

    def _step_masks(self, batch: ScheduledBatch) -> dict[int, tuple]:
        """The grammar masks of the constrained sequences that sample this step, seq_id -> (future of the
        bitmask, its row): computed during the forward pass where a core is free for it, else after it."""
        constrained = [seq for seq, num_tokens in batch
                       if seq.grammar is not None and seq.num_computed_tokens + num_tokens == len(seq)]
        if not constrained:
            return {}
        future = self._masks.start([seq.grammar.matcher for seq in constrained])
        return {seq.seq_id: (future, row) for row, seq in enumerate(constrained)}

    def _apply_masks(self, logits: torch.Tensor, samplers: list[Sequence], masks: dict[int, tuple]) -> None:
        """Set the logits of every token its grammar forbids to -inf, in the constrained rows."""
        rows = [row for row, seq in enumerate(samplers) if seq.seq_id in masks and not seq.finished]
        if not rows:
            return
        bitmask = torch.stack([masks[samplers[row].seq_id][0].result()[masks[samplers[row].seq_id][1]]
                               for row in rows])
        near_end = [index for index, row in enumerate(rows) if self._near_budget(samplers[row])]
        if near_end:
            steered = bitmask[near_end]
            steer_to_close(steered, [samplers[rows[i]].grammar.in_string(samplers[rows[i]].output.text) for i in near_end],
                           self.grammars.closing_bitmasks())
            bitmask[near_end] = steered
        apply_token_bitmask(logits, bitmask, rows)

    def _near_budget(self, seq: Sequence) -> bool:
        """A JSON-constrained sequence close enough to its token budget to be steered to close."""
        left = self.config.max_position_embeddings - len(seq)
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens)
        return seq.grammar.is_json and left <= closing_window(seq.params.max_tokens)

    def _process(self, batch: ScheduledBatch, step: StepLogits, moved: dict[str, Request],
                 masks: dict[int, tuple] | None = None) -> None:
        """Everything after the forward pass, per sequence, each failure confined to its request."""
        logits, samplers = step.sample_logits, step.samplers
        if masks:
            self._apply_masks(logits, samplers, masks)
        self._score_prompts(step)
        for seq, num_tokens in batch:
            if not seq.finished:
                self.block_manager.mark_computed(seq, num_tokens)
                if seq.num_output_tokens == 0:
                    self.num_prompt_tokens += num_tokens
        rows = []
        for row, seq in enumerate(samplers):
            if seq.finished:  # failed above
                continue
            if self.config.is_reward_model:  # the rows are rewards, not logits
                seq.reward = logits[row].tolist()
                seq.output.finish_reason = "length"
                self.scheduler.finish(seq)
            elif seq.params.max_tokens == 0:  # the prompt ran only to be scored
                seq.output.finish_reason = "length"
                self.scheduler.finish(seq)
            elif not needs_processing(seq.params) or self._guard(seq, self._process_row, logits[row], seq):
                rows.append(row)
        if rows:
            sampled = self._sample(logits, [samplers[row] for row in rows], rows)
            for seq, result in sampled:
                if seq.finished:  # a sibling of ``n`` failed its request earlier in this loop
                    continue
                if self._guard(seq, self._append, seq, *result):
                    moved[seq.request_id] = self.requests[seq.request_id]

    def _process_row(self, row: torch.Tensor, seq: Sequence) -> bool:
        apply_penalties(row, seq.params, seq.prompt_token_ids, seq.output.token_ids)
        return True

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> list[tuple[Sequence, tuple]]:
        """(sequence, sample result) of every row that sampled; a batch the sampler fails on is sampled
        again row by row so that only the failing rows' requests fail."""
        chosen = logits if len(rows) == logits.shape[0] else logits[rows]
        banned = [self.output_processor.banned(seq) for seq in seqs]
        try:
            return list(zip(seqs, sample(chosen, [s.params for s in seqs], [s.generator for s in seqs], banned)))
        except Exception as error:  # noqa: BLE001
            if is_engine_fault(error):
                raise
        results = []
        for index, seq in enumerate(seqs):
            result = self._guard(seq, sample, chosen[index:index + 1], [seq.params], [seq.generator], [banned[index]])
            if result:
                results.append((seq, result[0]))
        return results

    def _append(self, seq: Sequence, token: int, logprob: float, top, full) -> bool:
        if seq.grammar is not None:
            seq.grammar.accept(token)
        finished = self.output_processor.append_token(seq, token, logprob, top, full)
        if seq.grammar is not None and seq.output.finish_reason in (None, "length") and seq.grammar.finished:
            seq.output.finish_reason = "stop"  # the structure is complete (with its budget's last token, too)
            finished = True
        if finished:
            self.scheduler.finish(seq)
        return True

    def _score_prompts(self, step: StepLogits) -> None:
        if not step.prompt_ranges:
            return
        logprobs = step.prompt_logits.log_softmax(-1)
        row = 0
        for seq, first, count in step.prompt_ranges:
            if not seq.finished:
                self._guard(seq, self.output_processor.score_prompt, seq, logprobs[row:row + count], first)
            row += count

    def _guard(self, seq: Sequence, function, *args):
        """``function(*args)``, or None with ``seq``'s request failed if it raised (engine faults propagate)."""
        try:
            return function(*args)
        except Exception as error:  # noqa: BLE001
            if is_engine_fault(error):
                raise
            self._fail(seq.request_id, error)
            return None

    def _fail(self, request_id: str, error: BaseException) -> None:
        """End one request with ``error``: its sequences stop, their blocks are freed, its caller is told."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if not isinstance(error, NemoliteError):
            log.error("request %s failed; the engine goes on without it", request_id,
                      exc_info=(type(error), error, error.__traceback__))
        request.error = error
        for seq in request.seqs:
            if not seq.finished:
                seq.output.finish_reason = "abort"
                self.scheduler.finish(seq)
        self._failed[request_id] = request

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
                "prompt_tokens": self.num_prompt_tokens,
                "generation_tokens": self.output_processor.num_generated_tokens,
                **(self.lora.stats() if self.lora is not None else {})}



def is_engine_fault(error: BaseException) -> bool:
    """Whether ``error`` leaves the engine itself unusable (memory, the device, the collectives), rather
    than being one request's problem."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    dist_error = getattr(torch.distributed, "DistError", None) if torch.distributed.is_available() else None
    if dist_error is not None and isinstance(error, dist_error):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in message for sign in ("CUDA error", "out of memory", "can't allocate memory", "NCCL", "Gloo"))
