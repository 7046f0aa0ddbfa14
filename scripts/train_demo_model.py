"""Train nemolite's bundled demo model: a tiny Nemotron-4 on the Python standard library's docs.

Every machine with CPython has this text offline: the docstrings of the standard library,
read with ``inspect`` (what ``pydoc`` shows). A SentencePiece tokenizer is trained on it
in-process, then a Nemotron-4-architecture decoder (LayerNorm1P, GQA, squared-ReLU MLP,
partial RoPE) is trained with nemolite's own model code. A share of the documents is
written in the Nemotron-4 chat format ("What does X do?" -> the first paragraph of its
docstring) so that ``nemolite chat`` answers in kind.

    python scripts/train_demo_model.py --out nemolite/demo/model   # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nemolite.checkpoint.hf import save_hf_model  # noqa: E402
from nemolite.config import config_from_hf  # noqa: E402
from nemolite.model import CausalLM  # noqa: E402

# Modules whose import has side effects (opening a browser, printing, starting Tk) or that are huge test suites.
SKIP_MODULES = {"antigravity", "this", "idlelib", "test", "tkinter", "turtle", "turtledemo", "lib2to3",
                "ensurepip", "venv", "pydoc_data", "__main__", "__phello__", "_pyrepl", "xxsubtype", "msilib"}
CHAT_SHARE = 0.2
HEADER_SHARE = 0.5  # plain documents that start with "name(signature)"; the rest start with the docstring itself
QUESTION_FORMS = ["What does {name} do?", "Explain {name}.", "What is {name}?", "Tell me about {name}.",
                  "How do I use {name}?"]


def stdlib_module_names() -> list[str]:
    names = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        names.add(name)
        module = _quiet_import(name)
        if module is not None and hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, prefix=name + "."):
                parts = set(info.name.split("."))
                if not parts & SKIP_MODULES and not any(p.startswith("_") or p.startswith("test") for p in parts):
                    names.add(info.name)
    return sorted(names)


def _quiet_import(name: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any import failure just drops that module
            return None


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def collect_documents() -> list[tuple[str, str, str]]:
    """(qualified name, signature, docstring) for every documented public stdlib object, deduplicated."""
    seen, documents = set(), []

    def add(qualified: str, signature: str, doc: str | None) -> None:
        doc = (doc or "").strip()
        if len(doc) < 40 or doc in seen:
            return
        seen.add(doc)
        documents.append((qualified, signature, doc))

    topics = _quiet_import("pydoc_data.topics")  # the language reference pages that `help("if")` shows
    for topic in sorted(getattr(topics, "topics", {})):
        add(topic, "", topics.topics[topic])
    for module_name in stdlib_module_names():
        module = _quiet_import(module_name)
        if module is None:
            continue
        add(module_name, "", inspect.getdoc(module))
        for attr in sorted(vars(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isclass(obj):
                add(f"{module_name}.{attr}", _signature(obj), inspect.getdoc(obj))
                for method_name in sorted(vars(obj)):
                    method = vars(obj)[method_name]
                    if not method_name.startswith("_") and callable(method):
                        add(f"{module_name}.{attr}.{method_name}", _signature(method), inspect.getdoc(method))
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                add(f"{module_name}.{attr}", _signature(obj), inspect.getdoc(obj))
    return documents


def render(document: tuple[str, str, str], rng: random.Random) -> str:
    name, signature, doc = document
    if rng.random() < CHAT_SHARE:
        answer = doc.split("\n\n")[0].strip()
        question = rng.choice(QUESTION_FORMS).format(name=name)
        # An empty system prompt, as the Nemotron-4 model card's examples send it: a fixed system
        # sentence would be memorised and leak into every completion.
        return (f"<extra_id_0>System\n\n<extra_id_1>User\n{question}\n"
                f"<extra_id_1>Assistant\n{answer}\n<extra_id_1>")
    return f"{name}{signature}\n{doc}\n" if rng.random() < HEADER_SHARE else f"{doc}\n"


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> "sentencepiece.SentencePieceProcessor":
    import sentencepiece as spm

    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        max_sentence_length=16384, num_threads=os.cpu_count() or 1, minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def hf_config(args, vocab_size: int) -> dict:
    return {
        "architectures": ["NemotronForCausalLM"], "model_type": "nemotron", "vocab_size": vocab_size,
        "hidden_size": args.hidden, "intermediate_size": args.hidden * 4, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
        "hidden_act": "relu2", "max_position_embeddings": args.max_positions, "norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "dtype": args.save_dtype,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("nemolite/demo/model"))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--max-minutes", type=float, default=28.0,
                        help="stop early (and say so in the card) if training would pass this")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    documents = collect_documents()
    texts = [render(document, rng) for document in documents]
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB of text", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sp = train_tokenizer(texts, args.out, args.vocab)
    stream = []
    for text in texts:
        stream += [sp.bos_id(), *sp.encode(text), sp.eos_id()]
    tokens = torch.tensor(stream, dtype=torch.long)
    split = int(len(tokens) * 0.98)
    train_tokens, valid_tokens = tokens[:split], tokens[split:]
    print(f"tokens: {len(train_tokens)} train, {len(valid_tokens)} validation "
          f"({time.time() - started:.0f} s so far)", flush=True)

    config_dict = hf_config(args, sp.get_piece_size())
    model = CausalLM(config_from_hf(config_dict))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
            elif "bias" in name or "norm" in name:
                param.zero_()  # LayerNorm1P stores weight - 1
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def learning_rate(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def batch(source: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(source) - args.seq_len - 1, (args.batch,), generator=generator)
        window = torch.stack([source[s:s + args.seq_len + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    generator = torch.Generator().manual_seed(args.seed)
    train_started, step, loss_ema = time.time(), 0, None
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        loss = loss_of(*batch(train_tokens, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - train_started
            print(f"step {step:5d}  loss {loss_ema:.3f}  lr {learning_rate(step):.2e}  "
                  f"{elapsed / (step + 1):.2f} s/step", flush=True)
        if (time.time() - started) / 60 > args.max_minutes:
            print(f"time budget of {args.max_minutes} min reached at step {step}", flush=True)
            break

    model.eval()
    valid_generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        valid_loss = sum(loss_of(*batch(valid_tokens, valid_generator)).item() for _ in range(20)) / 20
    save_dtype = torch.bfloat16 if args.save_dtype == "bfloat16" else torch.float32
    save_hf_model(model, args.out, config_dict, dtype=save_dtype)
    (args.out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the package ships it readable
    (args.out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": args.max_positions}, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 3}) + "\n")
    minutes = (time.time() - started) / 60
    weights_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    card = f"""# nemolite demo model

