"""Request-body pieces shared by the OpenAI-shaped routes (chat completions, tokenize, reward)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Body(BaseModel):
    """Unknown fields are accepted (clients send ``user``, ``stream_options`` ...); a route refuses
    those it cannot honour when they would change the answer. Types are strict: ``true`` is no token id
    and ``"5"`` no count."""

    model_config = ConfigDict(extra="allow", strict=True)


class ChatMessage(Body):
    role: str
    content: str | list[dict[str, Any]] | None = None  # content parts are checked by the tokenizer
