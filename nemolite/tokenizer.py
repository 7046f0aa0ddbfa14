"""Tokenizers of the Nemotron family: HF ``tokenizer.json`` or SentencePiece ``tokenizer.model``.

Also the BOS rule, chat templates (the Nemotron-4 instruct format, or the checkpoint's own
jinja template) and a streaming decoder that never splits a multi-byte character.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from nemolite.errors import NemoliteError
from nemolite.json_body import valid_unicode

NEMOTRON_STOP = "<extra_id_1>"
_MARKER = re.compile(r"<[^<>\s]+>")
ROLES = ("system", "user", "assistant", "tool")


class Tokenizer:
    def __init__(self, backend: "_Backend", *, bos_token_id: int | None, eos_token_ids: list[int],
                 add_bos_default: bool | None, chat_template: str | None, chat_format: str | None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos_default = add_bos_default
        self.chat_template = chat_template
        self.chat_format = chat_format  # "nemotron" when no template is given for a Nemotron model
        self.pad_token: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, model_type: str | None = None,
                        bos_token_id: int | None = None, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        path = Path(path)
        settings = _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            backend: _Backend = _HFBackend(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(path / "tokenizer.model")
        else:
            raise NemoliteError(f"no tokenizer.json or tokenizer.model in {path}")
        bos = bos_token_id if bos_token_id is not None else backend.token_to_id(_token_text(settings.get("bos_token")))
        eos = list(eos_token_ids or [])
        eos_from_settings = backend.token_to_id(_token_text(settings.get("eos_token")))
        if eos_from_settings is not None and eos_from_settings not in eos:
            eos.append(eos_from_settings)
        if not eos and backend.default_eos is not None:
            eos.append(backend.default_eos)
        template = _chat_template(path, settings)
        chat_format = "nemotron" if template is None and model_type == "nemotron" else None
        tokenizer = cls(backend, bos_token_id=bos, eos_token_ids=eos, add_bos_default=settings.get("add_bos_token"),
                        chat_template=template, chat_format=chat_format)
        tokenizer.pad_token = _token_text(settings.get("pad_token")) or backend.default_pad
        return tokenizer

    @classmethod
    def from_model_file(cls, file: str | Path, kind: str, *, model_type: str | None, bos_token_id: int | None,
                        eos_token_ids: list[int], add_bos: bool | None, chat_template: str | None,
                        pad_token: str | None = None) -> "Tokenizer":
        """A tokenizer whose settings come from elsewhere (a GGUF file's metadata: see
        nemolite.checkpoint.gguf_vocab): ``kind`` "sentencepiece" (a tokenizer.model) or "hf" (a
        tokenizer.json). The backend reads the whole file now; it may be deleted afterwards."""
        backend: _Backend = _SentencePieceBackend(Path(file)) if kind == "sentencepiece" else _HFBackend(Path(file))
        chat_format = "nemotron" if chat_template is None and model_type == "nemotron" else None
        tokenizer = cls(backend, bos_token_id=bos_token_id, eos_token_ids=list(eos_token_ids), add_bos_default=add_bos,
                        chat_template=chat_template, chat_format=chat_format)
        tokenizer.pad_token = pad_token or backend.default_pad
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos`` None follows the checkpoint's own rule."""
        if not isinstance(text, str):
            raise NemoliteError(f"text to encode must be a string, got {type(text).__name__}")
        if not valid_unicode(text):
            raise NemoliteError("the text is not valid Unicode (it holds a lone surrogate such as \\ud800)")
        if add_bos is None and isinstance(self.backend, _HFBackend) and self.add_bos_default is None:
            return self.backend.encode(text, add_special_tokens=True)
        ids = self.backend.encode(text, add_special_tokens=False)
        if add_bos is None:
            add_bos = self.add_bos_default if self.add_bos_default is not None else True
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    def special_token_ids(self) -> set[int]:
        """Tokens that stand for no text: control, unknown and marker tokens (``<s>``, ``<extra_id_1>``,
        ``<|eot_id|>``); structured output never lets them into what it constrains."""
        return self.backend.special_token_ids()

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt of a conversation; ``tools`` (OpenAI function specs) reach a jinja template that reads
        them (Llama-3.1's), as HF's apply_chat_template passes them."""
        messages = validate_messages(messages)
        if self.chat_template is not None:
            extra = {"tools": tools} if tools is not None else {}
            return _render_jinja(self.chat_template, messages, add_generation_prompt, **extra,
                                 bos_token=self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else "",
                                 eos_token=self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else "")
        if self.chat_format == "nemotron":
            return nemotron_chat_prompt(messages, add_generation_prompt)
        raise NemoliteError("this checkpoint has no chat template (no 'chat_template' in tokenizer_config.json and "
                            "no chat_template.jinja); send a plain prompt to a completions API instead")

    def chat_stop(self) -> tuple[list[str], list[int]]:
        """Stop strings and stop token ids that end an assistant turn."""
        if self.chat_template is None and self.chat_format == "nemotron":
            stop_id = self.token_to_id(NEMOTRON_STOP)
            return [NEMOTRON_STOP], [stop_id] if stop_id is not None else []
        return [], []


def nemotron_chat_prompt(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The Nemotron-4 instruct format (340B-Instruct model card)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    parts = [f"<extra_id_0>System\n{system}\n"]
    for message in messages:
        if message["role"] == "user":
            parts.append(f"<extra_id_1>User\n{message['content']}\n")
        elif message["role"] == "assistant":
            parts.append(f"<extra_id_1>Assistant\n{message['content'] or _calls_text(message)}\n")
        elif message["role"] == "tool":  # the format has no tool turn: the result comes back as the user's
            parts.append(f"<extra_id_1>User\nTool result: {message['content']}\n")
    if add_generation_prompt:
        parts.append("<extra_id_1>Assistant\n")
    return "".join(parts)


def _calls_text(message: dict) -> str:
    """An assistant turn that called tools, as the calls it made (Llama-3.1's JSON form)."""
    calls = [call.get("function", {}) for call in message.get("tool_calls") or () if isinstance(call, dict)]
    return "; ".join(json.dumps({"name": call.get("name"), "parameters": _arguments(call.get("arguments"))},
                                ensure_ascii=False) for call in calls)


def _arguments(arguments: Any) -> Any:
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


def validate_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise NemoliteError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise NemoliteError(f"messages[{index}] needs a 'role' of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(_text_part(part, f"messages[{index}].content[{number}]")
                              for number, part in enumerate(content))
        if content is None and message["role"] == "assistant" and message.get("tool_calls"):
            if not isinstance(message["tool_calls"], list):
                raise NemoliteError(f"messages[{index}].tool_calls must be a list")
            content = ""  # a turn that only called tools
        if not isinstance(content, str):
            raise NemoliteError(f"messages[{index}].content must be a string or a list of text parts")
        if message["role"] == "system" and index != 0:
            raise NemoliteError(f"messages[{index}]: a system message may only come first")
        checked.append({**message, "content": content})
    return checked


def _text_part(part: Any, where: str) -> str:
    """The text of one OpenAI content part; these models read text only, so any other part is refused."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise NemoliteError(f"{where} must be an object with a 'type', e.g. {{\"type\": \"text\", \"text\": \"...\"}}")
    if part["type"] != "text":
        raise NemoliteError(f"{where} is of type {part['type'][:40]!r}; this model reads text only (type 'text')")
    if not isinstance(part.get("text"), str):
        raise NemoliteError(f"{where}.text must be a string")
    return part["text"]


def _render_jinja(template: str, messages: list[dict], add_generation_prompt: bool, **tokens: str) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise NemoliteError(f"chat template refused the messages: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.TemplateError as error:
        raise NemoliteError(f"the checkpoint's chat template failed: {error}") from None


def _chat_template(path: Path, settings: dict) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = settings.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise NemoliteError(f"{file} is not valid JSON: {error}") from None


def _token_text(token: Any) -> str | None:
    """tokenizer_config tokens are plain strings or AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


class _Backend:
    vocab_size: int
    default_eos: int | None = None
    default_pad: str | None = None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def id_to_token(self, token_id: int) -> str: ...
    def token_to_id(self, token: str | None) -> int | None: ...
    def special_token_ids(self) -> set[int]: ...


class _HFBackend(_Backend):
    def __init__(self, file: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tokenizer = HFTokenizer.from_file(str(file))
        except Exception as error:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise NemoliteError(f"cannot read {file}: {error}") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def special_token_ids(self) -> set[int]:
        return {token_id for token_id, added in self.tokenizer.get_added_tokens_decoder().items() if added.special}


class _SentencePieceBackend(_Backend):
    def __init__(self, file: Path):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(str(file))
        except (OSError, RuntimeError) as error:
            raise NemoliteError(f"cannot read SentencePiece model {file}: {error}") from None
        self.vocab_size = self.processor.get_piece_size()
        self.default_eos = self.processor.eos_id() if self.processor.eos_id() >= 0 else None
        self._control = {i for i in range(self.vocab_size) if self.processor.IsControl(i)}
        # Special pieces written in the text (``</s>``) are those tokens, as HF tokenizers parse them.
        self._special = {self.processor.id_to_piece(i): i for i in
                         sorted(self._control | {i for i in range(self.vocab_size) if self.processor.IsUnknown(i)})}
        self._special_split = re.compile("(" + "|".join(map(re.escape, sorted(self._special, key=len, reverse=True)))
                                         + ")") if self._special else None
        pad = self.processor.pad_id()
        self.default_pad = self.processor.id_to_piece(pad) if 0 <= pad < self.vocab_size else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._special_split is None or not any(piece in text for piece in self._special):
            return self.processor.encode(text)
        ids: list[int] = []
        for part in self._special_split.split(text):
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                ids += self.processor.encode(part)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Control pieces (<s>, </s>, <pad>) have no text; without skipping, show them as HF does.
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if skip_special_tokens or not self._control.intersection(ids):
            return self.processor.decode(ids)
        text, run = [], []
        for token_id in ids:
            if token_id in self._control:
                text += [self.processor.decode(run), self.processor.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        return "".join(text + [self.processor.decode(run)])

    def id_to_token(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else ""

    def special_token_ids(self) -> set[int]:
        # Control and unknown pieces, and user-defined markers: a piece spelled <...> that the model
        # matches whole in text (llama.cpp's rule for user-defined tokens that look like controls).
        markers = {i for i in range(self.vocab_size) if not self.processor.IsByte(i)
                   and _MARKER.fullmatch(self.processor.id_to_piece(i))
                   and self.processor.encode(self.processor.id_to_piece(i))[-1:] == [i]}
        return set(self._special.values()) | markers

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.processor.piece_to_id(token)
        return None if token_id == self.processor.unk_id() and token != self.processor.id_to_piece(token_id) else token_id


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters.

    Decodes a short window (from ``prefix_offset``) so that tokenizers which drop a leading
    space at the start of a decode still give the right spacing.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # incomplete UTF-8 sequence (byte-fallback pieces) or nothing visible yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]
