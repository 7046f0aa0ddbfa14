"""Peak resident memory of each rank at tensor-parallel size N versus one process, same checkpoint.

Writes a random-weight Nemotron-4-style checkpoint (default ~2.1 GB in fp32, large enough that
weights dominate the ~0.3 GB every Python + torch process costs), then loads it and generates a
few tokens once in one process and once under torchrun with --tensor-parallel-size N, and prints
each process's peak RSS (getrusage ru_maxrss) and the ratio of the largest rank to the single one.

    python benchmarks/parallel_memory.py [--tp 2] [--hidden 2048 --layers 8] [--dir /tmp/nemolite-tp-mem]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_checkpoint(directory: Path, hidden: int, layers: int) -> None:
    from nemolite.checkpoint.hf import save_hf_model
    from nemolite.config import config_from_hf
    from nemolite.model import CausalLM

    hf_config = {"architectures": ["NemotronForCausalLM"], "model_type": "nemotron", "vocab_size": 32000,
                 "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                 "num_attention_heads": hidden // 128, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 4096, "partial_rotary_factor": 0.5, "bos_token_id": 2,
                 "eos_token_id": 3, "tie_word_embeddings": False, "torch_dtype": "float32"}
    torch.manual_seed(0)
    model = CausalLM(config_from_hf(hf_config))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    save_hf_model(model, directory, hf_config)
    from tests.conftest import write_sentencepiece

    write_sentencepiece(directory)


def rank_main(model: str, tp: int) -> None:
    from nemolite import LLM, SamplingParams

    llm = LLM(model, dtype="float32", device="cpu", kv_cache_gb=0.05, tensor_parallel_size=tp)
    llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(max_tokens=8), use_tqdm=False)
    llm.engine.close()
    print(json.dumps({"rank": 0, "peak_rss_gb": peak_rss_gb()}), flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def report_worker_peak_at_exit() -> None:
    """Workers leave LLM() through SystemExit once rank 0 is done; they report their peak on the way out."""
    import atexit

    rank = int(os.environ.get("RANK", "0"))
    if rank:
        atexit.register(lambda: print(json.dumps({"rank": rank, "peak_rss_gb": peak_rss_gb()}), flush=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nemolite-tp-mem"))
    parser.add_argument("--rank-main", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        report_worker_peak_at_exit()
        rank_main(args.rank_main, args.tp)
        return
    if not (args.dir / "config.json").is_file():
        write_checkpoint(args.dir, args.hidden, args.layers)
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 1e9
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    me = [str(Path(__file__).resolve()), "--rank-main", str(args.dir)]
    single = subprocess.run([sys.executable, *me, "--tp", "1"], env=env, capture_output=True, text=True, check=True)
    parallel = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.tp),
                               "--master-port", "29577", *me, "--tp", str(args.tp)],
                              env=env, capture_output=True, text=True, check=True)
    single_peak = json.loads(single.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    ranks = sorted((json.loads(line) for line in parallel.stdout.splitlines() if line.startswith("{")),
                   key=lambda report: report["rank"])
    print(f"checkpoint: {size:.2f} GB fp32 ({args.dir})")
    print(f"one process: peak RSS {single_peak:.2f} GB")
    for report in ranks:
        print(f"TP {args.tp} rank {report['rank']}: peak RSS {report['peak_rss_gb']:.2f} GB "
              f"({report['peak_rss_gb'] / single_peak:.2f} x one process)")
    print(f"largest rank / one process: {max(r['peak_rss_gb'] for r in ranks) / single_peak:.2f}")


if __name__ == "__main__":
    main()
