"""Text generation over a Session: prefill the prompt, then decode token by token, timed."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.runtime.sampling import Sampler
from kiln.runtime.session import Session


@dataclass
class Timing:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    first_token_s: float = 0.0  # prefill + sampling of the first token
    cached_tokens: int = 0  # prompt tokens already in the cache (not prefilled)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    stopped: str = "length"  # "length" | "stop token"
    text: str | None = None  # the tokens decoded (Session.generate, with a tokenizer)


def generate(session: Session, prompt: Sequence[int], *, max_new_tokens: int,
             sampler: Sampler | None = None, stop: Sequence[int] = (),
             result: Generation | None = None, cached: int = 0) -> Iterator[int]:
    """Yield generated token ids for one prompt; fills `result` with tokens and timing.
    `cached`: how many leading prompt tokens the session's cache holds already (a chat's earlier
    turns): only the others are prefilled."""
    result = result if result is not None else Generation()
    n = len(prompt)
    if n == 0:
        raise KilnError("the prompt is empty")
    if cached and not (0 < cached < n and cached <= session.past):
        raise KilnError(f"{cached} cached tokens: the cache holds {session.past}, the prompt "
                        f"{n} (at least one must be prefilled)")
    if n + max_new_tokens > session.capacity:
        raise KilnError(f"prompt of {n} tokens + {max_new_tokens} new tokens exceeds the "
                        f"context of {session.capacity} (compiled with --max-seq "
                        f"{session.capacity})")
    sampler = sampler or Sampler()
    rng = sampler.generator()
    t = result.timing
    start = time.perf_counter()
    ids = np.asarray(prompt, np.int64)[None]
    if cached:
        session.rewind(cached)
        logits = session.extend(ids[:, cached:], last_only=True)[:, -1]
    else:
        logits = session.prefill(ids, last_only=True)[:, -1]
    t.prefill_s, t.prompt_tokens, t.cached_tokens = time.perf_counter() - start, n - cached, cached
    token = int(sampler(logits, rng)[0])
    t.first_token_s = time.perf_counter() - start
    for i in range(max_new_tokens):
        result.tokens.append(token)
        yield token
        if token in stop:
            result.stopped = "stop token"
            return
        if i == max_new_tokens - 1:
            return
        step = time.perf_counter()
        if sampler.greedy:  # the argmax where the logits are (CUDA: on the device, 1 id back)
            token = int(session.decode_greedy([token])[0])
        else:
            token = int(sampler(session.decode([token])[:, -1], rng)[0])
        t.decode_s += time.perf_counter() - step
        t.decode_tokens += 1


def generate_text(session: Session, prompt: str | Sequence[int], *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  stop: Sequence[int] | None = None) -> Generation:
    """Session.generate: continue `prompt` (text, tokenized with the artifact's tokenizer.json,
    or token ids) and return tokens, text and timing; `stop`: token ids that end generation
    (default: the artifact's end-of-sequence tokens; `()`: none)."""
    from kiln.runtime.cli import load_tokenizer, stop_tokens

    tok = load_tokenizer(session.artifact.path)
    if isinstance(prompt, str):
        if tok is None:
            raise KilnError(f"{session.artifact.path}: no tokenizer.json (or no tokenizers "
                            "package here); pass the prompt as token ids")
        prompt = tok.encode(prompt).ids
    if stop is None:
        stop = stop_tokens(session.artifact.manifest)
    result = Generation()
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    for _ in generate(session, list(prompt), max_new_tokens=max_new_tokens, sampler=sampler,
                      stop=stop, result=result):
        pass
    result.text = tok.decode(result.tokens) if tok is not None else None
    return result
