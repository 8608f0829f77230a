"""Where a stack graph's decode time goes inside ONNX Runtime: op types, and the weights-only floor.

    python benchmarks/profile_graph.py BUNDLE [--context 128] [--runs 200] [--batch 1]

For each stack of an exported bundle (the runtime's flavour unless --flavour says otherwise, one
intra-op thread, the stack's decode step after a prefill of `--context` tokens):

- full graph: median wall time of `run_with_iobinding` on the runtime's own bound buffers;
- weights only: a graph of just the stack's weight MatMuls (every MatMul whose second input is an
  initializer after ONNX Runtime's optimizations, same weights, same [batch, 1, K] inputs), timed
  interleaved with the full graph: the time a step needs to stream its weights through MLAS;
- ONNX Runtime's profiler: kernel time per op type per run, and node counts.

The gap between the two wall times is what the rest of the graph (attention over the caches, norms,
RoPE, reshapes, per-node dispatch) costs on top of reading the weights.
"""

from __future__ import annotations

import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from _args import parse
from stagcompile.runtime.bundle import Bundle
from stagcompile.runtime.generator import Generator, make_backend
from stagcompile.runtime.ort_backend import session_options


def optimized(graph: Path, work: Path) -> onnx.ModelProto:
    """The graph as ONNX Runtime runs it on the CPU (constants folded, fusions applied)."""
    so = session_options(1, False)
    so.optimized_model_filepath = str(work / f"{graph.stem}.opt.onnx")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                f"{graph.stem}.opt.data")
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath)


def weights_only(model: onnx.ModelProto, batch: int):
    """(session, feeds, weight bytes) of a graph holding only `model`'s weight MatMuls."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes, weights, inputs, outputs, nbytes = [], [], {}, [], 0
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        i, k, nbytes = len(weights), w.shape[0], nbytes + w.nbytes
        elem = helper.np_dtype_to_tensor_dtype(w.dtype)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        inputs.setdefault(k, (w.dtype, helper.make_tensor_value_info(f"x{k}", elem,
                                                                     [batch, 1, k])))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", elem, None))
    graph = helper.make_graph(nodes, "weights_only", [v for _, v in inputs.values()], outputs,
                              weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(proto.SerializeToString(), session_options(1, False),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal((batch, 1, k)).astype(dtype)
             for k, (dtype, v) in inputs.items()}
    return sess, feeds, nbytes


def op_profile(graph: Path, bind, runs: int, work: Path) -> tuple[dict, int]:
    """Kernel microseconds per run by op type, and nodes per run, from ORT's profiler."""
    so = session_options(1, False)
    so.enable_profiling = True
    so.profile_file_prefix = str(work / graph.stem)
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    io = bind(sess)
    for _ in range(runs):
        sess.run_with_iobinding(io)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op, nodes = collections.Counter(), 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / runs
            nodes += 1
    return dict(per_op), nodes // runs


def main() -> None:
    args = parse(__doc__, ("--runs", 200))
    bundle = Bundle.load(args.bundle, verify=False)
    backend = make_backend(bundle, "ort", "sequential", [1] * bundle.num_stacks, False,
                           args.flavour)
    gen = Generator(bundle, backend, "sequential")
    rng = np.random.default_rng(0)
    gen.prefill(rng.integers(0, bundle.config["vocab_size"], (args.batch, args.context)))
    backend.set_step(np.zeros(args.batch, np.int64), args.context)
    rows, profiles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(bundle.num_stacks):
            path = bundle.graph(backend.flavour, k + 1)
            mm, feeds, nbytes = weights_only(optimized(path, Path(tmp)), args.batch)
            full = backend.sessions[k]
            times = {"full": [], "weights": []}
            for _ in range(max(1, args.runs // 20)):     # interleaved rounds of 20 runs
                for key, run in (("full", lambda: full.run_with_iobinding(backend.binding(k, 0))),
                                 ("weights", lambda: mm.run(None, feeds))):
                    t0 = time.perf_counter()
                    for _ in range(20):
                        run()
                    times[key].append((time.perf_counter() - t0) / 20)
            ms = {key: float(np.median(v)) * 1e3 for key, v in times.items()}
            per_op, nodes = op_profile(path, lambda sess: backend.bind(sess, k, 0), args.runs,
                                       Path(tmp))
            rows.append((k + 1, nodes, ms["full"], ms["weights"], nbytes))
            profiles.append(per_op)
    gen.close()
    print(f"\n{args.bundle.name}: batch {args.batch}, context {args.context}, one thread, "
          f"{args.runs} runs per stack\n")
    print("| stack | nodes run | full graph ms | weights-only ms | weights MB | "
          "GB/s full | GB/s weights-only |")
    print("|---|---|---|---|---|---|---|")
    for k, nodes, full_ms, w_ms, nbytes in rows:
        print(f"| {k} | {nodes} | {full_ms:.2f} | {w_ms:.2f} | {nbytes / 1e6:.1f} | "
              f"{nbytes / full_ms / 1e6:.1f} | {nbytes / w_ms / 1e6:.1f} |")
    print("\nONNX Runtime profiler, kernel microseconds per run (the profiler itself adds a few "
          "per node):\n")
    ops = sorted({op for p in profiles for op in p}, key=lambda op: -sum(p.get(op, 0)
                                                                           for p in profiles))
    print("| op type | " + " | ".join(f"stack {k + 1}" for k in range(len(profiles))) + " |")
    print("|---|" + "---|" * len(profiles))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{p.get(op, 0):.0f}" for p in profiles) + " |")
    print("| total | " + " | ".join(f"{sum(p.values()):.0f}" for p in profiles) + " |")


if __name__ == "__main__":
    main()
