"""How many KV blocks the engine allocates: ``--kv-cache-gb``, ``--kv-cache-fraction`` or a default."""

from __future__ import annotations

import torch

from nemolite.config import ModelConfig
from nemolite.engine.kv_cache import PagedKVCache
from nemolite.errors import NemoliteError

DEFAULT_CPU_KV_BYTES = 2e9  # the CPU default, as vLLM's VLLM_CPU_KVCACHE_SPACE; --kv-cache-gb overrides it


def num_kv_blocks(local_config: ModelConfig, max_position_embeddings: int, block_size: int, max_num_seqs: int,
                  dtype: torch.dtype, device: torch.device, kv_cache_gb: float | None,
                  kv_cache_fraction: float | None) -> int:
    """Blocks for this rank's layers (``local_config``). Default: room for ``max_num_seqs`` full contexts,
    within a quarter of free memory (and DEFAULT_CPU_KV_BYTES on the CPU)."""
    per_block = PagedKVCache.bytes_per_block(local_config, block_size, dtype)
    if per_block == 0:  # no attention layer at all: blocks cost nothing
        return max_num_seqs * -(-max_position_embeddings // block_size)
    if kv_cache_gb is not None and kv_cache_fraction is not None:
        raise NemoliteError("give --kv-cache-gb or --kv-cache-fraction, not both")
    if kv_cache_fraction is not None:
        if not 0 < kv_cache_fraction <= 0.95:
            raise NemoliteError(f"--kv-cache-fraction must be in (0, 0.95], got {kv_cache_fraction}")
        budget = kv_cache_fraction * free_memory(device)
    elif kv_cache_gb is not None:
        budget = kv_cache_gb * 1e9
    else:
        wanted = max_num_seqs * max_position_embeddings * per_block / block_size
        budget = min(wanted, 0.25 * free_memory(device),
                     float("inf") if device.type == "cuda" else DEFAULT_CPU_KV_BYTES)
    num_blocks = int(budget // per_block)
    if num_blocks < 1:
        raise NemoliteError(f"a KV cache of {budget / 1e9:.3f} GB holds no block of {per_block} bytes; "
                            "raise --kv-cache-gb")
    return num_blocks


def free_memory(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4e9
