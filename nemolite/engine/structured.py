"""Structured output: JSON schemas, regular expressions, choices and grammars enforced token by token.

The one module that knows the grammar library (llguidance: https://github.com/guidance-ai/llguidance).
The rest of the engine sees three calls, as in vLLM's ``structured_output`` backends
(https://github.com/vllm-project/vllm/tree/main/vllm/v1/structured_output): ``GrammarCompiler.compile``
a request's ``StructuredOutputs`` once (cached by its text) into a template matcher that every sequence
copies into its ``SequenceGrammar``; ``MaskFiller.start`` the token bitmasks of a step's constrained
sequences (see MaskFiller for where they are computed); ``SequenceGrammar.accept`` each sampled token.
The logits only meet the bitmask, in ``apply_token_bitmask``.

Why llguidance over xgrammar 0.2.9 (both measured on the demo vocabulary, random walks through the
mask, 100 answers over 5 schemas): xgrammar let raw control characters (\\x00, \\x0b, \\x1c) into JSON
strings, so 4 of 100 answers did not parse; llguidance's all parsed and validated, at ~24 us of mask a
token. llguidance also refuses the JSON-schema keywords it cannot enforce ("uniqueItems", "not") with
a message, where a silently ignored keyword would hand back output that fails validation.

Vocabulary: special tokens (control, unknown, user-defined ``<...>`` pieces of a SentencePiece model;
added tokens marked special in a tokenizer.json) can never appear inside structured output; EOS is
allowed where the grammar may end. SentencePiece's ``▁`` and ``<0xNN>`` byte pieces become the bytes they
stand for, so a value may start with any piece that spells it. JSON gets no free whitespace (``", "``
and ``": "`` between items): a small model given the choice otherwise writes spaces until ``max_tokens``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import threading
from typing import Any

import torch

from nemolite.errors import NemoliteError
from nemolite.json_body import valid_unicode
from nemolite.model import cpu_kernels

# What llguidance's JSON compiler applies before a schema's own "x-guidance" options.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Text of one schema, regex, grammar or all choices together; llguidance's own limits bound the work.
MAX_SPEC_CHARACTERS = 256 * 1024
COMPILED_CACHE_SIZE = 256  # distinct grammars kept compiled
# llguidance's defaults except a lower lexer budget a step (200k: ~14 ms of one core) so that no
# pathological grammar can take a step's time, and errors that never quote the grammar back.
LIMITS = dict(step_lexer_fuel=100_000, verbose_errors=False)


@dataclasses.dataclass(slots=True)
class StructuredOutputs:
    """What a sequence's output must be: exactly one of these (vLLM's StructuredOutputsParams).

    ``json``: a JSON schema (an object, or its JSON text); ``regex``: a regular expression the whole
    output matches (Rust regex syntax); ``choice``: one of these strings; ``grammar``: a Lark grammar
    (llguidance's dialect) or a GBNF one (llama.cpp's, recognised by ``::=``); ``json_object``: any JSON
    object (OpenAI's ``response_format: {"type": "json_object"}``)."""

    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as error:
                raise NemoliteError(f"structured output: the JSON schema is not valid JSON ({error})") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise NemoliteError("structured output: a JSON schema must be a JSON object, got "
                                f"{type(self.json).__name__}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise NemoliteError("structured output: regex must be a string")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise NemoliteError("structured output: grammar must be a string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise NemoliteError("structured output: choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if not isinstance(self.json_object, bool):
            raise NemoliteError("structured output: json_object must be true or false")
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise NemoliteError("structured output takes exactly one of json, regex, choice, grammar, json_object; "
                                f"got {', '.join(given) or 'none'}")
        text = getattr(self, given[0])
        if not valid_unicode(text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
                             if not isinstance(text, list) else "".join(text)):
            raise NemoliteError(f"structured output: the {given[0]} must be valid Unicode (no lone surrogates)")
        if len(self.key) > MAX_SPEC_CHARACTERS:
            raise NemoliteError(f"structured output: the {given[0]} is longer than {MAX_SPEC_CHARACTERS} characters")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None) \
            if not self.json_object else "json_object"

    @property
    def closes_as_json(self) -> bool:
        """Whether the output is JSON (steered to close near the token budget: CLOSING_WINDOW)."""
        return self.json is not None or self.json_object

    @property
    def key(self) -> str:
        """The text that identifies this grammar (the compile cache's key)."""
        value = getattr(self, self.kind)
        return self.kind + ":" + (value if isinstance(value, str) else json.dumps(value, sort_keys=True))

    @classmethod
    def of(cls, value: Any) -> "StructuredOutputs":
        """A StructuredOutputs from itself or from a dict of its fields (unknown fields refused)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise NemoliteError("structured_outputs must be an object with one of json, regex, choice, grammar, "
                                "json_object")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise NemoliteError(f"structured_outputs has unknown fields {unknown}; it takes one of json, regex, "
                                "choice, grammar, json_object")
        return cls(**value)


# Numbers without a bound get this many digits at most: a small model that starts a number otherwise
# often writes digits until max_tokens (the demo model did, on 2 of 4 answers to an unbounded integer).
NUMBER_BOUND = 10**15
OPEN_OBJECT_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def tighten_schema(schema: Any, in_all_of: bool = False) -> Any:
    """A copy of ``schema`` that admits a subset of what it admits, so that whatever is generated still
    validates against the schema as given:
    - an integer or number without an upper (lower) bound gets +-NUMBER_BOUND;
    - an object that lists ``properties`` and says nothing of other keys admits no others (xgrammar's
      strict mode, vLLM's default; OpenAI's strict schemas say so themselves): given the choice, the
      demo model went on with a made-up key after the listed ones and wrote it until max_tokens (31 of
      40 answers to five such schemas). Members of ``allOf`` are left open: each lists only its part."""
    if isinstance(schema, list):
        return [tighten_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: value if key in ("enum", "const", "default", "examples") else
                 [tighten_schema(item, in_all_of=True) for item in value] if key == "allOf" and isinstance(value, list)
                 else tighten_schema(value) for key, value in schema.items()}
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "integer" in kinds or "number" in kinds:
        low = _number(schema.get("minimum", schema.get("exclusiveMinimum")))
        high = _number(schema.get("maximum", schema.get("exclusiveMaximum")))
        if "maximum" not in schema and "exclusiveMaximum" not in schema and (low is None or low < NUMBER_BOUND):
            tightened["maximum"] = NUMBER_BOUND
        if "minimum" not in schema and "exclusiveMinimum" not in schema and (high is None or high > -NUMBER_BOUND):
            tightened["minimum"] = -NUMBER_BOUND
    if (isinstance(schema.get("properties"), dict) and not in_all_of and "allOf" not in schema
            and not any(key in schema for key in OPEN_OBJECT_KEYS)):
        tightened["additionalProperties"] = False
    return tightened


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def grammar_source(spec: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON form) of ``spec``, not yet checked."""
    import llguidance

    if spec.json is not None or spec.json_object:
        schema = tighten_schema(spec.json) if spec.json is not None else {"type": "object"}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as error:
            raise NemoliteError(f"structured output: invalid JSON schema ({error})") from None
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        # Lark string literals are JSON's; one alternative per choice, matched exactly.
        alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in spec.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    text = spec.grammar
    if "::=" in text:  # GBNF, as llama.cpp and vLLM's xgrammar backend take it
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as error:  # noqa: BLE001 - the converter raises what its parser meets
            raise NemoliteError(f"structured output: invalid GBNF grammar ({error})") from None
    return llguidance.LLMatcher.grammar_from_lark(text)


class GrammarCompiler:
    """Compiles StructuredOutputs against one tokenizer, each distinct one once; thread-safe, so that a
    server compiles on a worker thread and the engine finds the grammar ready."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._ll_tokenizer = None
        self._limits = None
        self._closing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def compile(self, spec: StructuredOutputs):
        """A template matcher of ``spec`` (copy it for each sequence: ``new_matcher``); NemoliteError names
        what is wrong with a schema or grammar, or that it admits no output."""
        key = spec.key
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template
        template = self._build(spec)
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template

    def closing_bitmasks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bitmasks [W] (the library's layout) of the tokens that close what is open in JSON: outside a
        string, closing brackets (``}`` ``]]``...) and EOS; in a string, a quote and the brackets after it
        (``"`` ``"}`` ``"]}``...); then tokens of one ASCII punctuation character (what moves a pattern
        such as an e-mail address on towards its end)."""
        if self._closing is None:
            ll_tokenizer, _ = self._library_tokenizer()
            texts = {i: ll_tokenizer.decode_bytes([i]) for i in range(ll_tokenizer.vocab_size)
                     if not ll_tokenizer.is_special_token(i)}
            brackets = [i for i, text in texts.items() if re.fullmatch(rb"[\]}]+", text)]
            quote = [i for i, text in texts.items() if re.fullmatch(rb'"[\]}]*', text)]
            punctuation = [i for i, text in texts.items() if re.fullmatch(rb"[!-/:-@\[-`{-~]", text)]
            self._closing = tuple(token_bitmask([*brackets, *self.tokenizer.eos_token_ids], ll_tokenizer.vocab_size)
                                  if kind is brackets else token_bitmask(kind, ll_tokenizer.vocab_size)
                                  for kind in (brackets, quote, punctuation))
        return self._closing

    def new_matcher(self, spec: StructuredOutputs):
        return self.compile(spec).deep_copy()

    def _build(self, spec: StructuredOutputs):
        import llguidance

        ll_tokenizer, limits = self._library_tokenizer()
        source = grammar_source(spec)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, ll_tokenizer, limits=limits)
        if failed:
            raise NemoliteError(f"structured output: invalid {_NAMES[spec.kind]}: {_first_line(messages[0])}")
        matcher = llguidance.LLMatcher(ll_tokenizer, source, log_level=0, limits=limits)
        if matcher.is_error():
            raise NemoliteError(f"structured output: invalid {_NAMES[spec.kind]}: {_first_line(matcher.get_error())}")
        mask = torch.zeros((1, bitmask_width(ll_tokenizer.vocab_size)), dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        if matcher.is_error() or not bool(mask.any()):
            reason = matcher.get_error() if matcher.is_error() else "no token of this vocabulary can start it"
            raise NemoliteError(f"structured output: the {_NAMES[spec.kind]} admits no output ({_first_line(reason)})")
        return matcher

    def _library_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = library_tokenizer(self.tokenizer)
                self._limits = llguidance.LLParserLimits(**LIMITS)
            return self._ll_tokenizer, self._limits


_NAMES = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
          "grammar": "grammar"}


def _first_line(message: str) -> str:
    message = message.strip()
    # llguidance appends the offending grammar line with a caret; the first lines name the problem.
    return re.sub(r"\s+", " ", "\n".join(message.splitlines()[:3]))[:500]


def library_tokenizer(tokenizer):
    """The llguidance tokenizer of a nemolite Tokenizer: a tokenizer.json goes to the library as it is
    (it reads the special flags of added tokens); a SentencePiece model becomes each piece's bytes, with
    special pieces prefixed by 0xFF (the library's mark: no grammar text can spell them)."""
    import llguidance

    eos = list(tokenizer.eos_token_ids)
    backend = tokenizer.backend
    hf = getattr(backend, "tokenizer", None)
    if hf is not None:  # tokenizers.Tokenizer
        return llguidance.LLTokenizer(hf.to_str(), n_vocab=tokenizer.vocab_size, eos_token=eos or None)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceVocab(tokenizer)),
                                  n_vocab=tokenizer.vocab_size, eos_token=eos or None)


