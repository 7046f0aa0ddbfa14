"""Reward models offline: the prompt format, the weights, the head against transformers, the engine path."""

from __future__ import annotations

import pytest
import torch

from nemolite.engine.llm import LLM
from nemolite.engine.sampling_params import SamplingParams
from nemolite.errors import NemoliteError
from nemolite.reward import (ATTRIBUTES, DEFAULT_WEIGHTS, attribute_names, resolve_weights, reward_prompt,
                             weighted_score)

CONVERSATION = [{"role": "user", "content": "what does the model return"},
                {"role": "assistant", "content": "the model returns a value when the list is empty"}]


def conversations(count: int) -> list[list[dict]]:
    words = "python reads files from disk each line ends with a newline character numbers like 42".split()
    return [[{"role": "user", "content": " ".join(words[i % 5:i % 5 + 4])},
             {"role": "assistant", "content": " ".join(words[(3 * i) % 7:(3 * i) % 7 + 2 + i % 6])}]
            for i in range(count)]


@pytest.fixture(scope="module")
def reward_llm(reward_model_dir) -> LLM:
    return LLM(reward_model_dir, dtype="float32", device="cpu")


def test_reward_prompt_is_nemo_aligners_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"},
                {"role": "assistant", "content": "No."}]
    assert reward_prompt(messages) == ("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi?\n"
                                       "<extra_id_1>Assistant\nHello.\n<extra_id_1>User\nMore?\n"
                                       "<extra_id_1>Assistant\nNo.\n<extra_id_2>")
    assert reward_prompt(CONVERSATION).startswith("<extra_id_0>System\n\n<extra_id_1>User\n")
    with pytest.raises(NemoliteError, match="last message must have role 'assistant'"):
        reward_prompt(CONVERSATION[:1])


def test_weights_and_score():
    assert resolve_weights(None) == list(DEFAULT_WEIGHTS)
    assert resolve_weights({"helpfulness": 1, "verbosity": -0.5}) == [0, 0, 0, 0, 1, 0, 0, 0, -0.5]
    assert resolve_weights(None, attribute_names(2)) == [0.5, 0.5]
    values = [9, 9, 9, 9, 3.0, 4.0, 2.0, 1.0, 2.5]
    assert weighted_score(values, DEFAULT_WEIGHTS) == pytest.approx(
        0.3 * 3 + 0.74 * 4 + 0.46 * 2 + 0.47 * 1 - 0.33 * 2.5)
    with pytest.raises(NemoliteError, match="give 9 attribute weights"):
        resolve_weights([1, 2])
    with pytest.raises(NemoliteError, match="unknown reward attributes \\['kindness'\\]"):
        resolve_weights({"kindness": 1})
    for bad in (float("nan"), float("inf"), 1e308):  # 1e308 would make the score inf, which JSON cannot hold
        with pytest.raises(NemoliteError, match="numbers in"):
            resolve_weights([bad] * 9)


def test_sequence_classification_checkpoint_scores_like_transformers(reward_model_dir, reward_llm):
    from transformers import NemotronForSequenceClassification

    reference = NemotronForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32).eval()
    assert reward_llm.config.reward_attributes == ATTRIBUTES  # HF's LABEL_i placeholders → the 340B's names
    batch = conversations(6)
    scored = reward_llm.reward(batch, use_tqdm=False)
    for conversation, result in zip(batch, scored):
        ids = reward_llm.tokenizer.encode(reward_prompt(conversation), add_bos=False)
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0]
        assert torch.allclose(torch.tensor(list(result["attributes"].values())), logits, atol=1e-4)
        assert result["score"] == pytest.approx(float(logits @ torch.tensor(DEFAULT_WEIGHTS)), abs=1e-4)


def test_named_labels_name_the_attributes(tmp_path):
    from tests.conftest import make_reward_model

    directory = make_reward_model(tmp_path / "rm", num_labels=2, id2label={0: "safety", 1: "style"})
    llm = LLM(directory, dtype="float32", device="cpu")
    result = llm.reward(CONVERSATION, weights={"style": 1.0}, use_tqdm=False)[0]
    assert list(result["attributes"]) == ["safety", "style"]
    assert result["score"] == pytest.approx(result["attributes"]["style"])


def test_rewards_are_the_same_alone_batched_and_preempted(reward_model_dir, reward_llm):
    """fp32: a conversation's reward does not depend on what else runs, nor on being recomputed after
    preemption under a KV budget too small for the batch."""
    batch = conversations(24)
    alone = [reward_llm.reward(c, use_tqdm=False)[0]["attributes"] for c in batch[:4]]
    together = [r["attributes"] for r in reward_llm.reward(batch, use_tqdm=False)]
    for single, batched in zip(alone, together):
        assert batched == pytest.approx(single, abs=1e-5)
    tight = LLM(reward_model_dir, dtype="float32", device="cpu", kv_cache_gb=4.5e-5, block_size=4,
                max_num_batched_tokens=32)
    assert tight.engine.block_manager.num_blocks < 24 * 4
    constrained = [r["attributes"] for r in tight.reward(batch, use_tqdm=False)]
    for expected, got in zip(together, constrained):
        assert got == pytest.approx(expected, abs=1e-5)


def test_reward_and_generation_requests_go_to_the_right_model(reward_llm, nemotron_dir):
    with pytest.raises(NemoliteError, match="this is a reward model"):
        reward_llm.generate("hello", SamplingParams(max_tokens=4), use_tqdm=False)
    language_model = LLM(nemotron_dir, dtype="float32", device="cpu", kv_cache_gb=0.01)
    with pytest.raises(NemoliteError, match="no reward head"):
        language_model.reward(CONVERSATION, use_tqdm=False)
    with pytest.raises(NemoliteError, match="n must be 1"):
        SamplingParams(reward=True, n=2)


def test_demo_reward_model_prefers_the_docstring_to_shuffled_words():
    """The bundled demo reward model (scripts/train_demo_reward_model.py) ranks a real answer above
    the same words shuffled and above an unfinished one."""
    from nemolite.demo import DEMO_REWARD_MODEL_PATH

    llm = LLM(DEMO_REWARD_MODEL_PATH, dtype="float32", device="cpu", kv_cache_gb=0.05)
    question = {"role": "user", "content": "What does os.path.join do?"}
    answer = ("Join two or more pathname components, inserting '/' as needed. If any component is an absolute "
              "path, all previous path components will be discarded.")
    words = answer.split()
    shuffled = " ".join(words[1::2] + words[::2])
    scores = [r["score"] for r in llm.reward([[question, {"role": "assistant", "content": text}]
                                              for text in (answer, shuffled, " ".join(words[:3]))], use_tqdm=False)]
    assert scores[0] > scores[1] and scores[0] > scores[2]


def test_reward_weights_flag():
    from nemolite.cli import _reward_weights

    assert _reward_weights(None, ATTRIBUTES) is None
    assert _reward_weights("0,0,0,0,1,1,1,1,-1", ATTRIBUTES) == [0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert _reward_weights("helpfulness=0.5, verbosity=-1", ATTRIBUTES) == [0, 0, 0, 0, 0.5, 0, 0, 0, -1]
    with pytest.raises(NemoliteError, match="give numbers"):
        _reward_weights("helpful", ATTRIBUTES)
    with pytest.raises(NemoliteError, match="for reward models"):
        _reward_weights("1", ())
