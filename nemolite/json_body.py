"""Reading what a client sent: a JSON object, with a message that says what is wrong when it cannot be
read, and text that must be valid Unicode (JSON's ``"\ud800"`` decodes to a lone surrogate)."""

from __future__ import annotations

import json


def parse_json_object(data: bytes, what: str) -> dict:
    """``data`` as a JSON object; ValueError naming ``what`` ("the request body") otherwise."""
    try:
        value = json.loads(data)
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{what} holds a value Python cannot read: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def valid_unicode(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
