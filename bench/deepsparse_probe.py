"""What a sparse CPU runtime buys: Neural Magic's DeepSparse 1.8.0 (end-of-life, community license)
beside onnxruntime, on our int8 export and SparseML's, batch 1 or 32 at sequence 64.

Not part of the package or its tests: DeepSparse pins numpy 1.x and onnx 1.14, so it runs from a
venv of its own (see bench/README.md). Inputs are made static (DeepSparse runs a dynamic graph on
its bundled onnxruntime instead of its own engine). Both engines, both files, alternating rounds in
one process; prints ms/row medians and each engine's max abs diff from onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import deepsparse  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402

SEQ = 64


def static_copy(path: str, batch: int, folder: str) -> str:
    """The file with [batch, SEQ] inputs and a fixed batch in its outputs."""
    model = onnx.load(path)
    for value, dims in [(v, (batch, SEQ)) for v in model.graph.input] + [(v, (batch,)) for v in model.graph.output]:
        for dim, size in zip(value.type.tensor_type.shape.dim, dims):
            dim.ClearField("dim_param")
            dim.dim_value = size
    out = os.path.join(folder, f"{os.path.basename(os.path.dirname(path))}_{os.path.basename(path)}")
    onnx.save(model, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ours", required=True, help="model.onnx of distsparse export (the QDQ graph)")
    p.add_argument("--against", required=True, help="SparseML's model.onnx")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (args.batch, SEQ)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    runs, result = {}, {"batch": args.batch, "seq": SEQ, "threads": args.threads, "deepsparse": deepsparse.__version__,
                        "onnxruntime": onnxruntime.__version__, "max_abs_diff_vs_onnxruntime": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, path in (("distsparse", args.ours), ("sparseml", args.against)):
            path = static_copy(path, args.batch, folder)
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            inputs = [feed[n] for n in names]
            engine = deepsparse.compile_model(path, batch_size=args.batch, num_cores=args.threads)
            diff = np.abs(engine.run(inputs)[0] - session.run(None, dict(zip(names, inputs)))[0]).max()
            result["max_abs_diff_vs_onnxruntime"][name] = float(diff)
            runs[name] = {"deepsparse": lambda e=engine, x=inputs: e.run(x),
                          "onnxruntime": lambda s=session, x=dict(zip(names, inputs)): s.run(None, x)}
        times = {(n, e): [] for n in runs for e in ("deepsparse", "onnxruntime")}
        for _ in range(args.repeats + 2):
            for (name, engine), spent in times.items():
                start = time.perf_counter()
                runs[name][engine]()
                spent.append(time.perf_counter() - start)
    result["ms_per_row"] = {f"{n} / {e}": round(1000 * float(np.median(v[2:])) / args.batch, 2)
                            for (n, e), v in times.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
