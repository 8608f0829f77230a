"""torch -> ONNX for one stack: the plugin-flavour graph, and the portable graph derived from it.

Each stack is traced once, with `torch.onnx.export(..., dynamo=True)` over `graphs.stack.StackGraph`
with the attention dispatched to the `stagformer` custom op, so every attention call becomes one
`stagformer::BoundedWindowAttention` node: that is the plugin flavour. The portable flavour is the
same graph with each plugin node inlined to the op's standard-operator definition
(`plugins.portable`), then common subexpressions merged (the layers' identical masks).

Opset 18, on purpose: it is the opset torch.onnx's dynamo exporter emits natively (no version
conversion pass, which also cannot carry a custom-domain node), every operator we need exists in
it (Softmax on any axis, ReduceMean with axes as input, Mod on int64), and it lies inside what
JetPack 6's TensorRT 10.3 parser, TensorRT 10.x/11.x and ONNX Runtime >= 1.14 accept. Newer
opsets would only add ops we do not use (RMSNormalization, Attention of opset 23) while dropping
older TensorRT versions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from graphs.stack import StackGraph
from plugins.onnx_node import plugin_flavour, register_schema, translation_table
from plugins.portable import to_portable
from stagcompile.errors import StagError
from stagcompile.model import StagFormer

OPSET = 18
FLAVOURS = ("portable", "plugin")


class ExportError(StagError):
    """torch.onnx could not export a stack, or the result failed its checks."""


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings per call; keep the user's display clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def trace_stack(model: StagFormer, stack: int, dtype: str, max_batch: int) -> onnx.ModelProto:
    """The plugin-flavour ONNX graph of 0-based `stack` (weights inline, in memory)."""
    register_schema()
    graph = StackGraph(model, stack, dtype).eval()
    max_seq = max(2, model.cfg.max_seq_len)
    try:
        with _quiet(), plugin_flavour(), torch.no_grad():
            program = torch.onnx.export(
                graph, graph.example_inputs(), dynamo=True, opset_version=OPSET,
                dynamic_shapes=(graph.dynamic_shapes(max(2, max_batch), max_seq),),
                input_names=[t.name for t in graph.io.inputs],
                output_names=[t.name for t in graph.io.outputs],
                custom_translation_table=translation_table(), verbose=False)
    except Exception as exc:   # torch.onnx raises many types; the message is what matters
        raise ExportError(f"torch.onnx could not export stack {stack + 1}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    proto = program.model_proto
    proto.doc_string = f"stagcompile stack {stack + 1} of {model.cfg.num_stacks}"
    return proto


def canonical_shapes(model) -> None:
    """Rewrite single-dimension Shape nodes of an onnx_ir model: a static dimension becomes a
    constant, a symbolic one (batch, seq) a Shape of `input_ids`, the graph input that carries
    both. The inlined attention calls then compute identical masks from identical values, which
    common-subexpression elimination merges: each distinct mask is built once per step."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    where = {"batch": 0, "seq": 1}
    for node in list(graph):
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
            continue
        start, end = node.attributes.get("start"), node.attributes.get("end")
        shape = node.inputs[0].shape
        if start is None or end is None or shape is None or end.value - start.value != 1:
            continue
        dim = shape[start.value]
        if isinstance(dim, int):
            new = ir.node("Constant", [], attributes={
                "value": ir.tensor(np.array([dim], dtype=np.int64))})
        elif str(dim) in where:
            i = where[str(dim)]
            new = ir.node("Shape", [ids], attributes={"start": i, "end": i + 1})
        else:
            continue
        graph.insert_before(node, new)
        ir.convenience.replace_all_uses_with(node.outputs[0], new.outputs[0])
        graph.remove(node, safe=True)


def portable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Inline every plugin node, canonicalise shape reads, then merge identical subgraphs and
    drop dead nodes."""
    import onnx_ir as ir
    from onnx_ir.passes.common import (CommonSubexpressionEliminationPass,
                                       RemoveUnusedNodesPass, RemoveUnusedOpsetsPass)

    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(to_portable(proto)))
    canonical_shapes(model)
    for p in (CommonSubexpressionEliminationPass(), RemoveUnusedNodesPass(),
              RemoveUnusedOpsetsPass()):
        p(model)
    return ir.serde.serialize_model(model)


def save(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """Write the graph with its weights in `<name>.data` beside it; returns the files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.name + ".data"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    files = [path]
    if (path.parent / data).exists():
        files.append(path.parent / data)
    return files


def save_ort_stack(cfg, weights: dict, stack: int, dtype: str, path: Path, transform=None,
                   qkv_table: bool = False):
    """Build, write and check the ort-flavour graph of 0-based `stack` (`transform(proto)` ->
    proto, when given, rewrites it first: quantization; `qkv_table`: the first layer's Q|K|V
    from a per-token table); returns (files, I/O)."""
    import onnx_ir as ir

    from graphs.ort_stack import OrtStackGraph

    graph = OrtStackGraph(cfg, weights, stack, dtype, qkv_table)
    proto = ir.serde.serialize_model(graph.build())
    proto.doc_string = f"stagcompile stack {stack + 1} of {cfg.num_stacks} (ort flavour)"
    written = save(transform(proto) if transform else proto, path)
    check(path, graph.io)
    return written, graph.io


def check(path: Path, io_table) -> None:
    """onnx.checker with full checking and shape inference, and the I/O table's names/dtypes."""
    register_schema()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: fails onnx.checker: {str(exc).splitlines()[0]}") from None
    model = onnx.load(str(path), load_external_data=False)
    for kind, want in (("input", io_table.inputs), ("output", io_table.outputs)):
        got = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                if v.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16 else "bfloat16")
               for v in getattr(model.graph, kind)]
        exp = [(t.name, t.dtype) for t in want]
        if got != exp:
            raise ExportError(f"{path}: graph {kind}s {got} differ from the I/O table {exp}")
