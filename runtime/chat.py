"""Chat: the artifact's chat template rendered as transformers renders it, and a multi-turn
conversation that keeps the KV cache between turns (only each new turn's tokens are prefilled).

jinja2 is imported only here, when a template is rendered: a bundle that never chats needs none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime.generate import Generation, generate
from kiln.runtime.sampling import Sampler

CHAT_TEMPLATE = "chat_template.jinja"


class ChatTemplate:
    """A Hugging Face chat template. The environment is the one `apply_chat_template` builds:
    jinja2's immutable sandbox with trim_blocks and lstrip_blocks, the loopcontrols extension,
    `raise_exception` and `strftime_now` globals, and a `tojson` filter that leaves non-ASCII
    text and HTML characters alone. The special tokens (bos_token, eos_token, ...) are
    variables of the template, as transformers passes them."""

    def __init__(self, source: str, special_tokens: dict[str, Any] | None = None):
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise KilnError("chat needs the jinja2 package (pip install jinja2)") from e
        self._error = jinja2.TemplateError

        def raise_exception(message: str):
            raise jinja2.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise KilnError(f"chat template, line {e.lineno}: {e.message}") from e
        self.special = {k: v for k, v in (special_tokens or {}).items()
                        if k.endswith("_token") and isinstance(v, str)}

    def render(self, messages: Sequence[dict[str, Any]], *,
               add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text; with `add_generation_prompt`, followed
        by the opening of the assistant's turn."""
        try:
            return self._template.render(messages=list(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except self._error as e:
            raise KilnError(f"chat template: {e}") from e


def load_chat_template(art: af.Artifact) -> ChatTemplate:
    """The artifact's chat template, or a one-line error when the model has none."""
    name = art.manifest.get("chat_template")
    path = art.path / (name or CHAT_TEMPLATE)
    special = art.manifest.get("special_tokens") or {}
    if not path.is_file() and isinstance(special.get("chat_template"), str):
        return ChatTemplate(special["chat_template"], special)  # compiled before the file
    if not path.is_file():
        raise KilnError(f"{art.path}: the model has no chat template (no chat_template in its "
                        "tokenizer_config.json, no chat_template.jinja); use --prompt without "
                        "--chat")
    return ChatTemplate(path.read_text(encoding="utf-8"), special)


def chat_stop_tokens(manifest: dict[str, Any]) -> list[int]:
    """Where an assistant turn ends: the generation stop tokens and the tokenizer's eos token
    (chat templates close a turn with it even where generation_config.json names only the
    pretraining end-of-text token)."""
    ids = list(manifest.get("stop_token_ids") or [])
    eos = manifest.get("special_tokens", {}).get("eos_token_id")
    return [*ids, eos] if eos is not None and eos not in ids else ids


def messages_for(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]


@dataclass
class Conversation:
    """A chat over one Session. Each turn renders the whole conversation, tokenizes it, and
    prefills only what the cache does not already hold: the ids after the longest common
    prefix with the cached ones (the cache is cut back to that prefix when the template
    re-renders a past turn differently from how it was generated)."""

    session: Any  # kiln.runtime.session.Session
    tokenizer: Any  # tokenizers.Tokenizer
    template: ChatTemplate
    stop: Sequence[int]
    system: str | None = None
    messages: list[dict[str, str]] = field(init=False)
    cached: list[int] = field(init=False)  # the ids whose keys/values are in the cache

    def __post_init__(self) -> None:
        self.cached = []
        self.reset()

    def reset(self) -> None:
        """Start a new conversation; the cache stays, reused as far as the new ids agree with
        it (the system prompt, say)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, text: str, *, max_new_tokens: int, sampler: Sampler,
             result: Generation) -> Iterator[int]:
        """Yield the assistant's reply to `text`, token by token (`result.timing` says how
        many prompt tokens were prefilled and how many came from the cache); the reply joins
        the conversation."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.tokenizer.encode(self.template.render(messages),
                                    add_special_tokens=False).ids
        room = self.session.capacity - len(ids)
        if room < 1:
            raise ContextFull(f"the conversation is {len(ids)} tokens, the context "
                              f"{self.session.capacity}")
        reuse = min(_common_prefix(self.cached, ids), self.session.past)
        reuse = min(reuse, len(ids) - 1)  # at least one token to prefill: its logits start
        try:
            yield from generate(self.session, ids, max_new_tokens=min(max_new_tokens, room),
                                sampler=sampler, stop=self.stop, result=result, cached=reuse)
        finally:  # also when the caller stops early (a stop string)
            self._record(messages, ids, result)

    def _record(self, messages: list[dict[str, str]], ids: list[int],
                result: Generation) -> None:
        if not result.tokens:  # failed before the first token: trust nothing cached
            self.cached = []
            return
        # the cache holds the prompt and every reply token but the last (never fed back)
        self.cached = ids + result.tokens[:-1]
        reply = result.tokens[:-1] if result.stopped == "stop token" else result.tokens
        self.messages = [*messages, {"role": "assistant",
                                     "content": self.tokenizer.decode(reply)}]


class ContextFull(KilnError):
    """The conversation no longer fits the compiled context (--max-seq)."""


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
