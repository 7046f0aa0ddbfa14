"""nemolite bench end to end on a tiny checkpoint (figures are not asserted: this machine is noisy)."""

from __future__ import annotations

import json
import subprocess
import sys

from nemolite.bench import _peers, weight_bits


def test_bench_prints_every_figure_and_ratio(nemotron_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "nemolite", "bench", "--model", str(nemotron_dir),
                             "--workload", "decode-1", "--workload", "prefix-1000", "--dtype", "float32",
                             "--no-compile", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for text in ("tok/s", "decode", "GB/s", "TTFT", "ITL", "peak RSS", "nemolite / transformers", "x end to end",
                 "lower (hit rate"):
        assert text in result.stdout, (text, result.stdout)
    rows = json.loads(out.read_text())
    decode = {row["backend"]: row for row in rows if row["workload"] == "decode-1"}
    assert set(decode) == {"nemolite", "transformers"}
    assert decode["nemolite"]["tokens"] == 128 and decode["transformers"]["tokens"] == 128
    for row in decode.values():  # the decode rate leaves the prefill out, so it is the higher one
        assert row["decode_tokens_per_s"] > row["tokens_per_s"] > 0
    prefix = next(row for row in rows if row["workload"] == "prefix-1000")
    assert prefix["engine"]["prefix_cache_hit_rate"] > 0


def test_ratios_pair_rows_of_the_same_width():
    labels = ["nemolite", "nemolite int8", "nemolite int4-g128-head", "llama.cpp BF16", "llama.cpp Q8_0",
              "llama.cpp Q4_0", "llama.cpp Q4_K_M", "llama.cpp F32", "transformers"]
    assert [weight_bits(label) for label in labels] == [16, 8, 4, 16, 8, 4, 4, None, None]
    pairs = _peers(labels)
    assert ("nemolite", "llama.cpp BF16") in pairs and ("nemolite int8", "llama.cpp Q8_0") in pairs
    assert ("nemolite int4-g128-head", "llama.cpp Q4_0") in pairs and ("nemolite int4-g128-head", "llama.cpp Q4_K_M") in pairs
    assert ("nemolite", "llama.cpp Q4_0") not in pairs and ("nemolite int8", "llama.cpp BF16") not in pairs
    # a peer of no named width is set beside every nemolite row
    assert {ours for ours, other in pairs if other == "transformers"} == {"nemolite", "nemolite int8",
                                                                          "nemolite int4-g128-head"}
