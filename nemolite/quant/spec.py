"""What ``--quantization`` / ``LLM(quantization=...)`` asks for."""

from __future__ import annotations

import dataclasses

from nemolite.errors import NemoliteError

METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
SPELLINGS = ("int8", "int8-head", "int4", "int4-g128", "int4-asym", "int4-g128-asym", "... -head", "int4... -head8")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """int8: one scale per output channel. int4: one scale (and with ``symmetric=False`` one zero
    point) per ``group_size`` input columns of each row. ``lm_head``: quantize the LM head too, as the
    other layers, or with ``int8_head`` to int8 per channel (reward heads always stay fp32)."""

    method: str
    group_size: int | None = None  # int8: None (per channel); int4: 32, 64 or 128
    symmetric: bool = True
    lm_head: bool = False
    int8_head: bool = False  # the LM head (lm_head) int8 per channel whatever the method

    def __post_init__(self):
        if self.method not in METHODS:
            raise NemoliteError(f"quantization {self.method!r} is not supported; use one of {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise NemoliteError(f"int4 quantization needs a group size of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.method == "int8" and (self.group_size is not None or not self.symmetric):
            raise NemoliteError("int8 quantization is symmetric, one scale per output channel")
        if self.int8_head and (self.method == "int8" or not self.lm_head):
            raise NemoliteError("-head8 (an int8 LM head) goes with int4 layers; int8 layers take -head")

    @property
    def head(self) -> "QuantSpec":
        """How the LM head is quantized (with ``lm_head``)."""
        return QuantSpec("int8", lm_head=True) if self.int8_head else self

    def __str__(self) -> str:
        text = self.method
        if self.method == "int4":
            text += "" if self.group_size == 32 else f"-g{self.group_size}"
            text += "" if self.symmetric else "-asym"
        return text + ("-head8" if self.int8_head else "-head" if self.lm_head else "")


def parse_quantization(value: "str | QuantSpec | None") -> QuantSpec | None:
    """``None``/"none" → None; "int8", "int4" (group 32, symmetric), "int4-g128", "int4-asym",
    "int4-g128-asym", any of them with "-head" to quantize the LM head as well (as the other layers), the
    int4 ones with "-head8" to quantize it to int8 per channel."""
    if value is None or isinstance(value, QuantSpec):
        return value
    if not isinstance(value, str):
        raise NemoliteError(f"quantization must be a string such as 'int8' or 'int4', got {type(value).__name__}")
    text = value.strip().lower()
    if text in ("", "none"):
        return None
    parts = text.split("-")
    method, options = parts[0], parts[1:]
    if method not in METHODS:
        raise NemoliteError(f"quantization {value!r} is not supported; use one of {', '.join(SPELLINGS)}")
    group, symmetric, head, int8_head = (32 if method == "int4" else None), True, False, False
    for option in options:
        if option == "head":
            head = True
        elif option == "head8" and method == "int4":
            head = int8_head = True
        elif option == "asym" and method == "int4":
            symmetric = False
        elif option.startswith("g") and option[1:].isdigit() and method == "int4":
            group = int(option[1:])
        else:
            raise NemoliteError(f"quantization {value!r}: unknown option {option!r}; use one of {', '.join(SPELLINGS)}")
    return QuantSpec(method, group, symmetric, head, int8_head)
