"""nemolite's perplexity on GGUF files against llama.cpp's own, on the same tokens and the same windows.

    python benchmarks/gguf_perplexity.py demo-bf16.gguf demo-Q8_0.gguf ... \
        [--text FILE] [--ctx 512] [--llama-perplexity /work/build/llama/bin/llama-perplexity] \
        [--llama-python /work/venvs/llama/bin/python]

The text defaults to ``pydoc.render_doc(module, renderer=pydoc.plaintext)`` of the standard-library
modules ``json`` and ``textwrap``, concatenated (the Python that runs this script renders them), with the
object addresses pydoc prints (``<... object at 0x7f...>``, different in every process) written as 0x0.

The perplexity is llama.cpp's (tools/perplexity/perplexity.cpp of https://github.com/ggml-org/llama.cpp,
``perplexity()``): the text is tokenized once (with BOS), cut into ``len // ctx`` windows of ``ctx`` tokens,
the first token of each window replaced by BOS, and only the second half of each window is scored (each
token predicted with at least ctx/2 tokens of context). nemolite runs the GGUF file it loads (model dtype
"auto": bf16 for these files, or ``--dtype``) on exactly those windows. llama.cpp is run two ways, each
optional:

- ``--llama-python``: a Python with llama-cpp-python (``Llama(model_path, logits_all=True)``) evaluates the
  same token windows nemolite does; it also tokenizes the text, and the script checks that llama.cpp's
  tokens equal nemolite's;
- ``--llama-perplexity``: the ``llama-perplexity`` binary on the text file (``-c ctx -b ctx``), which
  tokenizes the text itself; its "Final estimate" is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
request = json.load(open(sys.argv[1]))
llm = Llama(model_path=request["model"], n_ctx=request["ctx"], n_batch=request["ctx"], logits_all=True,
            n_threads=request["threads"], verbose=False)
text_tokens = llm.tokenize(request["text"].encode("utf-8"), add_bos=True, special=False)
first, nll, count = request["ctx"] // 2, 0.0, 0
for window in request["windows"]:
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[:len(window)], dtype=np.float64)
    for pos in range(first, len(window) - 1):
        row = logits[pos]
        top = row.max()
        nll += top + np.log(np.exp(row - top).sum()) - row[window[pos + 1]]
        count += 1
json.dump({"nll": nll, "count": count, "tokens": text_tokens}, open(sys.argv[2], "w"))
"""


def default_text(modules=("json", "textwrap")) -> str:
    import importlib
    import pydoc

    text = "".join(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext) for name in modules)
    return re.sub(r" at 0x[0-9a-f]+", " at 0x0", text)


def windows(tokens: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    out = []
    for start in range(0, len(tokens) // ctx * ctx, ctx):
        window = list(tokens[start:start + ctx])
        if bos is not None:
            window[0] = bos
        out.append(window)
    return out


def nemolite_perplexity(file: Path, text: str, ctx: int, dtype: str, batch: int = 4, quantization: str | None = None):
    import torch

    from nemolite.checkpoint import load_checkpoint
    from nemolite.quant import parse_quantization

    model, tokenizer = load_checkpoint(file, dtype, torch.device("cpu"), quantization=parse_quantization(quantization))
    tokens = tokenizer.encode(text, add_bos=True)
    chunks = windows(tokens, ctx, tokenizer.bos_token_id)
    first, nll, count = ctx // 2, 0.0, 0
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(chunks), batch):
            ids = torch.tensor(chunks[i:i + batch])
            logits = model(ids).float()[:, first:-1]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           ids[:, first + 1:].reshape(-1), reduction="sum"))
            count += logits.shape[0] * logits.shape[1]
    seconds = time.perf_counter() - started
    return math.exp(nll / count), tokens, chunks, count, str(next(model.parameters()).dtype), seconds


def llama_python_perplexity(python: str, file: Path, text: str, chunks, ctx: int, threads: int):
    with tempfile.TemporaryDirectory() as scratch:
        request, answer, script = (Path(scratch) / name for name in ("request.json", "answer.json", "run.py"))
        request.write_text(json.dumps({"model": str(file), "ctx": ctx, "windows": chunks, "text": text,
                                       "threads": threads}))
        script.write_text(LLAMA_CPP_PYTHON)
        subprocess.run([python, str(script), str(request), str(answer)], check=True)
        result = json.loads(answer.read_text())
    return math.exp(result["nll"] / result["count"]), result["tokens"], result["count"]


def llama_perplexity_binary(binary: str, file: Path, text_file: Path, ctx: int, threads: int) -> float:
    log = text_file.with_name("llama-perplexity.log")
    with open(log, "w") as out:  # with the caller's stdin it loses its last lines (the final estimate)
        code = subprocess.run([binary, "-m", str(file), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
                               "-t", str(threads)], stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    output = log.read_text()
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if code or not match:
        raise RuntimeError(f"llama-perplexity failed:\n{output[-2000:]}")
    return float(match.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--text", type=Path, help="a UTF-8 text file (default: pydoc of json and textwrap)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--dtype", default="auto", help="nemolite's model dtype (default: auto, bf16 here)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", default=None,
                        help="also quantize nemolite's model at load (int8, int4 ...): its own quantization of a "
                             "float file, scored on the same windows")
    parser.add_argument("--llama-python", help="a Python with llama-cpp-python, e.g. /work/venvs/llama/bin/python")
    parser.add_argument("--llama-perplexity", help="the llama-perplexity binary")
    args = parser.parse_args(argv)
    text = args.text.read_text() if args.text else default_text()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        text_file = Path(scratch) / "text.txt"
        text_file.write_text(text)
        for file in args.files:
            ppl, tokens, chunks, scored, dtype, seconds = nemolite_perplexity(file, text, args.ctx, args.dtype,
                                                                              quantization=args.quantization)
            label = file.name + (f" --quantization {args.quantization}" if args.quantization else "")
            row = {"file": label, "tokens": len(tokens), "windows": len(chunks), "scored": scored,
                   "dtype": dtype, "nemolite": ppl, "nemolite_s": seconds}
            if args.llama_python:
                theirs, their_tokens, their_scored = llama_python_perplexity(args.llama_python, file, text, chunks,
                                                                             args.ctx, args.threads)
                assert their_scored == scored
                row.update(llama_cpp=theirs, same_tokens=their_tokens == tokens)
            if args.llama_perplexity:
                row["llama_perplexity"] = llama_perplexity_binary(args.llama_perplexity, file, text_file, args.ctx,
                                                                  args.threads)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    source = str(args.text) if args.text else "pydoc.render_doc(json) + pydoc.render_doc(textwrap), plaintext"
    print(f"\ntext: {source}; {rows[0]['tokens']} tokens, ctx {args.ctx}, {rows[0]['windows']} windows, "
          f"{rows[0]['scored']} tokens scored (second half of each window)\n")
    header = f"{'file':28} {'nemolite':>9} {'dtype':>15}"
    header += f" {'llama-cpp-py':>12} {'ratio':>7} {'tokens=':>7}" if args.llama_python else ""
    header += f" {'llama-perplexity':>16} {'ratio':>7}" if args.llama_perplexity else ""
    print(header)
    for row in rows:
        line = f"{row['file']:28} {row['nemolite']:9.4f} {row['dtype']:>15}"
        if "llama_cpp" in row:
            line += f" {row['llama_cpp']:12.4f} {row['nemolite'] / row['llama_cpp']:7.4f} {str(row['same_tokens']):>7}"
        if "llama_perplexity" in row:
            line += f" {row['llama_perplexity']:16.4f} {row['nemolite'] / row['llama_perplexity']:7.4f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
