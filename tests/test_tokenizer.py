from __future__ import annotations

import json

import pytest

from nemolite.errors import NemoliteError
from nemolite.tokenizer import IncrementalDetokenizer, Tokenizer, nemotron_chat_prompt
from tests.conftest import write_hf_tokenizer, write_sentencepiece

MULTIBYTE = "café 東京 🙂 naïve ümlaut жß🚀"  # the last three are unseen: byte fallback


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    write_sentencepiece(directory)
    return Tokenizer.from_pretrained(directory, model_type="nemotron", bos_token_id=2, eos_token_ids=[3])


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    write_hf_tokenizer(directory)
    return Tokenizer.from_pretrained(directory, model_type="llama", bos_token_id=0, eos_token_ids=[4])


def test_sentencepiece_bos_rules(sp_tokenizer):
    assert sp_tokenizer.bos_token_id == 2 and sp_tokenizer.eos_token_ids == [3]
    plain = sp_tokenizer.encode("the model", add_bos=False)
    assert sp_tokenizer.encode("the model") == [2, *plain]  # add_bos_token: true in tokenizer_config
    assert sp_tokenizer.encode("the model", add_bos=True) == [2, *plain]
    assert sp_tokenizer.decode(sp_tokenizer.encode("the model")) == "the model"


def test_hf_tokenizer_bos_from_post_processor(hf_tokenizer):
    plain = hf_tokenizer.encode("the model", add_bos=False)
    assert 0 not in plain
    assert hf_tokenizer.encode("the model") == [0, *plain]
    assert hf_tokenizer.eos_token_ids == [4]
    assert hf_tokenizer.decode([0, *plain]) == "the model"
    assert hf_tokenizer.decode([0, *plain], skip_special_tokens=False) == "<|begin_of_text|>the model"


@pytest.mark.parametrize("which", ["sp_tokenizer", "hf_tokenizer"])
def test_roundtrip_and_streaming_keep_multibyte_characters(which, request):
    tokenizer = request.getfixturevalue(which)
    prompt = tokenizer.encode("the string holds", add_bos=False)
    ids = tokenizer.encode(" " + MULTIBYTE, add_bos=False)
    assert tokenizer.decode(ids) == " " + MULTIBYTE if which == "hf_tokenizer" else MULTIBYTE
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.push(token) for token in ids]
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == " " + MULTIBYTE
    assert sum(1 for d in deltas if d == "") > 0  # byte pieces of one character were held back


def test_nemotron_chat_format(sp_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = ("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello.\n"
                "<extra_id_1>User\nBye\n<extra_id_1>Assistant\n")
    assert sp_tokenizer.apply_chat_template(messages) == expected
    assert nemotron_chat_prompt([{"role": "user", "content": "Hey"}]) == \
        "<extra_id_0>System\n\n<extra_id_1>User\nHey\n<extra_id_1>Assistant\n"
    stop_strings, stop_ids = sp_tokenizer.chat_stop()
    assert stop_strings == ["<extra_id_1>"] and stop_ids == [sp_tokenizer.token_to_id("<extra_id_1>")]
    assert stop_ids[0] in sp_tokenizer.encode("Hi\n<extra_id_1>", add_bos=False)  # one piece, not characters


def test_checkpoint_jinja_template(hf_tokenizer):
    text = hf_tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U "}])
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert hf_tokenizer.encode(text, add_bos=False).count(0) == 1  # the template's BOS, not a second one


def test_chat_template_file_and_list_form(tmp_path):
    write_hf_tokenizer(tmp_path, chat_template=None)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    (tmp_path / "chat_template.jinja").unlink()
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "D"


def test_no_template_for_llama_is_a_clear_error(tmp_path):
    write_hf_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(NemoliteError, match="no chat template"):
        Tokenizer.from_pretrained(tmp_path, model_type="llama").apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
])
def test_bad_messages(sp_tokenizer, messages, message):
    with pytest.raises(NemoliteError, match=message):
        sp_tokenizer.apply_chat_template(messages)


def test_template_raise_exception_becomes_nemolite_error(tmp_path):
    write_hf_tokenizer(tmp_path, chat_template="{{ raise_exception('only user messages') }}")
    with pytest.raises(NemoliteError, match="only user messages"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer(tmp_path):
    with pytest.raises(NemoliteError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
