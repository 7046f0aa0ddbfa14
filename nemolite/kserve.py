"""The KServe v2 tensor wire format with Triton's binary tensor extension (kserve/kserve
``docs/predict-api/v2/required_api.md``; triton-inference-server/server
``docs/protocol/extension_binary_data.md``).

A request or response body is a JSON header, optionally followed by raw tensor buffers; the
``Inference-Header-Content-Length`` HTTP header gives the JSON header's length in bytes. A tensor
entry (``inputs[i]`` of a request, ``outputs[i]`` of a response) is ``{name, datatype, shape}`` with
either ``data`` (JSON, row-major, possibly nested) or ``parameters.binary_data_size``: then its
bytes are the next buffer after the header, in entry order. Buffers are row-major little endian;
a BYTES element is a uint32 LE length and then that many bytes.

Shared by the server (nemolite.server.triton) and the client (nemolite.nemo_query); only the
standard library and numpy, so the client stays light.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from nemolite.json_body import parse_json_object

HEADER_LENGTH = "Inference-Header-Content-Length"

FIXED_WIDTH = {"BOOL": np.dtype("?"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
               "INT64": np.dtype("<i8"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
               "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "FP16": np.dtype("<f2"),
               "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
DATATYPES = ("BYTES", *FIXED_WIDTH)


class TensorError(ValueError):
    """A body that does not follow the wire format; the message says what to fix."""


def encode_bytes(items: list[bytes]) -> bytes:
    """BYTES elements as one buffer: each a uint32 LE length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def decode_bytes(buffer: bytes, count: int, name: str) -> list[bytes]:
    items, offset = [], 0
    for index in range(count):
        if offset + 4 > len(buffer):
            raise TensorError(f"the binary data of '{name}' ends inside element {index}'s length prefix; "
                              f"each BYTES element is a 4-byte little-endian length and then its bytes")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise TensorError(f"element {index} of '{name}' declares {length} bytes but only "
                              f"{len(buffer) - offset} remain in its binary data")
        items.append(bytes(buffer[offset:offset + length]))
        offset += length
    if offset != len(buffer):
        raise TensorError(f"'{name}' has {len(buffer) - offset} bytes of binary data left over after its "
                          f"{count} elements; check its shape and binary_data_size")
    return items


def _object_array(items: list[bytes], shape: list[int]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def tensor_to_bytes(datatype: str, array: np.ndarray) -> bytes:
    """The raw buffer of ``array`` sent as ``datatype``; BYTES elements may be bytes or str (UTF-8)."""
    if datatype == "BYTES":
        return encode_bytes([item.encode() if isinstance(item, str) else bytes(item) for item in array.flat])
    return np.ascontiguousarray(array, dtype=FIXED_WIDTH[datatype]).tobytes()


def _shape(entry: dict, name: str) -> list[int]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise TensorError(f"'{name}' needs a 'shape': a list of non-negative integers, got {shape!r}")
    return shape


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    flat: list = []

    def walk(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item)
        else:
            flat.append(value)

    walk(data)
    if len(flat) != math.prod(shape):
        raise TensorError(f"'{name}' has shape {shape} ({math.prod(shape)} elements) but its data holds {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise TensorError(f"the JSON data of BYTES input '{name}' must be strings")
        try:
            return _object_array([item.encode() for item in flat], shape)
        except UnicodeEncodeError:
            raise TensorError(f"the strings of BYTES input '{name}' must be valid Unicode (no lone surrogates)") \
                from None
    if datatype == "BOOL":
        ok = all(isinstance(item, bool) for item in flat)
    else:
        ok = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in flat)
    if not ok:
        raise TensorError(f"the JSON data of {datatype} input '{name}' must be "
                          f"{'true/false' if datatype == 'BOOL' else 'numbers'}")
    try:
        with np.errstate(over="raise", invalid="raise"):  # 1e308 as FP32 is an error, not inf
            return np.array(flat, dtype=FIXED_WIDTH[datatype]).reshape(shape)
    except (OverflowError, ValueError, FloatingPointError) as error:
        raise TensorError(f"the JSON data of '{name}' does not fit {datatype}: {error}") from None


def read_tensors(entries: Any, buffers: bytes, kind: str = "inputs") -> dict[str, np.ndarray]:
    """The tensors of a header's ``inputs`` or ``outputs`` list; binary ones take ``buffers`` in order.

    BYTES tensors come back as object arrays of ``bytes``; the others as arrays of their numpy dtype.
    """
    if not isinstance(entries, list):
        raise TensorError(f"'{kind}' must be a list of tensors")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TensorError(f"each of '{kind}' must be an object with a 'name'")
        name, datatype = entry["name"], entry.get("datatype")
        if datatype not in DATATYPES:
            raise TensorError(f"'{name}' has datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
        shape = _shape(entry, name)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise TensorError(f"'parameters' of '{name}' must be an object")
        if "shared_memory_region" in parameters:
            raise TensorError(f"'{name}' uses shared memory, which this server does not support; send the data "
                              f"in the body")
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in entry:
                raise TensorError(f"'{name}' has neither 'data' nor parameters.binary_data_size")
            tensors[name] = _from_json(name, datatype, shape, entry["data"])
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TensorError(f"parameters.binary_data_size of '{name}' must be a non-negative integer")
        if offset + size > len(buffers):
            raise TensorError(f"'{name}' declares {size} bytes of binary data but only {len(buffers) - offset} "
                              f"remain after the JSON header; the binary_data_size values and the body do not add up")
        buffer = buffers[offset:offset + size]
        offset += size
        count = math.prod(shape)
        if datatype == "BYTES":
            tensors[name] = _object_array(decode_bytes(buffer, count, name), shape)
            continue
        dtype = FIXED_WIDTH[datatype]
        if size != count * dtype.itemsize:
            raise TensorError(f"'{name}' is {datatype} with shape {shape}, so {count * dtype.itemsize} bytes, "
                              f"but its binary_data_size is {size}")
        tensors[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if offset != len(buffers):
        raise TensorError(f"the body has {len(buffers) - offset} bytes after the JSON header that no tensor's "
                          f"binary_data_size accounts for")
    return tensors


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the bytes after it; without a header length the whole body is JSON."""
    if header_length is None:
        json_part, rest = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise TensorError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise TensorError(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes; it must give the "
                              f"length of the JSON header at the start of the body")
        json_part, rest = body[:length], body[length:]
    try:
        header = parse_json_object(json_part, "the JSON header")
    except ValueError as error:
        hint = f" (is {HEADER_LENGTH} right?)" if header_length is not None else ""
        raise TensorError(f"{error}{hint}") from None
    return header, rest


def pack(header: dict, buffers: list[bytes]) -> tuple[bytes, int]:
    """A body of ``header`` then ``buffers``, and the header's length (for ``HEADER_LENGTH``)."""
    json_part = json.dumps(header, separators=(",", ":")).encode()
    return json_part + b"".join(buffers), len(json_part)
