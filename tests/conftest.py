"""Fixtures that build tiny checkpoints on the fly: random weights, tokenizers trained in-process."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Where nemolite runs in the tests; the transformers reference always runs on the CPU in fp32.
DEVICE = os.environ.get("NEMOLITE_TEST_DEVICE", "cpu")
# Quantized layers take the integer kernel up to a row count measured per machine (nemolite.quant.kernels);
# the tests fix it at the floor so that which path a prompt takes does not depend on the machine (also in
# the processes they start). tests/quant/test_kernels.py measures it for real.
os.environ.setdefault("NEMOLITE_QUANT_KERNEL_ROWS", "8")

WORDS = ("the model returns a value when the list is empty and the string holds one or more words "
         "python reads files from disk each line ends with a newline character numbers like 42 and 1024 "
         "são paulo café naïve 東京 ümlaut emoji 🙂 stays whole").split()

LLAMA31_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(num_lines)]


def write_sentencepiece(directory: Path, vocab_size: int = 320) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0,
        user_defined_symbols=["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"], minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))


def write_hf_tokenizer(directory: Path, vocab_size: int = 400, chat_template: str | None = LLAMA31_TEMPLATE) -> None:
    """A byte-level BPE tokenizer.json with Llama-3.1's special tokens and BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if chat_template:
        settings["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norm weights and biases, so a missed ``+ 1`` or bias shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def make_nemotron(directory: Path, *, tokenizer: bool = True, dtype: torch.dtype = torch.float32,
                  max_shard_size: str | None = None, **overrides) -> Path:
    from transformers import NemotronConfig, NemotronForCausalLM

    settings = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=2, eos_token_id=3)
    settings.update(overrides)
    torch.manual_seed(0)
    model = NemotronForCausalLM(NemotronConfig(**settings)).to(dtype).eval()
    randomize_norms(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer:
        write_sentencepiece(directory)
    return directory


def make_reward_model(directory: Path, num_labels: int = 9, **overrides) -> Path:
    """A random HF NemotronForSequenceClassification (the format ``nemolite convert`` writes a NeMo reward
    model in) with a SentencePiece tokenizer; nemolite's ATTRIBUTES name its nine outputs."""
    from transformers import NemotronConfig, NemotronForSequenceClassification

    settings = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=2, eos_token_id=3, pad_token_id=0, num_labels=num_labels)
    settings.update(overrides)
    torch.manual_seed(0)
    model = NemotronForSequenceClassification(NemotronConfig(**settings)).eval()
    randomize_norms(model)
    with torch.no_grad():  # outputs of order 1, like a trained head's, so that differences show
        model.score.weight.normal_(0.0, 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_sentencepiece(directory)
    return directory


def make_llama(directory: Path, *, tokenizer: bool = True, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rope_theta=500000.0, bos_token_id=0, eos_token_id=4,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    settings.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    randomize_norms(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer:
        write_hf_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def nemotron_dir(tmp_path_factory) -> Path:
    return make_nemotron(tmp_path_factory.mktemp("nemotron"))


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory) -> Path:
    return make_reward_model(tmp_path_factory.mktemp("reward_model"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def nemotron_llm(nemotron_dir):
    from nemolite import LLM

    return LLM(nemotron_dir, dtype="float32", device=DEVICE)


def run_nemo_writer(writer: Path, out: Path, sites: list[str], timeout: int = 900) -> Path:
    """Run a writer script under NeMo (``sites`` put first on its PYTHONPATH) into ``out``, beside a tokenizer
    and the input ids it computes NeMo's logits for; skip when NeMo is not importable (exit 77)."""
    write_sentencepiece(out)
    torch.save(torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(7)), out / "input_ids.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*sites, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-W", "ignore", str(writer), str(out), str(out / "tokenizer.model")],
                            env=env, capture_output=True, text=True, timeout=timeout, cwd=out)
    if result.returncode == 77:
        pytest.skip(f"NeMo is not importable: {result.stdout.strip()[-300:]}")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (tests/browser.py), one per test module: Playwright's sync API keeps an event loop
    of its own, which must not outlive the module into tests that run asyncio."""
    from tests.browser import chromium

    with chromium() as launched:
        yield launched
