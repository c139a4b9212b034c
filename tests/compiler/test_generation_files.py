"""Stop tokens, special tokens and chat template read from an export's files, in the order
transformers' generate reads them: generation_config.json, config.json, then the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.compiler.errors import KilnError
from kiln.compiler.generation_files import read_generation_files

#: tokenizer.json's added tokens: text -> id (what resolves an eos_token given as text)
ADDED = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "</s>": 7}


def write(folder: Path, **files: object) -> Path:
    """Write each keyword as a file: a_b_json -> a_b.json (dicts as JSON), a_jinja as is."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, content in files.items():
        name = key[: key.rindex("_")] + "." + key[key.rindex("_") + 1:]
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def tokenizer_json() -> dict:
    return {"added_tokens": [{"id": i, "content": t, "special": True} for t, i in ADDED.items()],
            "model": {"type": "BPE", "vocab": {"a": 3, "b": 4}}}


@pytest.mark.parametrize(("generation", "config", "want", "source"), [
    ({"eos_token_id": 2}, {"eos_token_id": 7}, [2], "generation_config.json"),
    ({"eos_token_id": [2, 0, 2]}, None, [2, 0], "generation_config.json"),
    ({"bos_token_id": 1}, {"eos_token_id": 7}, [7], "config.json"),  # no eos there: next file
    ({"eos_token_id": None}, {"eos_token_id": [7, 2]}, [7, 2], "config.json"),
    (None, {"eos_token_id": None}, [1], "tokenizer_config.json + tokenizer.json"),
])
def test_stop_tokens_precedence(tmp_path, generation, config, want, source):
    files = {"tokenizer_json": tokenizer_json(),
             "tokenizer_config_json": {"eos_token": "<|im_start|>", "bos_token": "<|im_start|>"}}
    if generation is not None:
        files["generation_config_json"] = generation
    if config is not None:
        files["config_json"] = config
    g = read_generation_files(write(tmp_path, **files))
    assert (g.stop_token_ids, g.stop_tokens_from) == (want, source)
    # the tokenizer's own eos is recorded whatever decides the stop tokens
    assert g.special_tokens["eos_token"] == "<|im_start|>"
    assert g.special_tokens["eos_token_id"] == 1


def test_tokenizer_eos_forms(tmp_path):
    """An AddedToken dict, an explicit id (kiln's exporter), special_tokens_map.json."""
    dict_form = write(tmp_path / "a", tokenizer_json=tokenizer_json(), tokenizer_config_json={
        "eos_token": {"content": "</s>", "special": True}})
    assert read_generation_files(dict_form).stop_token_ids == [7]
    with_id = write(tmp_path / "b", tokenizer_config_json={"eos_token": "<|im_end|>",
                                                            "eos_token_id": 2})
    g = read_generation_files(with_id)
    assert (g.stop_token_ids, g.stop_tokens_from) == ([2], "tokenizer_config.json")
    mapped = write(tmp_path / "c", tokenizer_json=tokenizer_json(),
                   special_tokens_map_json={"eos_token": "<|endoftext|>"})
    g = read_generation_files(mapped)
    assert (g.stop_token_ids, g.stop_tokens_from) == \
        ([0], "special_tokens_map.json + tokenizer.json")
    assert read_generation_files(tmp_path / "nothing").stop_token_ids == []


def test_bad_eos_value_is_one_line(tmp_path):
    folder = write(tmp_path, generation_config_json={"eos_token_id": "2"})
    with pytest.raises(KilnError, match=r"generation_config.json: eos_token_id '2' is not"):
        read_generation_files(folder)


def test_chat_template_sources(tmp_path):
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    folder = write(tmp_path / "a", tokenizer_config_json={"chat_template": inline})
    assert read_generation_files(folder).chat_template == inline
    # chat_template.jinja (newer transformers) wins over tokenizer_config.json's
    write(folder, chat_template_jinja="from the file")
    assert read_generation_files(folder).chat_template == "from the file"
    named = write(tmp_path / "b", tokenizer_config_json={"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]})
    assert read_generation_files(named).chat_template == "chat"
    assert read_generation_files(tmp_path / "c").chat_template is None
