"""What `kiln run` and `kiln chat` do, kept in the runtime so a deployed bundle can call it without
the compiler: tokenize, generate with streaming output, stop where the model says, report speed."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime.generate import Generation, generate
from kiln.runtime.sampling import Sampler
from kiln.runtime.session import Session


def load_tokenizer(artifact: Path):
    path = Path(artifact) / af.TOKENIZER
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:  # a numpy-only host: token ids in and out
        return None

    return Tokenizer.from_file(str(path))


def stop_tokens(manifest: dict, *, chat: bool = False, ignore_eos: bool = False,
                extra: Iterable[int] = ()) -> list[int]:
    """The ids that end generation: the model's (manifest's stop_token_ids, recorded at compile
    time from generation_config.json, config.json or the tokenizer; in a chat, the turn's end
    too) unless `ignore_eos`, plus the `extra` ones asked for (kept even with `ignore_eos`)."""
    from kiln.runtime.chat import chat_stop_tokens

    if ignore_eos:
        ids = []
    elif chat:
        ids = chat_stop_tokens(manifest)
    elif "stop_token_ids" in manifest:
        ids = list(manifest["stop_token_ids"])
    else:  # artifacts compiled before stop tokens were recorded
        eos = manifest.get("special_tokens", {}).get("eos_token_id")
        ids = [eos] if eos is not None else []
    return list(dict.fromkeys([*ids, *extra]))


class TextStream:
    """The text of the tokens generated so far, released as it becomes final: a trailing
    partial UTF-8 character, or the start of a stop string, is held back until the next token
    decides it. `done` is set when a stop string appears; the text ends before it."""

    def __init__(self, tokenizer, stop_texts: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, [s for s in stop_texts if s]
        self.text, self.shown, self.done = "", 0, False

    def update(self, tokens: list[int]) -> str:
        """Feed all tokens so far; returns the text newly final."""
        text = self.tokenizer.decode(tokens)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.done = text[:cut], True
            return self._release(cut)
        self.text = text
        hold = max((len(s) - 1 for s in self.stops), default=0)
        end = len(text) - hold
        while end > self.shown and text[end - 1] == "\ufffd":  # bytes of a character to come
            end -= 1
        return self._release(end)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        new = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return new


def run_generation(artifact: Path, *, prompt: str | None, prompt_ids: str | None,
                   max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   seed: int, threads: int | None, synthetic_weights: int | None,
                   as_json: bool, chat: bool = False, system: str | None = None,
                   ignore_eos: bool = False, stop_token_ids: Sequence[int] = (),
                   stop_texts: Sequence[str] = (), out: TextIO | None = None,
                   err: TextIO | None = None) -> Generation:
    """`kiln run`: one prompt (with `chat`, as the user's turn of a conversation rendered by
    the model's chat template, `system` its system message), streamed to `out`."""
    # the streams are looked up per call: a default bound at import time would keep writing to
    # whatever sys.stdout was then (a test runner's long-closed capture, say)
    out, err = out or sys.stdout, err or sys.stderr
    if (prompt is None) == (prompt_ids is None):
        raise KilnError("give exactly one of --prompt and --prompt-ids")
    if chat and prompt is None:
        raise KilnError("--chat takes --prompt TEXT (the user's message), not --prompt-ids")
    if system is not None and not chat:
        raise KilnError("--system needs --chat")
    session = Session.load(artifact, threads=threads, synthetic_weights=synthetic_weights)
    tok = load_tokenizer(artifact)
    if prompt is not None and tok is None:
        raise KilnError(f"{artifact}: no tokenizer.json (or no tokenizers package here); "
                        "use --prompt-ids")
    if stop_texts and tok is None:
        raise KilnError("--stop TEXT needs the artifact's tokenizer; use --stop-token ID")
    manifest = session.artifact.manifest
    stop = stop_tokens(manifest, chat=chat, ignore_eos=ignore_eos, extra=stop_token_ids)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    result = Generation()
    if chat:
        from kiln.runtime.chat import Conversation, load_chat_template

        conv = Conversation(session, tok, load_chat_template(session.artifact), stop, system)
        tokens = conv.turn(prompt, max_new_tokens=max_new_tokens, sampler=sampler,
                           result=result)
        n_prompt = None
    else:
        ids = tok.encode(prompt).ids if prompt is not None else _parse_ids(prompt_ids)
        tokens = generate(session, ids, max_new_tokens=max_new_tokens, sampler=sampler,
                          stop=stop, result=result)
        n_prompt = len(ids)
    stream = TextStream(tok, stop_texts) if tok is not None else None
    _consume(tokens, result, stream, out if not as_json else None)
    text = stream.text if stream is not None else None
    t = result.timing
    if as_json:
        out.write(json.dumps({"prompt_tokens": n_prompt or t.prompt_tokens,
                              "tokens": result.tokens, "text": text,
                              "stopped": result.stopped, "stop_token_ids": stop,
                              "threads": session.threads,
                              "prefill_tok_s": round(t.prefill_tok_s, 2),
                              "decode_tok_s": round(t.decode_tok_s, 2),
                              "time_to_first_token_s": round(t.first_token_s, 4)}) + "\n")
    else:
        if tok is None:
            out.write(",".join(map(str, result.tokens)))
        out.write("\n")
        err.write(stats_line(result, session.threads) + "\n")
    return result


def _consume(tokens: Iterable[int], result: Generation, stream: TextStream | None,
             out: TextIO | None) -> None:
    """Run the generation, writing final text to `out` as it comes; a stop string ends it."""
    for _ in tokens:
        if stream is None:
            continue
        new = stream.update(result.tokens)
        if out is not None and new:
            out.write(new)
            out.flush()
        if stream.done:
            result.stopped = "stop text"
            break
    if stream is not None:
        new = stream.flush()
        if out is not None and new:
            out.write(new)


def stats_line(result: Generation, threads: int | None) -> str:
    t = result.timing
    cached = f" ({t.cached_tokens} more cached)" if t.cached_tokens else ""
    return (f"prefill {t.prompt_tokens} tokens{cached}: {t.prefill_tok_s:.1f} tok/s, time to "
            f"first token {t.first_token_s * 1e3:.0f} ms; decode {t.decode_tokens} tokens: "
            f"{t.decode_tok_s:.1f} tok/s; "
            + (f"{threads} thread{'s' if threads != 1 else ''}" if threads else "GPU"))


def _parse_ids(prompt_ids: str) -> list[int]:
    try:
        ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
    except ValueError as e:
        raise KilnError(f"--prompt-ids: not a list of integers: {prompt_ids!r}") from e
    huge = [i for i in ids if not -(2**63) <= i < 2**63]
    if huge:
        raise KilnError(f"--prompt-ids: token id {huge[0]} out of range (not a vocabulary id)")
    return ids


def run_chat(artifact: Path, *, system: str | None, max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, seed: int, threads: int | None,
             synthetic_weights: int | None = None, ignore_eos: bool = False,
             stop_token_ids: Sequence[int] = (), stop_texts: Sequence[str] = (),
             stdin: TextIO | None = None, out: TextIO | None = None,
             err: TextIO | None = None) -> int:
    """`kiln chat`: read a user turn per line, stream the reply; the KV cache carries over
    between turns. `/reset` starts a new conversation, `/exit` (or end of input, or Ctrl-C at
    the prompt) ends it; Ctrl-C during a reply cuts it short. Returns the number of turns
    answered."""
    from kiln.runtime.chat import ContextFull, Conversation, load_chat_template

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    session = Session.load(artifact, threads=threads, synthetic_weights=synthetic_weights)
    tok = load_tokenizer(artifact)
    if tok is None:
        raise KilnError(f"{artifact}: chat needs tokenizer.json and the tokenizers package")
    stop = stop_tokens(session.artifact.manifest, chat=True, ignore_eos=ignore_eos,
                       extra=stop_token_ids)
    conv = Conversation(session, tok, load_chat_template(session.artifact), stop, system)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    err.write(f"kiln chat: {session.capacity}-token context; /reset starts over, /exit ends\n")
    turns = 0
    while True:
        err.write("> ")
        err.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            conv.reset()
            continue
        if not text.strip():
            continue
        result = Generation()
        try:
            _consume(conv.turn(text, max_new_tokens=max_new_tokens, sampler=sampler,
                               result=result), result, TextStream(tok, stop_texts), out)
        except ContextFull as e:
            err.write(f"context full: {e}; /reset starts a new conversation\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C cuts the reply short; the conversation goes on
            out.write("\n")
            err.write("(interrupted)\n")
            continue
        out.write("\n")
        out.flush()
        err.write(stats_line(result, session.threads) + "\n")
        turns += 1
    return turns
