"""``NemoQuery``: NeMo's Triton query client, on the standard library and numpy alone.

A drop-in for ``from nemo.deploy import NemoQuery`` / ``from nemo.deploy.nlp import NemoQueryLLM``:
the model card samples run with only the import changed, against ``nemolite serve`` or a real
Triton/NeMo deployment::

    from nemolite import NemoQuery
    nq = NemoQuery(url="localhost:8000", model_name="Nemotron-3-8B-4K")
    output = nq.query_llm(prompts=["The meaning of life is"], max_output_token=200, top_k=1, top_p=0.0,
                          temperature=0.1)

``query_llm`` returns what ``NemoQueryLLM`` returns (NVIDIA/NeMo ``nemo/deploy/nlp/query_llm.py``): an ndarray of ``str`` of
shape ``(len(prompts), 1)``, completions only (``output[i][0]``); with ``openai_format_response=True``
a completion-shaped dict. It speaks Triton's HTTP protocol with the binary tensor extension in
pytriton ``ModelClient``'s order: server live/ready and model ready (polled each second until
``init_timeout``), the model config, then one infer per ``max_batch_size`` prompts. Inputs are
sent as NeMo sends them, except that ``min_output_len`` carries its own value (NeMo's client sends
``max_output_len``'s). Beyond NeMo's knobs, ``json_schema`` (a dict or its JSON text), ``regex``,
``choice`` (a list of strings) or ``grammar`` constrain every completion (``nemolite serve`` only).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from nemolite.kserve import HEADER_LENGTH, TensorError, pack, read_tensors, split_body, tensor_to_bytes

DEFAULT_PORT = 8000
WORD_LISTS = ("stop_words_list", "bad_words_list", "end_strings")  # shape [n_words, 1], not batch-sized
STRUCTURED = ("json_schema", "regex", "choice", "grammar")  # one for the whole request, not batch-sized


class NemoQueryError(RuntimeError):
    """The server refused or failed a call, or could not be reached; the message says which and why."""


def _base_url(url: str) -> str:
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"NemoQuery speaks Triton's HTTP protocol only; use http://host:port, not {url!r}")
    netloc = parts.netloc if parts.port is not None else f"{parts.netloc}:{DEFAULT_PORT}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


class NemoQuery:
    """Sends prompts to a model served over Triton's HTTP protocol (``nemolite serve`` or Triton)."""

    def __init__(self, url: str, model_name: str, timeout: float = 600.0):
        self.url = _base_url(url)
        self.model_name = model_name
        self.timeout = timeout  # seconds for one infer call
        self.model_config: dict | None = None

    def _call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
              timeout: float = 60.0) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()
        except OSError as error:
            raise NemoQueryError(f"cannot reach {self.url}: {getattr(error, 'reason', error)}") from None

    @staticmethod
    def _error(status: int, content: bytes) -> str:
        try:
            return str(json.loads(content)["error"])
        except (ValueError, KeyError, TypeError):
            return content.decode(errors="replace").strip() or f"HTTP {status}"

    def _not_ready(self) -> str | None:
        """Why the server or the model is not ready yet, or None when both are."""
        for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{self.model_name}/ready"):
            try:
                status, _, content = self._call("GET", path, timeout=5.0)
            except NemoQueryError as error:
                return str(error)
            if status != 200:
                return f"GET {path} answered {status}: {self._error(status, content)}"
        return None

    def wait_ready(self, init_timeout: float = 60.0) -> dict:
        """Poll until the server and the model are ready (at most ``init_timeout`` s); the model config."""
        deadline = time.monotonic() + init_timeout
        while (reason := self._not_ready()) is not None:
            if time.monotonic() >= deadline:
                raise NemoQueryError(f"model '{self.model_name}' at {self.url} was not ready within {init_timeout} s "
                                     f"({reason}); check the server is up and the model name matches exactly")
            time.sleep(1.0)
        status, _, content = self._call("GET", f"/v2/models/{self.model_name}/config")
        if status != 200:
            raise NemoQueryError(f"reading the config of '{self.model_name}' failed: {self._error(status, content)}")
        config = json.loads(content)
        if not config.get("max_batch_size", 0) > 0:
            raise NemoQueryError(f"model '{self.model_name}' does not support batching (max_batch_size 0)")
        self.model_config = config
        return config

    def infer(self, inputs: dict[str, tuple[str, np.ndarray]], output_names: list[str]) -> dict[str, np.ndarray]:
        """One infer call: ``inputs`` maps names to (datatype, array); all sent and received binary."""
        entries, buffers = [], []
        for name, (datatype, array) in inputs.items():
            buffer = tensor_to_bytes(datatype, array)
            entries.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                            "parameters": {"binary_data_size": len(buffer)}})
            buffers.append(buffer)
        header = {"id": "0", "inputs": entries,
                  "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in output_names]}
        body, header_length = pack(header, buffers)
        status, headers, content = self._call(
            "POST", f"/v2/models/{self.model_name}/infer", body,
            {HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"}, self.timeout)
        if status != 200:
            raise NemoQueryError(f"Error occurred during inference request. Message: {self._error(status, content)}")
        length = next((v for k, v in headers.items() if k.lower() == HEADER_LENGTH.lower()), None)
        try:
            response, rest = split_body(content, length)
            return read_tensors(response.get("outputs"), rest, "outputs")
        except TensorError as error:
            raise NemoQueryError(f"the server's response is malformed: {error}") from None

    def query_llm(self, prompts: list[str], stop_words_list: list[str] | None = None,
                  bad_words_list: list[str] | None = None, no_repeat_ngram_size: int | None = None,
                  min_output_len: int | None = None, max_output_len: int | None = None, top_k: int | None = None,
                  top_p: float | None = None, temperature: float | None = None, random_seed: int | None = None,
                  task_id: str | None = None, lora_uids: list[str] | None = None, use_greedy: bool | None = None,
                  repetition_penalty: float | None = None, add_BOS: bool | None = None, all_probs: bool | None = None,
                  compute_logprob: bool | None = None, end_strings: list[str] | None = None,
                  init_timeout: float = 60.0, openai_format_response: bool = False,
                  output_context_logits: bool = False, output_generation_logits: bool = False,
                  max_output_token: int | None = None, json_schema: dict | str | None = None,
                  regex: str | None = None, choice: list[str] | None = None, grammar: str | None = None) -> Any:
        """Completions of ``prompts``: an ndarray of str, shape (len(prompts), 1). Unset knobs are not sent,
        so the server's defaults apply; ``max_output_token`` is the old ``NemoQuery`` name of ``max_output_len``.
        At most one of ``json_schema``, ``regex``, ``choice``, ``grammar`` constrains every completion."""
        if max_output_token is not None:
            if max_output_len is not None and max_output_len != max_output_token:
                raise ValueError("give max_output_len or max_output_token, not both")
            max_output_len = max_output_token
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = len(prompts)

        def column(value, dtype) -> np.ndarray:
            return np.full((batch, 1), value, dtype=dtype)

        def strings(values) -> np.ndarray:
            return np.array(list(values), dtype=object).reshape(-1, 1)

        inputs: dict[str, tuple[str, np.ndarray]] = {"prompts": ("BYTES", strings(prompts))}
        for name, value, datatype, dtype in (
                ("max_output_len", max_output_len, "INT64", np.int64),
                ("min_output_len", min_output_len, "INT64", np.int64), ("top_k", top_k, "INT64", np.int64),
                ("top_p", top_p, "FP32", np.float32), ("temperature", temperature, "FP32", np.float32),
                ("random_seed", random_seed, "INT64", np.int64),
                ("repetition_penalty", repetition_penalty, "FP32", np.float32),
                ("no_repeat_ngram_size", no_repeat_ngram_size, "FP32", np.float32),
                ("use_greedy", use_greedy, "BOOL", np.bool_), ("add_BOS", add_BOS, "BOOL", np.bool_),
                ("all_probs", all_probs, "BOOL", np.bool_), ("compute_logprob", compute_logprob, "BOOL", np.bool_),
                ("output_context_logits", output_context_logits, "BOOL", np.bool_),
                ("output_generation_logits", output_generation_logits, "BOOL", np.bool_)):
            if value is not None:
                inputs[name] = (datatype, column(value, dtype))
        for name, values in (("stop_words_list", stop_words_list), ("bad_words_list", bad_words_list),
                             ("end_strings", end_strings)):
            if values is not None:
                inputs[name] = ("BYTES", strings(values))
        if isinstance(json_schema, dict):
            json_schema = json.dumps(json_schema)
        for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)):
            if value is not None:
                inputs[name] = ("BYTES", strings([value]))
        if choice is not None:
            inputs["choice"] = ("BYTES", strings([choice] if isinstance(choice, str) else choice))
        if task_id is not None:
            inputs["task_id"] = ("BYTES", column(task_id, object))
        if lora_uids is not None:
            inputs["lora_uids"] = ("BYTES", np.array([list(lora_uids)] * batch, dtype=object))

        config = self.wait_ready(init_timeout)
        output_names = [entry["name"] for entry in config.get("output", [])]
        max_batch_size = config["max_batch_size"]
        rows = []
        for start in range(0, batch, max_batch_size):
            chunk = {name: (datatype, array if name in WORD_LISTS + STRUCTURED else array[start:start + max_batch_size])
                     for name, (datatype, array) in inputs.items()}
            result = self.infer(chunk, output_names)
            text = result.get("outputs", result.get("sentences"))
            if text is None:
                raise NemoQueryError(f"the server answered none of 'outputs' or 'sentences', only {sorted(result)}")
            rows.append(np.char.decode(text.astype("bytes"), "utf-8").reshape(-1, 1))
        sentences = np.concatenate(rows)
        if not openai_format_response:
            return sentences
        return {"id": f"cmpl-{int(time.time())}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [{"text": sentences}]}


NemoQueryLLM = NemoQuery