A {num_params / 1e6:.1f} M-parameter Nemotron-4-architecture decoder (LayerNorm1P, GQA
{args.heads} query / {args.kv_heads} KV heads, squared-ReLU MLP, partial RoPE 0.5), trained by
`scripts/train_demo_model.py` so that nemolite works out of the box with no download.
It writes Python-documentation-flavoured English; it knows nothing else.

- Data: docstrings of the Python {sys.version.split()[0]} standard library read with `inspect`
  ({len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB; {int(CHAT_SHARE * 100)}% rendered in
  the Nemotron-4 chat format as "What does X do?" -> first paragraph of X's docstring).
- Tokenizer: SentencePiece BPE, {sp.get_piece_size()} pieces, byte fallback, trained on the same text;
  `<extra_id_0..2>` are single pieces; `<s>`=2, `</s>`=3.
- Shape: hidden {args.hidden}, {args.layers} layers, FFN {args.hidden * 4}, head_dim {args.hidden // args.heads},
  vocab {sp.get_piece_size()}, context {args.max_positions} (trained on {args.seq_len}-token windows).
- Training: {step + 1} steps of {args.batch} x {args.seq_len} tokens, AdamW lr {args.lr} cosine, bf16 autocast,
  seed {args.seed}, {minutes:.1f} min on {torch.get_num_threads()} CPU threads.
- Final training loss (EMA) {loss_ema:.3f}; validation loss {valid_loss:.3f} (perplexity {math.exp(valid_loss):.1f}).
- Weights: {weights_mb:.1f} MB of {args.save_dtype} safetensors.
"""
    (args.out / "README.md").write_text(card)
    print(card, flush=True)


if __name__ == "__main__":
    main()
