"""A byte-level tokenizer for the 256-token test models and the chat templates the tests use."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

#: SmolLM2-135M-Instruct's chat template, as its GGUF and tokenizer_config.json carry it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

#: block tags on lines of their own (trim_blocks / lstrip_blocks matter), bos_token,
#: raise_exception, tojson on non-ASCII text, a loop control
STRICT_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'tool' %}
        {% break %}
    {% endif %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('roles must alternate user/assistant') }}
    {% endif %}
    [{{ message['role'] }}] {{ message['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}
    [assistant]
{% endif %}
"""

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _bytes_to_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are
    shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shift = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(shift)) for b in range(256)}


def byte_tokenizer() -> Tokenizer:
    """Ids 0-2: <|endoftext|>, <|im_start|>, <|im_end|>; id b (3-255): byte b (bytes 0-2,
    control characters no test text holds, have no id)."""
    chars = _bytes_to_chars()
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {chars[b]: b for b in range(3, 256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok
