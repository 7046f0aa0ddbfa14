"""lm-evaluation-harness ``local-completions`` against a live nemolite server (EleutherAI/lm-evaluation-harness
``lm_eval/models/openai_completions.py``).

A local multiple-choice task (Python standard-library docstrings, the demo model's training
domain) is written into tmp_path; lm-eval scores it through ``/v1/completions`` with token-id
prompts and its ``remote`` tokenizer (``/tokenizer_info``, ``/tokenize``, ``/detokenize``), and
every loglikelihood it reports must equal the one computed in-process with ``prompt_logprobs``.
The pre-July-2024 payload (``max_tokens: 0, logprobs: 10``) is checked with plain HTTP.
"""

from __future__ import annotations

import json
import random

import requests
import pytest

from nemolite.engine.sampling_params import SamplingParams

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it (lm-eval[api]); the bare wheel does not pull it
pytest.importorskip("aiohttp")

TASK = "nemolite_pydoc"
TOLERANCE = 1e-4

# (name, first sentence of its docstring in Python 3.11)
DOCSTRINGS = [
    ("math.sqrt", "Return the square root of x."),
    ("os.getcwd", "Return a unicode string representing the current working directory."),
    ("json.dumps", "Serialize obj to a JSON formatted str."),
    ("time.sleep", "Delay execution for a given number of seconds."),
    ("len", "Return the number of items in a container."),
    ("abs", "Return the absolute value of the argument."),
    ("os.path.join", "Join two or more pathname components, inserting '/' as needed."),
    ("random.shuffle", "Shuffle list x in place, and return None."),
    ("sorted", "Return a new list containing all items from the iterable in ascending order."),
    ("str.upper", "Return a copy of the string converted to uppercase."),
    ("shutil.copyfile", "Copy data from src to dst in the most efficient way possible."),
    ("os.remove", "Remove a file (same as unlink())."),
]


def chat_question(name: str) -> str:
    """The demo model was trained on "What does X do?" turns in the Nemotron-4 chat format."""
    return (f"<extra_id_0>System\n\n<extra_id_1>User\nWhat does {name} do?\n"
            f"<extra_id_1>Assistant\n")


