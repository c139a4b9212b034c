"""Calibration text from the model's own generations: samples of an fp32 ONNX decoder run by
onnxruntime (KV cache, batch of all prompts), temperature 1, no top-k/top-p, fixed seed.

    python benchmarks/generate_calibration.py MODEL.onnx -o OUT.txt [--tokens 512] [--seed 0]
        [--prompt TEXT ...]

Each sample starts from the tokenizer's first special token (SmolLM2: <|endoftext|>) and one
short neutral prompt; the samples are decoded and written one after another, separated by a
blank line. No evaluation text is involved.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

PROMPTS = ("The", "In", "A", "It", "This", "When", "We", "I", "There", "One", "After", "If",
           "My", "As", "For", "On")


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "out", type=click.Path(path_type=Path), required=True)
@click.option("--tokens", default=512, show_default=True, help="tokens per sample")
@click.option("--seed", default=0, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--prompt", "prompts", multiple=True, help=f"default: {', '.join(PROMPTS)}")
@click.option("--threads", default=2, show_default=True)
def main(model: Path, out: Path, tokens: int, seed: int, temperature: float, prompts,
         threads: int) -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model.with_name("tokenizer.json")))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    past = [i for i in sess.get_inputs() if i.name.startswith("past")]
    outputs = ["logits", *(p.name.replace("past_key_values", "present") for p in past)]
    bos = 0  # the first special token
    prompts = prompts or PROMPTS
    firsts = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    width = min(map(len, firsts))  # one batch without padding: prompts cut to the shortest
    ids = np.array([[bos, *f[:width]] for f in firsts], np.int64)
    b = len(ids)
    rng = np.random.default_rng(seed)
    cache = {p.name: np.zeros((b, p.shape[1], 0, p.shape[3]), np.float32) for p in past}
    step, done, seq = ids, ids.shape[1], [list(r) for r in ids]
    while True:
        feeds = {"input_ids": step, "attention_mask": np.ones((b, done), np.int64),
                 "position_ids": np.broadcast_to(np.arange(done - step.shape[1], done),
                                                 step.shape).copy(), **cache}
        res = sess.run(outputs, feeds)
        cache = {p.name: r for p, r in zip(past, res[1:], strict=True)}
        logits = res[0][:, -1].astype(np.float64) / temperature
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        nxt = np.array([rng.choice(p.shape[1], p=row) for row in p], np.int64)
        for s, t in zip(seq, nxt, strict=True):
            s.append(int(t))
        if done >= tokens:
            break
        step, done = nxt[:, None], done + 1
    texts = [tok.decode(s[1:], skip_special_tokens=True).strip() for s in seq]
    out.write_text("\n\n".join(texts) + "\n")
    n = sum(len(tok.encode(t).ids) for t in texts)
    click.echo(f"{out}: {len(texts)} samples, {n} tokens", err=True)


if __name__ == "__main__":
    sys.exit(main())
