"""CPU kernels for decode on x86 CPUs with AVX2 and FMA (AVX512 and AVX512-BF16 forms where the CPU
has them): paged decode attention, a bf16 GEMV, a row sampler, and the quantized linears.

``decode_attention`` reads each sequence's keys and values where they sit in the paged cache (fp32
sums): decode attention with no gather and no copy, 2-2.5x faster than gathering the context and
running batched matmuls over it (B=16, 500 positions, fp32, AVX512); on a 2-core AVX2 CPU (AMD EPYC
Zen 3) 70 instead of 405 us for one bf16 sequence of 128 positions, 16 heads over 8 KV heads.
Every engine on the CPU uses it (``load()``): built once with the system compiler (~1 min, cached by
torch in ~/.cache/torch_extensions, then ~0.1 s to load); without a compiler or such a CPU the
engine gathers and uses matmuls instead.

At batch 1 a linear layer is a GEMV bound by reading the weight. oneDNN's bf16 GEMV streams
weights at ~16-20 GB/s on the 2-core machine we test on; ``gemv_bf16`` (one sequential pass per
row, four independent ``vdpbf16ps`` accumulators) streams them at ~27-29 GB/s, about what
``Tensor.sum`` reaches there. Without AVX512-BF16 it widens bf16 to fp32 by a shift and uses FMAs:
37 GB/s from L3 and 15 GB/s from DRAM against oneDNN's 16 and 10 on the AVX2 CPU above. Batch-1
linears use it only after ``enable()`` (the engine's ``compile`` mode). All are torch custom ops, so
compiled graphs call them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock file alone
    fcntl = None

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("cpu_kernels.cpp", "quant_kernels.cpp", "lora_kernels.cpp")  # bf16 GEMV, attention, sampler; quantized
# linears; LoRA rows of many adapters

_loaded: bool | None = None  # None: not tried yet
_load_lock = threading.Lock()
_enabled = False
_rows_kernel = False


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def load() -> bool:
    """Build (or load the cached build of) the kernels; True when ``torch.ops.nemolite`` has them.
    Tried once a process; NEMOLITE_CPU_KERNELS=0 turns them off."""
    global _loaded
    with _load_lock:
        if _loaded is None:
            _loaded = _build()
        return _loaded


def extension_name() -> str:
    """The torch extension's name: our kernels' version and this CPU's flags (a cache shared across CPUs
    stays right)."""
    return f"nemolite_cpu_kernels_v45_{hashlib.sha256(_cpu_flags().encode()).hexdigest()[:10]}"


def _build() -> bool:
    """Compile the extension for this CPU (-march=native: each file uses the instructions it finds, e.g.
    AVX512-BF16 or AVX2/VNNI); the build is cached per source, flags and CPU feature set."""
    if os.environ.get("NEMOLITE_CPU_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        from torch.utils.cpp_extension import load as load_extension

        log.info("loading the CPU kernels (the first time builds them with the C++ compiler, ~1 min)")
        name = extension_name()
        with _build_guard(name):
            load_extension(name, [str(CSRC / source) for source in SOURCES],
                           is_python_module=False, extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no headers: gathered attention and oneDNN
        log.warning("CPU kernels unavailable (%s); decode attention gathers the context instead", error)
        return False
    if hasattr(torch.ops.nemolite, "gemv_bf16"):
        torch.library.register_fake("nemolite::gemv_bf16")(lambda x, weight: x.new_empty(weight.shape[0]))
        if hasattr(torch.ops.nemolite, "linear_bf16"):
            torch.library.register_fake("nemolite::linear_bf16")(
                lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]))
        torch.library.register_fake("nemolite::decode_attention")(
            lambda q, k_cache, v_cache, slots, lengths, new_k, new_v, scale: torch.empty_like(q))
    if hasattr(torch.ops.nemolite, "linear_int8"):  # what compiled graphs see of the quantized linears
        torch.library.register_fake("nemolite::linear_int8")(
            lambda x, qweight, scales, group_size, reference=False: x.new_empty(x.shape[0], qweight.shape[0]))
        torch.library.register_fake("nemolite::linear_int4")(
            lambda x, qweight, scales, mins, group_size, reference=False: x.new_empty(x.shape[0], qweight.shape[0]))
        torch.library.register_fake("nemolite::dequantize")(
            lambda qweight, scales, mins, group_size, int4, to_bf16: qweight.new_empty(
                qweight.shape[0], qweight.shape[1] * (2 if int4 else 1),
                dtype=torch.bfloat16 if to_bf16 else torch.float32))
    if hasattr(torch.ops.nemolite, "linear_int4_rows8"):
        torch.library.register_fake("nemolite::linear_int4_rows8")(
            lambda x, qweight, scales, mins, group_size: x.new_empty(x.shape[0], qweight.shape[0]))
    if hasattr(torch.ops.nemolite, "lora_bgmv"):
        torch.library.register_fake("nemolite::lora_bgmv")(
            lambda x, slots, lora_a, lora_bt, parts: x.new_empty(x.shape[0], lora_bt.shape[2]))
    if hasattr(torch.ops.nemolite, "linear_int8_rows8"):
        torch.library.register_fake("nemolite::linear_int8_rows8")(
            lambda x, qweight, scales, group_size: x.new_empty(x.shape[0], qweight.shape[0]))
    return True


@contextlib.contextmanager
def _build_guard(name: str):
    """One build of the extension at a time across processes, under an flock the OS releases when its
    holder dies. torch's own guard is a ``lock`` file in the build directory that a build killed midway
    (Ctrl-C on the first ``nemolite serve``) leaves behind, and every later start then waits for it
    forever; holding the flock proves no build of ours is running, so such a file is stale and goes."""
    from torch.utils.cpp_extension import _get_build_directory

    if fcntl is None:
        yield
        return
    directory = _get_build_directory(name, verbose=False)
    with open(os.path.join(directory, "nemolite.flock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            log.warning("removing %s, left by a kernel build that did not finish", stale)
            os.remove(stale)
        yield


def loaded() -> bool:
    return bool(_loaded)


def has(op: str) -> bool:
    """True when the extension (built for this CPU) has ``torch.ops.nemolite.<op>``."""
    return (_loaded if _loaded is not None else load()) and hasattr(torch.ops.nemolite, op)  # no lock once loaded


def enable() -> bool:
    """``load()``, and from then on batch-1 bf16 linears use the GEMV kernel; True when they do."""
    global _enabled, _rows_kernel
    _enabled = has("gemv_bf16")
    _rows_kernel = has("linear_bf16")  # built only where the CPU lacks AVX512-BF16
    return _enabled


def enabled() -> bool:
    return _enabled


# oneDNN picks its blocked weight layout for a batch size; 16 serves batches 1 to 512 (see pack_weight).
PACK_BATCH_HINT = 16


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A CPU linear weight [N, K] copied into oneDNN's blocked layout, for ``packed_linear``; None where
    oneDNN cannot take it (not the CPU, fp16, bf16 without hardware support, a torch without oneDNN).

    Unpacked, every F.linear re-lays the weight out before its GEMM; prepacked once, as vLLM's CPU
    backend and inductor's freezing do, the demo model's 37 linears of a step took (2-core AMD EPYC,
    one thread) 1.62 instead of 1.94 ms at batch 1 and 2.99 instead of 4.86 ms at batch 16 in fp32,
    1.78 instead of 2.39 at batch 16 in bf16. oneDNN computes each row the same way at any batch size
    there (checked for 1 to 600 rows, fp32 and bf16), so a sequence's logits do not depend on its batch."""
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        if not torch.backends.mkldnn.is_available() or (
                weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        weight = weight.detach().contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        probe = torch.ones(1, weight.shape[1], dtype=weight.dtype)  # a build that packs but cannot run it
        if not torch.allclose(packed_linear(probe, packed, None).float(), F.linear(probe, weight).float(),
                              rtol=1e-2, atol=1e-2):
            return None
        return packed
    except (RuntimeError, AttributeError) as error:  # an older torch or a oneDNN build without this case
        log.debug("oneDNN weight prepacking unavailable: %s", error)
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the weight from ``pack_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# bf16 linears on a CPU without native bf16 GEMMs (no AVX512-BF16/AMX: oneDNN emulates them, 3-4x slower
# than the kernel below): up to this many rows the extension's ``linear_bf16`` (each weight row read once,
# every output summed as the GEMV sums it), above it an fp32 GEMM on the weight widened for the call,
# which is compute-bound there (4096 x 1024 on the 2-core AVX2 machine: 32 rows 4.6 ms against oneDNN's
# bf16 15.9; 128 rows 24 ms kernel, 21 fp32, 85 oneDNN bf16; 512 rows 99, 43, 251).
BF16_ROWS_KERNEL_MAX = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``; for bf16 on the CPU when enabled, through the GEMV kernel for one row and, where the
    CPU has no native bf16 GEMM, the rows kernel or an fp32 GEMM for more."""
    if (_enabled and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.shape[1] % 32 == 0 and weight.is_contiguous()):
        rows = x.shape[:-1].numel()
        if rows == 1:
            out = torch.ops.nemolite.gemv_bf16(x.reshape(-1).contiguous(), weight)
        elif _rows_kernel and rows <= BF16_ROWS_KERNEL_MAX:
            out = torch.ops.nemolite.linear_bf16(x.reshape(rows, -1), weight)
        elif _rows_kernel:
            out = F.linear(x.reshape(rows, -1).float(), weight.float()).to(torch.bfloat16)
        else:
            return F.linear(x, weight, bias)
        out = out.reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)
