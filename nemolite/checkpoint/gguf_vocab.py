"""The tokenizer of a GGUF file, rebuilt from its ``tokenizer.ggml.*`` metadata.

GGUF keys: gguf-py/gguf/constants.py (``Keys.Tokenizer``) and docs/gguf.md of
https://github.com/ggml-org/ggml. ``tokenizer.ggml.model``:

- ``llama`` (SentencePiece): pieces, scores and token types are written back into a SentencePiece
  ModelProto (field numbers of sentencepiece's src/sentencepiece_model.proto,
  https://github.com/google/sentencepiece) as a BPE model. llama.cpp's SPM tokenizer
  (src/llama-vocab.cpp, ``llm_tokenizer_spm``) merges the pair whose merged piece scores highest,
  which is SentencePiece's BPE encoding; no normalisation, a leading "▁" unless
  ``tokenizer.ggml.add_space_prefix`` is false, byte fallback through the ``<0xNN>`` byte pieces.
- ``gpt2`` (byte-level BPE): vocabulary and merges into a ``tokenizers`` BPE, with the pre-tokenizer
  that ``tokenizer.ggml.pre`` names (the regexes of llama.cpp's llama-vocab.cpp for those names).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from nemolite.errors import NemoliteError

# llama.cpp's token types equal SentencePiece's piece types (1 normal ... 6 byte); 0 (undefined) is normal.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SP_BPE = 2

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt2": GPT2_SPLIT, "default": GPT2_SPLIT, "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _int(number: int, value: int) -> bytes:
    return _field(number, 0, _varint(int(value)))


def _bytes(number: int, value: bytes) -> bytes:
    return _field(number, 2, _varint(len(value)) + value)


def sentencepiece_proto(tokens: list[str], scores: list[float], types: list[int], *, unk_id: int,
                        bos_id: int, eos_id: int, pad_id: int, add_space_prefix: bool) -> bytes:
    """A serialized SentencePiece ModelProto (BPE) holding these pieces."""
    pieces = []
    for piece, score, kind in zip(tokens, scores, types):
        kind = NORMAL if kind not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else kind
        pieces.append(_bytes(1, _bytes(1, piece.encode("utf-8")) + _field(2, 5, struct.pack("<f", score))
                             + _int(3, kind)))
    byte_fallback = BYTE in types
    trainer = (_int(3, SP_BPE) + _int(4, len(tokens)) + _int(35, byte_fallback) + _int(40, unk_id)
               + _int(41, bos_id) + _int(42, eos_id) + _int(43, pad_id))
    normalizer = _bytes(1, b"identity") + _int(3, add_space_prefix) + _int(4, False) + _int(5, True)
    return b"".join(pieces) + _bytes(2, trainer) + _bytes(3, normalizer)


def gpt2_tokenizer_json(tokens: list[str], types: list[int], merges: list[str], pre: str) -> str:
    """A tokenizers ``tokenizer.json`` for a GGUF ``gpt2`` vocabulary."""
    if pre not in PRE_TOKENIZERS:
        raise NemoliteError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; nemolite knows "
                            f"{', '.join(sorted(PRE_TOKENIZERS))}")
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": kind == CONTROL}
               for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRE_TOKENIZERS[pre]}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in ("llama-bpe", "llama3"),
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)},
    })


def tokenizer_from_gguf(meta: dict, architecture: str):
    """nemolite's Tokenizer from GGUF metadata (``meta``: key → value)."""
    from nemolite.tokenizer import Tokenizer

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise NemoliteError("the GGUF file holds no tokenizer (no tokenizer.ggml.model/tokens); pass tokenizer=DIR")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot", "eom", "unknown", "padding")}
    eos = [ids[key] for key in ("eos", "eot", "eom") if ids[key] is not None]
    eos = list(dict.fromkeys(eos))
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    with tempfile.TemporaryDirectory(prefix="nemolite-gguf-vocab-") as scratch:
        if model == "llama":
            unk = ids["unknown"] if ids["unknown"] is not None else next(
                (i for i, kind in enumerate(types) if kind == UNKNOWN), None)
            if unk is None:
                raise NemoliteError("the GGUF SentencePiece vocabulary has no unknown token")
            types[unk] = UNKNOWN
            scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
            proto = sentencepiece_proto(
                tokens, scores, types, unk_id=unk, bos_id=_or(ids["bos"]), eos_id=_or(ids["eos"]),
                pad_id=_or(ids["padding"]) if ids["padding"] not in (unk,) else -1,
                add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
            file, kind = Path(scratch) / "tokenizer.model", "sentencepiece"
            file.write_bytes(proto)
            add_bos = True if add_bos is None else bool(add_bos)
        elif model == "gpt2":
            merges = meta.get("tokenizer.ggml.merges") or []
            file, kind = Path(scratch) / "tokenizer.json", "hf"
            file.write_text(gpt2_tokenizer_json(tokens, types, merges, meta.get("tokenizer.ggml.pre") or "default"))
            add_bos = False if add_bos is None else bool(add_bos)
        else:
            raise NemoliteError(f"GGUF tokenizer model {model!r} is not supported (nemolite reads 'llama' "
                                "SentencePiece and 'gpt2' byte-level BPE vocabularies); pass tokenizer=DIR")
        pad = tokens[ids["padding"]] if ids["padding"] is not None and 0 <= ids["padding"] < len(tokens) else None
        return Tokenizer.from_model_file(
            file, kind, model_type=architecture, bos_token_id=ids["bos"], eos_token_ids=eos, add_bos=add_bos,
            chat_template=meta.get("tokenizer.chat_template"), pad_token=pad)


def _or(value: int | None) -> int:
    return -1 if value is None else int(value)
