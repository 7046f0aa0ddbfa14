"""Achieved GB/s of weight bytes of the linear kernels on the shapes of the 204 M bench checkpoint.

    python benchmarks/quant_kernels.py [--rows 1,16] [--threads 2]

For each [N, K] weight and M activation rows: bf16 through oneDNN's prepacked weight (what eager decode
runs), nemolite's int8 and int4 kernels (nemolite/csrc/quant_kernels.cpp), torch's own
``_weight_int8pack_mm`` and, for reference, ``Tensor.sum`` over 1 GiB (what the memory delivers).
Medians of interleaved repeats; the machine is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemolite.model import cpu_kernels
from nemolite.quant import quantize_weight

SHAPES = [(1024, 1024), (512, 1024), (4096, 1024), (1024, 4096), (32000, 1024)]  # q/o, k/v, up, down, head


def median_seconds(function, repeat: int) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernels.has("linear_int4"):
        raise SystemExit("the quantized kernels did not build here")
    ops = torch.ops.nemolite
    big = torch.ones(1 << 28)  # 1 GiB fp32
    seconds = median_seconds(lambda: big.sum(), 10)
    print(f"Tensor.sum over 1 GiB: {big.numel() * 4 / seconds / 1e9:.1f} GB/s ({args.threads} threads)")
    del big
    for rows in (int(r) for r in args.rows.split(",")):
        for n, k in SHAPES:
            weight = torch.randn(n, k) * 0.02
            x = torch.randn(rows, k).bfloat16()
            cells = []
            packed = cpu_kernels.pack_weight(weight.bfloat16())
            plain = weight.bfloat16()
            bf16 = (lambda: cpu_kernels.packed_linear(x, packed, None)) if packed is not None else \
                (lambda: torch.nn.functional.linear(x, plain))
            t = median_seconds(bf16, args.repeat)
            cells.append(f"bf16 {n * k * 2 / t / 1e9:5.1f}")
            for method, group in (("int8", None), ("int4", 32), ("int4", 128)):
                layer = quantize_weight(weight, method, group)
                if method == "int8":
                    run = lambda layer=layer: ops.linear_int8(x, layer.qweight, layer.scales, layer.group_size)
                else:
                    run = lambda layer=layer: ops.linear_int4(x, layer.qweight, layer.scales, layer.mins, layer.group_size)
                t = median_seconds(run, args.repeat)
                cells.append(f"{method}{'' if group is None else f'-g{group}'} {layer.weight_bytes / t / 1e9:5.1f}")
            q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            scales = torch.rand(n).bfloat16()
            t = median_seconds(lambda: torch._weight_int8pack_mm(x, q8, scales), args.repeat)
            cells.append(f"torch int8pack {n * k / t / 1e9:5.1f}")
            print(f"M={rows:<3} [{n:>5}, {k:>4}]  GB/s: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
