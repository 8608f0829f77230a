"""Weight-only quantization of a stack graph (`stagcompile export --quant int8|int4`).

ONNX Runtime's `MatMulNBitsQuantizer` (round-to-nearest, blockwise along K, symmetric: the recipe
and defaults of ONNX Runtime GenAI's `-p int4` CPU models) rewrites every MatMul whose weight is
a constant:

    ort flavour         MatMul -> com.microsoft MatMulNBits (bits 8 or 4, block_size,
                        accuracy_level 4: activations quantized to int8 inside the kernel);
                        with int4 also the embedding: Gather -> GatherBlockQuantized (blocks
                        along d_model; `embedding=False` keeps it, as ONNX Runtime GenAI does)
    portable, plugin    int4: weight -> DequantizeLinear(int4, scale, axis 0, block_size) ->
                        MatMul (opset 21 QDQ: TensorRT's int4 weight-only path)
                        int8: weight -> DequantizeLinear(int8, scale per output channel,
                        axis 1) -> MatMul (TensorRT's int8 weight-only path); the quantizer
                        writes no int8 QDQ, so each output channel is quantized by ONNX
                        Runtime's `quant_utils.quantize_data` (symmetric, as its per-channel
                        static quantizer does)

Activations, norms, softmax, caches and logits keep the bundle's dtype, and so does a MatMul whose
weight is computed (a tied head that the traced graphs transpose at run time) and the traced
graphs' embedding (the quantizer has no QDQ Gather). The manifest's `quant` section records what
was done.
"""

from __future__ import annotations

import logging

from stagcompile.errors import StagError

BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
QDQ_FLAVOURS = ("portable", "plugin")
QDQ_FORMAT = {4: "DequantizeLinear (int4, axis 0, block_size) -> MatMul, opset 21",
              8: "DequantizeLinear (int8, one scale per output channel, axis 1) -> MatMul"}
QDQ_OPSET = 21                  # int4 tensors and DequantizeLinear's block_size need opset 21


def check_quant(quant: str | None, block_size: int, dtype: str) -> None:
    """One-line errors for options the quantizer cannot honour."""
    if quant is None:
        return
    if quant not in BITS:
        raise StagError(f"--quant {quant}: expected one of {', '.join(BITS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise StagError(f"--block-size {block_size}: expected a power of two >= 16")
    if dtype != "fp32":
        raise StagError(f"--quant {quant} with --dtype {dtype}: weight-only quantization starts "
                        "from fp32 weights; export with --dtype fp32")


def quantize(proto, quant: str, block_size: int, flavour: str, embedding: bool = True):
    """The graph with its constant weights quantized; returns (proto, nodes changed)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    before = sum(n.op_type == "MatMul" for n in proto.graph.node)
    if BITS[quant] == 8 and flavour in QDQ_FLAVOURS:
        out, changed = int8_per_channel(proto)
        if before and not changed:
            raise StagError(f"--quant int8: no MatMul of the {flavour} graph has a constant weight")
        return out, changed
    fmt = QuantFormat.QDQ if flavour in QDQ_FLAVOURS else QuantFormat.QOperator
    gather = embedding and fmt == QuantFormat.QOperator and BITS[quant] == 4
    quiet = logging.getLogger("onnxruntime.quantization")
    level, quiet.level = quiet.level, logging.ERROR      # it warns about the opset bump
    try:
        q = MatMulNBitsQuantizer(proto, bits=BITS[quant], block_size=block_size,
                                 is_symmetric=True, quant_format=fmt,
                                 accuracy_level=None if fmt == QuantFormat.QDQ else ACCURACY_LEVEL,
                                 op_types_to_quantize=("MatMul", "Gather") if gather else None)
        q.process()
    finally:
        quiet.level = level
    out = q.model.model
    op = "DequantizeLinear" if fmt == QuantFormat.QDQ else "MatMulNBits"
    changed = sum(n.op_type in (op, "GatherBlockQuantized") for n in out.graph.node)
    if before and not changed:
        raise StagError(f"--quant {quant}: ONNX Runtime's quantizer changed no MatMul of the "
                        f"{flavour} graph")
    return out, changed


def int8_per_channel(proto):
    """Every MatMul whose weight [K, N] is an fp32 initializer reads it through
    DequantizeLinear(int8 [K, N], scale [N], axis 1); returns (proto, weights changed)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import quantize_data

    inits = {t.name: t for t in proto.graph.initializer}
    done: dict[str, str] = {}
    nodes = []
    for node in proto.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is not None and len(w.dims) == 2 and w.data_type == TensorProto.FLOAT:
            if w.name not in done:
                arr = numpy_helper.to_array(w)                              # [K, N]
                cols = [quantize_data(arr[:, j], TensorProto.INT8, True) for j in
                        range(arr.shape[1])]
                q = np.stack([c[2] for c in cols], axis=1).astype(np.int8)  # [K, N]
                scale = np.array([c[1] for c in cols], np.float32)          # [N]
                proto.graph.initializer.remove(w)
                proto.graph.initializer.extend([numpy_helper.from_array(q, w.name + "_int8"),
                                                numpy_helper.from_array(scale, w.name + "_scale")])
                done[w.name] = w.name + "_dq"
                nodes.append(helper.make_node("DequantizeLinear",
                                              [w.name + "_int8", w.name + "_scale"],
                                              [done[w.name]], axis=1,
                                              name=w.name + "_DequantizeLinear"))
            node.input[1] = done[w.name]
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto, len(done)


def manifest_section(quant: str, block_size: int, flavours, changed: dict,
                     embedding: bool = True) -> dict:
    """The manifest's `quant` section: what was quantized, how, and with which tool."""
    import onnxruntime
    gather = embedding and BITS[quant] == 4
    fmt = {"ort": f"com.microsoft MatMulNBits (bits {BITS[quant]}, accuracy_level "
                  f"{ACCURACY_LEVEL}: int8 activations inside the kernel)"
                  + ("; embedding: com.microsoft GatherBlockQuantized (int4, blocks along "
                     "d_model)" if gather else ""),
           "portable": QDQ_FORMAT[BITS[quant]], "plugin": QDQ_FORMAT[BITS[quant]]}
    return {"weights": quant, "bits": BITS[quant], "block_size": block_size, "symmetric": True,
            "method": "round to nearest, blockwise along K "
                      "(onnxruntime.quantization MatMulNBitsQuantizer, DEFAULT)"
                      + ("; portable and plugin graphs: round to nearest per output channel "
                         "(onnxruntime.quantization quant_utils.quantize_data)"
                         if BITS[quant] == 8 and set(flavours) & set(QDQ_FLAVOURS) else ""),
            "tool": f"onnxruntime {onnxruntime.__version__}",
            "formats": {f: fmt[f] for f in flavours},
            "nodes_quantized": changed,
            "unquantized": "norms, activations, caches, logits; MatMuls whose weight is computed "
                           "in the graph; the embedding of "
                           + ("the portable and plugin graphs" if gather else "every graph")}
