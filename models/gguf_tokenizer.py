"""Hugging Face `tokenizers` tokenizer (gpt2-style byte-level BPE) built from a GGUF's vocab."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from kiln.models.gguf_reader import GGUFModel

_CONTROL = 3  # llama.cpp token type: control (special) token
# llama.cpp pre-tokenizer names whose regex splits every digit before the gpt2 split
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "qwen2"}


def build_tokenizer(model: GGUFModel) -> Tokenizer:
    if model.meta("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer model {model.meta('tokenizer.ggml.model')!r}: need 'gpt2'")
    tokens: list[str] = model.meta("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in model.meta("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if model.meta("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = model.meta("tokenizer.ggml.token_type")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL])
    return tok


def tokenizer_config(model: GGUFModel) -> dict[str, Any]:
    """tokenizer_config.json content: special tokens, bos/eos ids, chat template."""
    tokens = model.meta("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        idx = model.meta(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": token("bos"), "eos_token": token("eos"),
        "unk_token": token("unknown"), "pad_token": token("padding"),
        "bos_token_id": model.meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": model.meta("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(model.meta("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "model_max_length": int(model.meta(f"{model.arch}.context_length", 2048)),
        "chat_template": model.meta("tokenizer.chat_template"),
    }


def generation_config(model: GGUFModel) -> dict[str, Any]:
    """generation_config.json content, as Hugging Face's export of the model has it: the ids
    generation starts with, stops on and pads with."""
    keys = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}
    return {key: int(idx) for key, name in keys.items()
            if (idx := model.meta(f"tokenizer.ggml.{name}_token_id")) is not None}


def write_tokenizer(model: GGUFModel, out_dir: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json; returns the
    tokenizer.json path."""
    path = out_dir / "tokenizer.json"
    build_tokenizer(model).save(str(path))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(model), indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps(generation_config(model), indent=2) + "\n")
    return path


def render_chat(template: str, messages: list[dict[str, str]], *,
                add_generation_prompt: bool = True, **special: str) -> str:
    """Render a Hugging Face chat template the way `apply_chat_template` does
    (kiln.runtime.chat.ChatTemplate); `special`: bos_token, eos_token, ... as strings."""
    from kiln.runtime.chat import ChatTemplate

    return ChatTemplate(template, special).render(messages,
                                                  add_generation_prompt=add_generation_prompt)