def write_task(directory) -> int:
    """A multiple-choice task: four docstrings per question, the right one at a seeded position."""
    rng = random.Random(1234)
    docs = []
    for index, (name, answer) in enumerate(DOCSTRINGS):
        wrong = rng.sample([text for other, (_, text) in enumerate(DOCSTRINGS) if other != index], 3)
        label = rng.randrange(4)
        choices = wrong[:label] + [answer] + wrong[label:]
        docs.append({"question": chat_question(name), "choices": choices, "label": label})
    data = directory / "pydoc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    config = {
        "task": TASK, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    (directory / f"{TASK}.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    return len(docs)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair`` with the remote tokenizer (no special tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=False)
    context_ids = tokenizer.encode(context, add_bos=False)
    return context_ids, whole[len(context_ids):]


def reference_scores(llm, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(sum of the continuation's logprobs, whether every continuation token is the argmax), in-process."""
    encoded = [encode_pair(llm.tokenizer, context, continuation) for context, continuation in pairs]
    prompts = [context + continuation for context, continuation in encoded]
    outputs = llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                           sampling_params=SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    scores = []
    for (context, _), ids, output in zip(encoded, prompts, outputs):
        entries = [output.prompt_logprobs[position][ids[position]] for position in range(len(context), len(ids))]
        scores.append((sum(entry.logprob for entry in entries), all(entry.rank == 1 for entry in entries)))
    return scores


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "")


def run_lm_eval(server, task_dir, **model_args) -> dict:
    from lm_eval.tasks import TaskManager

    args = {"model": "demo", "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "remote",
            "tokenized_requests": True, "max_retries": 1, "max_length": 1024, "timeout": 60, **model_args}
    return lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[TASK],
                                   task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
                                   bootstrap_iters=0)


@pytest.mark.parametrize("batching", [{"batch_size": 4, "num_concurrent": 1}, {"batch_size": 3, "num_concurrent": 4}],
                         ids=["batched", "concurrent"])
def test_multiple_choice_matches_in_process(live_server, demo_llm, wait_idle, tmp_path, batching):
    count = write_task(tmp_path)
    results = run_lm_eval(live_server, tmp_path, **batching)
    assert results is not None
    metrics = results["results"][TASK]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and 0.0 <= metrics["acc_norm,none"] <= 1.0

    samples = results["samples"][TASK]
    assert sorted(sample["doc_id"] for sample in samples) == list(range(count))
    assert all(sample["acc"] in (0.0, 1.0) for sample in samples)

    pairs = [tuple(arguments) for sample in samples for arguments in sample["arguments"]]
    assert len(pairs) == 4 * count
    got = [resp[0] for sample in samples for resp in sample["resps"]]
    filtered = [resp for sample in samples for resp in sample["filtered_resps"]]
    expected = reference_scores(demo_llm, pairs)
    for pair, (loglikelihood, greedy), (filtered_ll, _), (want_ll, want_greedy) in zip(pairs, got, filtered, expected):
        assert loglikelihood == filtered_ll
        assert abs(loglikelihood - want_ll) <= TOLERANCE, (pair, loglikelihood, want_ll)
        assert greedy == want_greedy, pair
    wait_idle()


def _scored_prompts(llm, count: int = 3) -> list[tuple[list[int], int]]:
    """(context + continuation ids, context length) for the first few questions and their answers."""
    rows = []
    for name, answer in DOCSTRINGS[:count]:
        context, continuation = encode_pair(llm.tokenizer, chat_question(name), answer)
        rows.append((context + continuation, len(context)))
    return rows


@pytest.mark.parametrize("payload", [
    {"max_tokens": 1, "logprobs": 1},  # lm-eval since #2008 (July 2024): scores token_logprobs[ctxlen:-1]
    {"max_tokens": 0, "logprobs": 10},  # lm-eval before #2008: scores token_logprobs[ctxlen:]
], ids=["max_tokens_1", "max_tokens_0"])
def test_echo_logprob_payloads(live_server, demo_llm, wait_idle, payload):
    rows = _scored_prompts(demo_llm)
    body = {"model": "demo", "prompt": [ids for ids, _ in rows], "temperature": 0, "seed": 1234, "echo": True, **payload}
    response = requests.post(f"{live_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
    assert [choice["index"] for choice in choices] == list(range(len(rows)))

    pairs = [(chat_question(name), answer) for name, answer in DOCSTRINGS[:len(rows)]]
    expected = reference_scores(demo_llm, pairs)
    generated = payload["max_tokens"]
    for (ids, context_length), choice, (want_ll, _) in zip(rows, choices, expected):
        logprobs = choice["logprobs"]
        token_logprobs, top_logprobs = logprobs["token_logprobs"], logprobs["top_logprobs"]
        assert len(token_logprobs) == len(top_logprobs) == len(logprobs["tokens"]) == len(ids) + generated
        assert token_logprobs[0] is None and top_logprobs[0] is None
        scored = slice(context_length, len(token_logprobs) - generated)
        assert abs(sum(token_logprobs[scored]) - want_ll) <= TOLERANCE
        for value, top in zip(token_logprobs[1:], top_logprobs[1:]):
            assert 1 <= len(top) <= payload["logprobs"] + 1  # the top N plus the scored token
            assert max(top.values()) >= value - 1e-6
    wait_idle()


def test_remote_tokenizer_round_trip(live_server, demo_llm):
    """What lm-eval's RemoteTokenizer reads from /tokenizer_info, /tokenize and /detokenize."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    url = f"{live_server.url}/v1/completions"
    assert check_remote_tokenizer_support(url)
    remote = RemoteTokenizer(url, timeout=30)
    tokenizer = demo_llm.tokenizer
    text = "Return the square root of x.\n\nos.path.join(a, *p)"
    assert remote.encode(text) == tokenizer.encode(text, add_bos=False)
    assert remote.decode(tokenizer.encode(text, add_bos=False)) == text
    assert remote.eos_token == tokenizer.convert_ids_to_tokens(tokenizer.eos_token_ids[:1])[0]


def test_remote_tokenizer_special_token_ids(live_server, demo_llm):
    from lm_eval.utils import RemoteTokenizer

    remote = RemoteTokenizer(f"{live_server.url}/v1/completions", timeout=30)
    tokenizer = demo_llm.tokenizer
    assert remote.eos_token_id == tokenizer.eos_token_ids[0]
    assert remote.bos_token_id == tokenizer.bos_token_id
