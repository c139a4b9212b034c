"""`kiln eval`: perplexity of an artifact over a text, and its divergence from a reference (another
artifact, or an ONNX model run by onnxruntime) over the same windows."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from kiln.compiler.errors import KilnError


def default_text() -> Path:
    """The public-domain passage shipped with kiln (see models/data/EVAL_TEXT.md)."""
    return Path(str(resources.files("kiln.models") / "data" / "eval.txt"))


def read_text(path: Path) -> str:
    if not path.is_file():
        raise KilnError(f"{path}: no such text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KilnError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise KilnError(f"{path}: the text is empty")
    return text


def tokenize(artifact: Path, text: str, source: Path) -> list[int]:
    from kiln.runtime.cli import load_tokenizer

    tok = load_tokenizer(artifact)
    if tok is None:
        raise KilnError(f"{artifact}: no tokenizer.json to tokenize {source} with")
    ids = tok.encode(text).ids
    if len(ids) < 2:
        raise KilnError(f"{source}: only {len(ids)} token(s); need at least 2 to score")
    return ids


def evaluate_artifact(artifact: Path, *, text: Path | None = None, reference: Path | None = None,
                      max_tokens: int | None = None, stride: int | None = None,
                      threads: int | None = None,
                      progress: Callable[[int, int], None] = lambda done, total: None,
                      ) -> dict[str, Any]:
    """Perplexity of ARTIFACT over `text` (default: the shipped passage) and, with a reference,
    the mean KL(reference || artifact) and top-1 agreement of next-token distributions."""
    from kiln.runtime.evaluate import evaluate
    from kiln.runtime.session import Session
    from kiln.runtime.threads import default_threads

    source = text or default_text()
    ids = tokenize(artifact, read_text(source), source)
    if max_tokens is not None:
        if max_tokens < 2:
            raise KilnError(f"--max-tokens {max_tokens}: need at least 2 tokens to score")
        ids = ids[:max_tokens]
    threads = default_threads(threads)  # onnxruntime as a reference gets the same
    session = Session.load(artifact, threads=threads)
    ref_fn, ref_context, ref_vocab = _reference(reference, threads)
    if ref_vocab is not None and session.vocab is not None and ref_vocab != session.vocab:
        raise KilnError(f"{reference}: vocabulary of {ref_vocab} tokens, {artifact} has "
                        f"{session.vocab}; they cannot be compared")
    context = min(session.capacity, ref_context or session.capacity)
    stride = stride if stride is not None else max(context // 2, 1)
    result = evaluate(session.prefill, ids, context=context, stride=stride, reference=ref_fn,
                      progress=progress)
    return {"artifact": str(artifact), "text": str(source),
            "reference": str(reference) if reference else None,
            "tokens": result.tokens, "context": context, "stride": stride,
            "perplexity": result.perplexity, "nll": result.nll / result.tokens,
            "reference_perplexity": result.reference_perplexity,
            "kl_divergence": result.kl_divergence, "top1_agreement": result.top1_agreement}


def _reference(path: Path | None, threads: int | None):
    """(logits function, context or None, vocab or None) of the reference."""
    if path is None:
        return None, None, None
    if path.is_dir():
        from kiln.runtime.session import Session

        ref = Session.load(path, threads=threads)
        return ref.prefill, ref.capacity, ref.vocab
    if path.suffix == ".onnx":
        from kiln.compiler.frontend.onnxruntime_lm import OrtLM

        lm = OrtLM(path, threads=threads)
        return lm, None, lm.vocab
    raise KilnError(f"{path}: the reference must be an artifact directory or an .onnx file")
