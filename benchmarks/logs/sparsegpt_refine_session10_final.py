"""Final variant (the committed default): kiln compile's graph vs the benchmark's, and
sparsity_quality's --via onnx rows on gpl3 and vim in one process (solves memoized)."""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, "/work/main/benchmarks")
import sparsity_quality as sq

from kiln.compiler.calibration import calibration
from kiln.compiler.compile import compile_graph
from kiln.passes import gptq
from kiln.passes.prune_weights import parse_config, prunable, prune_weights

model = Path("/work/smollm2/model.onnx")
work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
texts = sys.argv[2:]
cfg = parse_config("0.5")
t = time.time()
# what `kiln compile MODEL -o OUT --sparsity 0.5` builds (its default max_seq 2048)
g_compile = compile_graph(model, max_seq=2048, progress=lambda m: None, weights_optional=False,
                          prune=cfg)
print("compile-path prune", round(time.time() - t, 1), "s", file=sys.stderr)
n_cache = len(gptq._CACHE)
# what the benchmark's --via onnx does
graph = compile_graph(model, max_seq=1024, progress=lambda m: None, weights_optional=False)
g_bench = prune_weights(graph, config=cfg, calibration=calibration(model, print, 1024))
names = sorted(prunable(graph))
same = all(np.array_equal(g_compile.params[w].load(), g_bench.params[w].load()) for w in names)
print(json.dumps({"check": "kiln compile path == --via onnx path", "weights": len(names),
                  "identical": same, "new_solves": len(gptq._CACHE) - n_cache,
                  "refine": g_compile.meta["sparsity"]["refine"]}))
for text in texts:
    out = work / (Path(text).stem + ".jsonl")
    results = sq.load(out)
    def record(row, out=out, results=results, text=text):
        row = {**row, "text": text}
        results[row["key"]] = row
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    sq.onnx_rows(model, work, Path(text), 1024, [("0.5", "sparsegpt", "none")], results, record)
