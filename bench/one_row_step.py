"""The generator's decode step on its float32 graph and on its one-row graph (weights packed as 4-bit blocks).

Both graphs of the exported SmolLM2-135M-Instruct version (``model.onnx`` and ``model.one_row.onnx``,
tritonrag.export.packed_weights) in ONNX Runtime, in process, ``--threads`` threads, side by side in one run:
a random prompt of each ``--lengths`` tokens is prefilled once, then one decode step over its cache, repeated
for ``--rows`` rows, is timed ``--repeats`` times (median). Reported per rows and cached tokens: ms per step
on each graph, their ratio, and the largest difference between the two graphs' logits. The report
(markdown) goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from stack import machine, markdown_table, model_repository, progress, version_dir

from tritonrag.export.runtime.contract import ONE_ROW_ONNX_FILE, ONNX_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    version = version_dir(model_repository(args.repository, ["generator"]), "generator")
    if not (version / ONE_ROW_ONNX_FILE).is_file():
        sys.exit(f"{version} has no {ONE_ROW_ONNX_FILE}: its weights lie on no block grid")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = [
        ort.InferenceSession(str(version / name), options, providers=["CPUExecutionProvider"])
        for name in (ONNX_FILE, ONE_ROW_ONNX_FILE)
    ]
    past = [i.name for i in sessions[0].get_inputs() if i.name.startswith("past_key_values")]
    heads, head_dim = sessions[0].get_inputs()[2].shape[1], sessions[0].get_inputs()[2].shape[3]
    rng = np.random.default_rng(0)
    started = time.monotonic()
    rows = []
    for length in args.lengths:
        ids = rng.integers(100, 40_000, (1, length), dtype=np.int64)
        empty = {name: np.zeros((1, heads, 0, head_dim), np.float32) for name in past}
        outputs = sessions[0].run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty})
        cache = dict(zip([o.name for o in sessions[0].get_outputs()], outputs, strict=True))
        for count in args.rows:
            feed = {
                "input_ids": np.full((count, 1), 42, np.int64),
                "attention_mask": np.ones((count, length + 1), np.int64),
                **{name: np.repeat(cache[name.replace("past_key_values", "present")], count, 0) for name in past},
            }
            times, logits = [], []
            for session in sessions:
                logits.append(session.run(["logits"], feed)[0])
                spent = []
                for _ in range(args.repeats):
                    begun = time.perf_counter()
                    session.run(["logits"], feed)
                    spent.append(time.perf_counter() - begun)
                times.append(statistics.median(spent) * 1000)
            difference = float(np.abs(logits[1] - logits[0]).max())
            progress(f"{count} rows, {length} tokens: {times[0]:.1f} / {times[1]:.1f} ms")
            rows.append(
                [
                    str(count),
                    str(length),
                    f"{times[0]:.1f}",
                    f"{times[1]:.1f}",
                    f"{times[1] / times[0]:.2f}x",
                    f"{difference:.1e}",
                ]
            )
    print(
        f"Command: `bench/one_row_step.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}, "
        f"{(time.monotonic() - started) / 60:.1f} min. Machine: {machine()}.\n"
        f"Median ms per decode step of {args.repeats}, {args.threads} threads.\n"
    )
    header = ["rows", "cached tokens", "float32 ms", "packed ms", "packed / float32", "max logit difference"]
    print(markdown_table(header, rows, labels=2))


if __name__ == "__main__":
    main()
