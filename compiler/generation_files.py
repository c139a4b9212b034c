"""What an export ships beside its ONNX file for generation: stop tokens, special tokens, the chat
template (generation_config.json, config.json, tokenizer_config.json, chat_template.jinja,
tokenizer.json), read the way transformers' `generate` and onnxruntime-genai read them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.compiler.errors import KilnError

#: where the stop tokens come from, first found wins: generation_config.json is what
#: transformers' generate uses (config.json only when it is absent) and what onnxruntime-genai
#: copies into genai_config.json; the tokenizer's eos token is the last resort
STOP_SOURCES = ("generation_config.json", "config.json")
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
CHAT_TEMPLATE = "chat_template.jinja"


@dataclass
class GenerationFiles:
    stop_token_ids: list[int] = field(default_factory=list)
    stop_tokens_from: str | None = None  # the file they were read from
    special_tokens: dict[str, Any] = field(default_factory=dict)  # strings and their ids
    chat_template: str | None = None


def read_generation_files(folder: Path) -> GenerationFiles:
    """Stop tokens, special tokens and chat template of the export in `folder`."""
    folder = Path(folder)
    vocab = _token_ids(folder / "tokenizer.json")
    tok_config = _json(folder / "tokenizer_config.json") or {}
    special_map = _json(folder / "special_tokens_map.json") or {}
    special: dict[str, Any] = {}
    eos_from = None
    for key in SPECIAL:
        text = _content(tok_config.get(key))
        source = "tokenizer_config.json"
        if text is None:
            text, source = _content(special_map.get(key)), "special_tokens_map.json"
        if text is not None:
            special[key] = text
        tid = tok_config.get(f"{key}_id")  # kiln's exporter writes the ids too
        if tid is None and text is not None:
            tid, source = vocab.get(text), f"{source} + tokenizer.json"
        if tid is not None:
            special[f"{key}_id"] = int(tid)
            eos_from = source if key == "eos_token" else eos_from
    out = GenerationFiles(special_tokens=special, chat_template=read_chat_template(folder))
    for name in STOP_SOURCES:
        ids = _ids((_json(folder / name) or {}).get("eos_token_id"), folder / name)
        if ids:
            out.stop_token_ids, out.stop_tokens_from = ids, name
            return out
    if "eos_token_id" in special:
        out.stop_token_ids, out.stop_tokens_from = [special["eos_token_id"]], eos_from
    return out


def _ids(value: Any, path: Path) -> list[int] | None:
    """eos_token_id as the file has it: an int or a list of ints (None/absent: not given)."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise KilnError(f"{path}: eos_token_id {value!r} is not a token id or a list of them")
    return list(dict.fromkeys(values))


def read_chat_template(folder: Path) -> str | None:
    """chat_template.jinja (newer exports), else tokenizer_config.json's chat_template: a string,
    or a list of named templates of which "default" is the chat one."""
    path = Path(folder) / CHAT_TEMPLATE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = (_json(Path(folder) / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def _content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_ids(path: Path) -> dict[str, int]:
    """Token text -> id from a tokenizers JSON file: added (special) tokens, then the vocab."""
    data = _json(path) or {}
    ids = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])
           if isinstance(t, dict) and "content" in t and "id" in t}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for text, i in vocab.items():
            ids.setdefault(text, int(i))
    return ids


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else None
