"""Running one step on every rank: rank 0 schedules and samples, every rank runs its shard.

Each step rank 0 (the driver) broadcasts the step's inputs (token ids, positions, cache slots:
small) and the blocks it handed out anew; then all ranks run the forward pass in lock-step.
Within a stage the TP ranks meet in their all-reduces; between stages hidden states go from
each rank to the same TP rank of the next stage. A step's batch is cut into micro-batches (one
per stage), and a stage sends a micro-batch on without waiting, so stages overlap when many
requests decode. The last stage sends the logits back to the driver. A ``stop`` command ends
every worker; a collective that fails (a rank died) ends this rank with a clear message, and
the launcher (torchrun, srun --kill-on-bad-exit) takes the others down.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from nemolite.engine.runner import ModelRunner, StepInputs, StepLogits, lora_step
from nemolite.engine.scheduler import ScheduledBatch
from nemolite.parallel.groups import ParallelState

log = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 30.0  # an idle driver pings the workers this often, well inside the collective timeout


def split_batch(batch: ScheduledBatch, parts: int) -> list[ScheduledBatch]:
    """Consecutive pieces of about equal token counts, at most ``parts``, none empty."""
    parts = max(1, min(parts, len(batch)))
    total = sum(num_tokens for _, num_tokens in batch)
    pieces: list[ScheduledBatch] = [[]]
    done = 0
    for item in batch:
        if pieces[-1] and len(pieces) < parts and done >= total * len(pieces) / parts:
            pieces.append([])
        pieces[-1].append(item)
        done += item[1]
    return pieces


class ParallelRunner(ModelRunner):
    """The runner of every rank of a tensor/pipeline-parallel job: ``execute`` on the driver,
    ``follow`` on the others."""

    def __init__(self, model, cache, device: torch.device, state: ParallelState, lora=None):
        super().__init__(model, cache, device, compile=False, lora=lora)
        self.state = state
        self.dtype = next(p for n, p in model.named_parameters() if not n.startswith("score.")).dtype
        self.output_width = (len(model.config.reward_attributes) if model.config.is_reward_model
                             else model.config.vocab_size)
        self.pending_zero: list[int] = []
        self.last_command = time.monotonic()
        self.closed = False

    # ------------------------------------------------------------------------------------ driver

    def zero_blocks(self, block_ids: list[int]) -> None:
        super().zero_blocks(block_ids)
        self.pending_zero += block_ids  # the workers zero theirs before the next step

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        prepared = [self.prepare(piece) for piece in split_batch(batch, self.state.pp_size)]
        micro_batches = [inputs for inputs, _, _ in prepared]
        self._command(("step", [m.to(torch.device("cpu")) for m in micro_batches], self.pending_zero))
        self.pending_zero = []
        outputs = self._collective(run_pipeline, self.model, self.cache, self.state, micro_batches, self.dtype,
                                   self.output_width, self.lora)
        samplers, sample_rows, prompt_rows, prompt_ranges = [], [], [], []
        for (_, seqs, ranges), logits in zip(prepared, outputs):
            samplers += seqs
            sample_rows.append(logits[0, :len(seqs)])
            prompt_rows.append(logits[0, len(seqs):])
            prompt_ranges += ranges
        return StepLogits(torch.cat(sample_rows), samplers, torch.cat(prompt_rows), prompt_ranges)

    def add_lora(self, request) -> None:
        """Every worker registers (and reads) the adapter the driver has just read and checked."""
        self._command(("lora_add", request))

    def remove_lora(self, lora_id: int) -> None:
        self._command(("lora_remove", lora_id))

    def keep_alive(self) -> None:
        """Called while the driver idles: a heartbeat keeps the workers' wait inside the timeout."""
        if time.monotonic() - self.last_command > KEEP_ALIVE_SECONDS:
            self._command(("heartbeat",))

    def close(self) -> None:
        """Stop every worker (once)."""
        if self.state.is_driver and not self.closed:
            self.closed = True
            self._command(("stop",))

    def _command(self, command: tuple) -> None:
        self.last_command = time.monotonic()
        self._collective(dist.broadcast_object_list, [command], src=0)

    # ------------------------------------------------------------------------------------ workers

    @torch.inference_mode()
    def follow(self) -> None:
        """Run the driver's steps until it says stop."""
        while True:
            box = [None]
            self._collective(dist.broadcast_object_list, box, src=0)
            command = box[0]
            if command[0] == "stop":
                return
            if command[0] == "step":
                _, micro_batches, zero = command
                if zero:
                    self.cache.zero_blocks(zero)
                self._collective(run_pipeline, self.model, self.cache, self.state,
                                 [m.to(self.device) for m in micro_batches], self.dtype, self.output_width, self.lora)
            elif command[0] == "lora_add":  # the driver read it: a failure here is this rank's (its filesystem)
                self._collective(self.lora.add, command[1])
            elif command[0] == "lora_remove":
                self.lora.remove(command[1])

    def _collective(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (RuntimeError, ConnectionError) as error:  # a peer died, hung past the timeout, or a bug
            log.critical("rank %d of a parallel job failed (%s); exiting so that the launcher stops every rank",
                         self.state.rank, error)
            logging.shutdown()
            os._exit(1)


def run_pipeline(model, cache, state: ParallelState, micro_batches: list[StepInputs], dtype: torch.dtype,
                 output_width: int, lora=None) -> list[torch.Tensor] | None:
    """This rank's part of one step; the driver gets fp32 logits [1, K, output_width] per micro-batch."""
    previous = state.global_rank(state.pp_rank - 1, state.tp_rank)
    following = state.global_rank(state.pp_rank + 1, state.tp_rank)
    sends, outputs = [], []
    for inputs in micro_batches:
        hidden = None
        if not state.is_first_stage:
            hidden = torch.empty(1, inputs.token_ids.shape[1], model.config.hidden_size, dtype=dtype,
                                 device=inputs.token_ids.device)
            dist.recv(hidden, src=previous)
        cache.metadata = inputs.metadata
        try:
            with lora_step(lora, inputs):
                out = model(inputs.token_ids, inputs.positions, cache=cache, logits_indices=inputs.logits_indices,
                            hidden_states=hidden)
        finally:
            cache.metadata = None
        if state.is_last_stage:
            outputs.append(out.float().contiguous())
        else:
            out = out.contiguous()
            sends.append((dist.isend(out, dst=following), out))  # keep ``out`` alive until sent
    for work, _ in sends:
        work.wait()
    if state.pp_size == 1:
        return outputs if state.is_driver else None
    if state.is_last_stage and state.tp_rank == 0:
        for out in outputs:
            dist.send(out, dst=0)
    if not state.is_driver:
        return None
    last = state.global_rank(state.pp_size - 1, 0)
    received = []
    for inputs in micro_batches:
        logits = torch.empty(1, len(inputs.logits_indices), output_width, dtype=torch.float32,
                             device=inputs.token_ids.device)
        dist.recv(logits, src=last)
        received.append(logits)
    return received
