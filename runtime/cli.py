"""What `kiln run` does, kept in the runtime so a deployed bundle can call it without the
compiler: tokenize, generate with streaming output, report speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def run_generation(artifact: Path, *, prompt: str | None, prompt_ids: str | None,
                   max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   seed: int, threads: int | None, synthetic_weights: int | None,
                   as_json: bool, out=None, err=None) -> Generation:
    # the streams are looked up per call: a default bound at import time would keep writing to
    # whatever sys.stdout was then (a test runner's long-closed capture, say)
    out, err = out or sys.stdout, err or sys.stderr
    if (prompt is None) == (prompt_ids is None):
        raise KilnError("give exactly one of --prompt and --prompt-ids")
    session = Session.load(artifact, threads=threads, synthetic_weights=synthetic_weights)
    tok = load_tokenizer(artifact)
    if prompt is not None:
        if tok is None:
            raise KilnError(f"{artifact}: no tokenizer.json; use --prompt-ids")
        ids = tok.encode(prompt).ids
    else:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError as e:
            raise KilnError(f"--prompt-ids: not a list of integers: {prompt_ids!r}") from e
    special = session.artifact.manifest.get("special_tokens", {})
    stop = [special["eos_token_id"]] if "eos_token_id" in special else []
    result = Generation()
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    shown = ""
    for _ in generate(session, ids, max_new_tokens=max_new_tokens, sampler=sampler, stop=stop,
                      result=result):
        if tok is not None and not as_json:
            text = tok.decode(result.tokens)
            out.write(text[len(shown):])
            out.flush()
            shown = text
    t = result.timing
    text = tok.decode(result.tokens) if tok is not None else None
    if as_json:
        out.write(json.dumps({"prompt_tokens": len(ids), "tokens": result.tokens, "text": text,
                              "stopped": result.stopped,
                              "prefill_tok_s": round(t.prefill_tok_s, 2),
                              "decode_tok_s": round(t.decode_tok_s, 2),
                              "time_to_first_token_s": round(t.first_token_s, 4)}) + "\n")
    else:
        if tok is None:
            out.write(",".join(map(str, result.tokens)))
        out.write("\n")
        err.write(f"prefill {t.prompt_tokens} tokens: {t.prefill_tok_s:.1f} tok/s, time to "
                  f"first token {t.first_token_s * 1e3:.0f} ms; decode {t.decode_tokens} "
                  f"tokens: {t.decode_tok_s:.1f} tok/s\n")
    return result
