"""NeMo's PUT /generate, checked with `requests` and the payload of NVIDIA's Nemotron-4-340B call_server.py."""

from __future__ import annotations

import math

import pytest
import requests

from nemolite import SamplingParams

PROMPT = "Return the"


def put(live_server, payload: dict) -> requests.Response:
    return requests.put(f"{live_server.url}/generate", json=payload, timeout=60)


def test_model_card_call_server_payload(live_server, demo_llm, wait_idle):
    # call_server.py from the Nemotron-4-340B-Instruct model card, verbatim but for the URL's port.
    prompt = "<extra_id_0>System\n\n<extra_id_1>User\nWhat does len return?\n<extra_id_1>Assistant\n"
    data = {"sentences": [prompt], "tokens_to_generate": 1024, "temperature": 1.0, "add_BOS": False, "top_k": 0,
            "top_p": 1.0, "greedy": True, "all_probs": False, "repetition_penalty": 1.0,
            "min_tokens_to_generate": 1, "end_strings": ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]}
    headers = {"Content-Type": "application/json"}
    resp = requests.put(f"{live_server.url}/generate", json=data, headers=headers)
    assert resp.status_code == 200
    sentence = resp.json()["sentences"][0]
    assert sentence.startswith(prompt)
    completion = sentence[len(prompt):]
    ids = demo_llm.tokenizer.encode(prompt, add_bos=False)
    # 1024 tokens do not fit beside the prompt: NeMo clamps to the context instead of failing.
    reference = demo_llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        temperature=0, max_tokens=1024 - len(ids), min_tokens=1, stop=data["end_strings"],
        stop_token_ids=[demo_llm.tokenizer.token_to_id("<extra_id_1>")], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert completion == reference.text
    assert completion.strip()
    wait_idle()


def test_greedy_batch_equals_llm_generate_and_tokens_line_up(live_server, demo_llm):
    prompts = ["Return the", "The default value of", "Raise ValueError if"]
    body = put(live_server, {"sentences": prompts, "tokens_to_generate": 24, "greedy": True, "end_strings": []}).json()
    tokenizer = demo_llm.tokenizer
    references = demo_llm.generate(prompt_token_ids=[tokenizer.encode(p, add_bos=False) for p in prompts],
                                   sampling_params=SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for prompt, sentence, tokens, ids, offsets, reference in zip(
            prompts, body["sentences"], body["tokens"], body["token_ids"], body["offsets"], references):
        assert sentence == prompt + reference.outputs[0].text
        assert ids == reference.prompt_token_ids + reference.outputs[0].token_ids
        assert tokens == tokenizer.convert_ids_to_tokens(ids)
        assert offsets == sorted(offsets) and len(offsets) == len(ids)
        decoded = tokenizer.decode(ids)
        for start, end, token_id in zip(offsets, offsets[1:] + [len(decoded)], ids):
            # Each token's span holds its text (decoded alone, SentencePiece drops the leading space).
            assert decoded[start:end].strip() == tokenizer.decode([token_id]).strip()
    assert body["logprob"] is None and "full_logprob" not in body


def test_compute_logprob_and_all_probs_match_the_engine(live_server, demo_llm):
    body = put(live_server, {"sentences": [PROMPT], "tokens_to_generate": 6, "greedy": True, "compute_logprob": True,
                             "all_probs": True, "end_strings": []}).json()
    ids = body["token_ids"][0]
    logprob, full = body["logprob"][0], body["full_logprob"][0]
    assert len(logprob) == len(ids) - 1 and len(full) == len(ids) - 1
    assert all(len(row) == demo_llm.config.vocab_size for row in full)
    # The engine's own prompt logprobs of the whole sequence score every token the same way.
    reference = demo_llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    expected = [entry[token].logprob for entry, token in zip(reference.prompt_logprobs[1:], ids[1:])]
    assert logprob == pytest.approx(expected, abs=1e-4)
    for position, row in enumerate(full):
        assert math.fsum(math.exp(v) for v in row) == pytest.approx(1.0, abs=1e-3)
        assert row[ids[position + 1]] == pytest.approx(logprob[position], abs=1e-5)


def test_end_strings_stay_in_the_sentence_and_stop_it(live_server, demo_llm):
    free = put(live_server, {"sentences": [PROMPT], "tokens_to_generate": 40, "greedy": True,
                             "end_strings": []}).json()["sentences"][0][len(PROMPT):]
    word = free.split()[1]  # a word the greedy continuation will write
    stopped = put(live_server, {"sentences": [PROMPT], "tokens_to_generate": 40, "greedy": True,
                                "end_strings": [word]}).json()["sentences"][0][len(PROMPT):]
    assert stopped.endswith(word) and free.startswith(stopped) and len(stopped) < len(free)


def test_seeded_sampling_is_reproducible(live_server):
    payload = {"sentences": [PROMPT] * 2, "tokens_to_generate": 16, "temperature": 1.0, "top_k": 50, "top_p": 0.9,
               "random_seed": 1234, "end_strings": []}
    first, second = put(live_server, payload).json(), put(live_server, payload).json()
    assert first["sentences"] == second["sentences"]
    assert first["sentences"][0] == first["sentences"][1]


@pytest.mark.parametrize("payload, message", [
    ({"sentences": ["a"], "tokens_to_generate": 0}, "tokens_to_generate must be an integer greater than 0"),
    ({"sentences": ["a"], "tokens_to_generate": "8"}, "tokens_to_generate must be an integer greater than 0"),
    ({"sentences": ["a"], "temperature": 0}, "temperature must be a positive number less than or equal to 100.0"),
    ({"sentences": ["a"], "temperature": True}, "temperature must be a positive number less than or equal to 100.0"),
    ({"sentences": ["a"], "top_p": 1.5}, "top_p must be a positive number less than or equal to 1.0"),
    ({"sentences": ["a"], "top_k": -1}, "top_k must be a positive integer number"),
    ({"sentences": ["a"], "greedy": "yes"}, "greedy must be a boolean value"),
    ({"sentences": ["a"], "add_BOS": 1}, "add_BOS must be a boolean value"),
    ({"sentences": ["a"], "all_probs": None}, "all_probs must be a boolean value"),
    ({"sentences": ["a"], "compute_logprob": "no"}, "compute_logprob must be a boolean value"),
    ({"sentences": ["a"], "repetition_penalty": 0.5}, "repetition_penalty must be a positive number no less than 1.0"),
    ({"sentences": ["a"], "end_strings": "stop"}, "expect end_strings to be a list of strings"),
    ({"sentences": ["a"], "min_tokens_to_generate": -1}, "min_tokens_to_generate must be an integer no less than 0"),
    ({"sentences": ["a"], "random_seed": -5}, "random_seed must be a positive integer number or None"),
    ({"sentences": ["a"] * 129}, "Maximum number of sentences is 128"),
    ({"tokens_to_generate": 8}, "sentences is required"),
    ({"sentences": "a"}, "sentences must be a non-empty list"),
    ({"sentences": ["a" * 20000]}, "context"),
])
def test_bad_requests_get_nemo_messages_with_400(live_server, payload, message):
    response = put(live_server, payload)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_not_json_is_a_400(live_server):
    response = requests.put(f"{live_server.url}/generate", data=b"{\"sentences\": [", timeout=10)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    response = requests.put(f"{live_server.url}/generate", data=b"\xff\xfe{}", timeout=10)
    assert response.status_code == 400
