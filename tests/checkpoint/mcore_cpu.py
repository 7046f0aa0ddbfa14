"""Shared by the megatron-core writer scripts: run megatron-core's save path on a CPU-only machine."""

import torch
import torch.distributed as dist


def megatron_on_cpu() -> None:
    """One-rank gloo group; without a GPU, CPU stand-ins for the CUDA calls megatron's writer makes
    (it synchronises and places a flag tensor on the current device)."""
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: "cpu"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
