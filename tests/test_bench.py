"""nemolite bench end to end on a tiny checkpoint (figures are not asserted: this machine is noisy)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_prints_every_figure_and_ratio(nemotron_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "nemolite", "bench", "--model", str(nemotron_dir),
                             "--workload", "decode-1", "--workload", "prefix-1000", "--dtype", "float32",
                             "--no-compile", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for text in ("tok/s", "GB/s", "TTFT", "ITL", "peak RSS", "nemolite / transformers", "lower (hit rate"):
        assert text in result.stdout, (text, result.stdout)
    rows = json.loads(out.read_text())
    decode = {row["backend"]: row for row in rows if row["workload"] == "decode-1"}
    assert set(decode) == {"nemolite", "transformers"}
    assert decode["nemolite"]["tokens"] == 128 and decode["transformers"]["tokens"] == 128
    prefix = next(row for row in rows if row["workload"] == "prefix-1000")
    assert prefix["engine"]["prefix_cache_hit_rate"] > 0
