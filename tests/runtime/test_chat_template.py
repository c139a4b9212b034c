"""kiln's chat template rendering against transformers' apply_chat_template, and the text
stream that holds back stop strings and partial characters."""

from __future__ import annotations

import pytest

from kiln.compiler.errors import KilnError
from kiln.runtime.chat import ChatTemplate, chat_stop_tokens
from kiln.runtime.cli import TextStream, stop_tokens
from tests.runtime.chat_fixtures import SMOLLM2_TEMPLATE, STRICT_TEMPLATE, byte_tokenizer

SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
           "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "Zürich? \"quoted\" <b>&</b>"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "  spaced\n\tout  "}],
]


def hf_tokenizer(template: str):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(),
                                                chat_template=template, **SPECIAL)


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, STRICT_TEMPLATE],
                         ids=["smollm2", "strict"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    if template == STRICT_TEMPLATE and messages[0]["role"] == "system":
        messages = messages[1:]
    want = hf_tokenizer(template).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ChatTemplate(template, SPECIAL).render(messages,
                                                 add_generation_prompt=add_generation_prompt)
    assert got == want


def test_raise_exception_and_loop_controls_as_transformers():
    from jinja2 import TemplateError

    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(TemplateError, match="roles must alternate"):
        hf_tokenizer(STRICT_TEMPLATE).apply_chat_template(bad, tokenize=False)
    with pytest.raises(KilnError, match="chat template: roles must alternate"):
        ChatTemplate(STRICT_TEMPLATE, SPECIAL).render(bad)
    cut = [{"role": "user", "content": "a"}, {"role": "tool", "content": "never shown"}]
    got = ChatTemplate(STRICT_TEMPLATE, SPECIAL).render(cut)
    assert "never shown" not in got
    assert got == hf_tokenizer(STRICT_TEMPLATE).apply_chat_template(
        cut, tokenize=False, add_generation_prompt=True)


def test_template_is_sandboxed():
    """The immutable sandbox: a template cannot reach Python internals or mutate its input."""
    with pytest.raises(KilnError, match="chat template"):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(KilnError, match="chat template"):
        ChatTemplate("{{ messages.append(1) }}").render([])


def test_syntax_error_is_one_line():
    with pytest.raises(KilnError, match=r"chat template, line 1: "):
        ChatTemplate("{% for m in messages %}")


def test_stop_token_choice():
    manifest = {"stop_token_ids": [5], "special_tokens": {"eos_token_id": 2}}
    assert stop_tokens(manifest) == [5]
    assert stop_tokens(manifest, chat=True) == chat_stop_tokens(manifest) == [5, 2]
    assert stop_tokens(manifest, ignore_eos=True, extra=[9, 9]) == [9]
    assert stop_tokens(manifest, extra=[9]) == [5, 9]
    # an artifact from before stop_token_ids: the tokenizer's eos
    assert stop_tokens({"special_tokens": {"eos_token_id": 2}}) == [2]


def test_text_stream_holds_back_stop_strings_and_partial_characters():
    tok = byte_tokenizer()
    ids = tok.encode("Zü END here").ids  # "ü" is two byte tokens
    stream = TextStream(tok, ["END"])
    shown = []
    for i in range(1, len(ids) + 1):
        shown.append(stream.update(ids[:i]))
        assert "\ufffd" not in shown[-1]
        if stream.done:
            break
    shown.append(stream.flush())
    assert stream.done and "".join(shown) == stream.text == "Zü "
    assert ids[:i] == tok.encode("Zü EN").ids + tok.encode("D").ids  # stopped on the D
    plain = TextStream(tok)
    assert "".join(plain.update(ids[:i]) for i in range(1, len(ids) + 1)) + plain.flush() == \
        "Zü END here"