class _SentencePieceVocab:
    """What llguidance.TokenizerWrapper reads of a tokenizer: tokens as bytes, special ids, a tokenizer."""

    def __init__(self, tokenizer):
        processor = tokenizer.backend.processor
        self.processor = processor
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.special_token_ids())
        special = set(self.special_token_ids)
        tokens = []
        for token_id in range(processor.get_piece_size()):
            piece = processor.id_to_piece(token_id)
            if token_id in special:
                tokens.append(b"\xff" + piece.encode())
            elif processor.is_byte(token_id):
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
        self.tokens = tokens

    def __call__(self, text: str) -> list[int]:
        # The library only tokenizes for features nemolite does not use (forced tokens, token healing);
        # what it gets must spell exactly ``text``, without SentencePiece's dummy "▁" before it.
        ids = self.processor.encode(text)
        first = self.processor.id_to_piece(ids[0]) if ids else ""
        if not first.startswith("\u2581"):
            return ids
        rest = first[1:]
        if not rest:
            return ids[1:]
        head = self.processor.piece_to_id(rest)
        if head == self.processor.unk_id():
            return [self.processor.piece_to_id(f"<0x{byte:02X}>") for byte in rest.encode()] + ids[1:]
        return [head] + ids[1:]


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_BITS = torch.tensor([1 << bit for bit in range(31)] + [-(1 << 31)], dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [k, vocab_size] from the library's int32 bitmask [k, W] (token t: bit t % 32 of word t // 32);
    tokens past the tokenizer's vocabulary (padded logits) are never allowed."""
    bits = (bitmask[:, :, None] & _BITS).ne(0).view(bitmask.shape[0], -1)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.cat([bits, bits.new_zeros(bits.shape[0], vocab_size - bits.shape[1])], 1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: in logits row rows[i], every token that bitmask row i forbids (and every token past the
    tokenizer's vocabulary) becomes -inf. On the CPU one kernel does it (cpu_kernels)."""
    if logits.device.type == "cpu" and logits.is_contiguous() and logits.dtype in (torch.float32, torch.bfloat16) \
            and cpu_kernels.has("apply_token_bitmask"):
        torch.ops.nemolite.apply_token_bitmask(logits, bitmask, torch.tensor(rows, dtype=torch.long))
        return
    index = torch.tensor(rows, device=logits.device)
    allowed = allowed_tokens(bitmask, logits.shape[-1]).to(logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


# A JSON-constrained sequence this close to its token budget is steered to close what it has open: a
# small model otherwise writes a string until max_tokens and the JSON never parses (the demo model, 20
# schemas x 8 answers at temperature 0.8 and 256 tokens: 16 answers cut short without, 2 with).
CLOSING_WINDOW = 32


def closing_window(max_tokens: int | None) -> int:
    return CLOSING_WINDOW if max_tokens is None else min(CLOSING_WINDOW, max(1, max_tokens // 4))


def token_bitmask(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    """The int32 bitmask [W] (token t: bit t % 32 of word t // 32) of ``token_ids``."""
    bits = torch.zeros(bitmask_width(vocab_size) * 32, dtype=torch.bool)
    bits[[t for t in token_ids if 0 <= t < vocab_size]] = True
    return (bits.view(-1, 32).int() * _BITS).sum(1, dtype=torch.int32)


def steer_to_close(bitmask: torch.Tensor, in_string: list[bool], closing: tuple[torch.Tensor, ...]) -> None:
    """In place on bitmask rows [k, W] of sequences near their budget: keep only the tokens of the first
    preferred set the grammar allows some of (in a string: closing quotes, outside: closing brackets and
    EOS; then single punctuation), so that the model chooses among those by its own odds; a row whose
    grammar allows none of them (a key, a digit it needs) is unchanged."""
    brackets, quote, punctuation = closing
    first = torch.where(torch.tensor(in_string)[:, None], quote, brackets)
    steered = torch.zeros(bitmask.shape[0], dtype=torch.bool)
    for preferred in (first, punctuation.expand_as(bitmask)):
        kept = bitmask & preferred
        use = kept.ne(0).any(1) & ~steered
        bitmask.copy_(torch.where(use[:, None], kept, bitmask))
        steered |= use


class MaskFiller:
    """Computes the next-token bitmasks of a step's constrained sequences: on a worker thread while the
    forward pass runs where a core is free of it (a GPU runs the forward pass, or torch leaves CPU cores
    idle), else on the engine thread once the logits are there. Measured on the 2-core VM (demo model,
    16 JSON-schema sequences): beside the forward pass 16 masks took 4 ms instead of 0.4 ms and the step
    slowed by 12%, as the worker took turns with the GEMMs' threads; started after each token's accept,
    the worker waited for the GIL (up to Python's 5 ms switch interval) while the engine thread ran Python."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.width = bitmask_width(vocab_size)
        self.device = device
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor = None  # llguidance's, one thread: the worker's own

    def free_core(self) -> bool:
        """Whether the forward pass leaves a core to the worker."""
        if self.device.type != "cpu":
            return True
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cores > torch.get_num_threads()

    def start(self, matchers: list):
        """A future of the int32 bitmask [len(matchers), W], row i that of matchers[i]."""
        if not self.free_core():
            return _Deferred(self._fill_here, matchers)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nemolite-grammar")
        return self._pool.submit(self._fill, matchers)

    def _fill_here(self, matchers: list) -> torch.Tensor:
        # On the calling thread: llguidance's executor would hand the work to a thread of its own, which
        # then waits for a core behind torch's spinning OpenMP threads (1.0-1.4 ms instead of 0.4 for 16).
        mask = torch.empty((len(matchers), self.width), dtype=torch.int32)
        pointer, size = mask.data_ptr(), self.width * 4
        for row, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(pointer + row * size, size)
        return mask

    def _fill(self, matchers: list) -> torch.Tensor:
        # One call for all rows that holds no GIL (a loop of calls would wait for the GIL between rows).
        mask = torch.empty((len(matchers), self.width), dtype=torch.int32)
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor(num_threads=1)
        self._executor.unsafe_compute_mask_ptr([(matcher, row) for row, matcher in enumerate(matchers)],
                                               mask.data_ptr(), self.width * 4, len(matchers))
        return mask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class _Deferred:
    """A future that runs its function when its result is first asked for."""

    def __init__(self, function, *args):
        self._call = (function, args)
        self._result = None

    def result(self):
        if self._call is not None:
            function, args = self._call
            self._call = None
            self._result = function(*args)
        return self._result


class SequenceGrammar:
    """One sequence's structured output: its matcher, past the sequence's tokens, and for JSON whether its
    text ends inside a string (scanned as the text grows, for the near-budget steer)."""

    __slots__ = ("matcher", "is_json", "_scanned", "_in_string", "_escaped")

    def __init__(self, matcher, is_json: bool):
        self.matcher, self.is_json = matcher, is_json
        self._scanned, self._in_string, self._escaped = 0, False, False

    def accept(self, token: int) -> None:
        """Advance past a sampled token; NemoliteError if the grammar did not allow it."""
        if not self.matcher.consume_token(token):
            raise NemoliteError(f"structured output: token {token} does not continue the grammar "
                                f"({_first_line(self.matcher.get_error())}); nothing the grammar allows was "
                                "left to sample (check allowed_token_ids, logit_bias and min_tokens against it)")

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing may follow (the sequence ends with finish_reason "stop")."""
        return self.matcher.is_stopped()

    def in_string(self, text: str) -> bool:
        """Whether JSON ``text`` (this sequence's output so far, which only grows) ends inside a string."""
        for char in text[self._scanned:]:
            if self._escaped:
                self._escaped = False
            elif char == "\\" and self._in_string:
                self._escaped = True
            elif char == '"':
                self._in_string = not self._in_string
        self._scanned = len(text)
        return self._in_string
