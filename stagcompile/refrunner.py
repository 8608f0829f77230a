"""A Polygraphy runner over ONNX's reference evaluator (`onnx.reference`, numpy).

ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul and friends, so a bf16 bundle's
graphs cannot run there; the reference evaluator runs them exactly as the ONNX specification
defines every operator (bfloat16 through ml_dtypes), slowly but on any machine. `validate` uses it
for bf16 portable graphs so that they are checked against the PyTorch reference without a GPU.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType


class OnnxReferenceRunner(BaseRunner):
    def __init__(self, path: Path, name: str | None = None):
        super().__init__(name=name, prefix="onnx-reference-runner")
        self.path = Path(path)

    def activate_impl(self):
        from onnx.reference import ReferenceEvaluator
        self.model = onnx.load(str(self.path))
        self.sess = ReferenceEvaluator(self.model)

    def get_input_metadata_impl(self):
        """The graph's inputs, with bfloat16 ones announced as float32: Polygraphy has no numpy
        bfloat16, so this runner takes fp32 feeds and casts them to the graph's types itself."""
        meta = TensorMetadata()
        for vi in self.model.graph.input:
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim]
            elem = tt.elem_type
            if elem == onnx.TensorProto.BFLOAT16:
                elem = onnx.TensorProto.FLOAT
            meta.add(vi.name, dtype=DataType.from_dtype(elem, "onnx"), shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        feeds = {vi.name: np.asarray(feed_dict[vi.name]).astype(
                     onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
                 for vi in self.model.graph.input}
        start = time.time()
        outs = self.sess.run(None, feeds)
        self.inference_time = time.time() - start
        # bf16 -> fp32 is exact; Polygraphy's comparator does not handle bfloat16 arrays
        return OrderedDict((name, out.astype(np.float32) if out.dtype.name == "bfloat16" else out)
                           for name, out in zip(self.sess.output_names, outs))

    def deactivate_impl(self):
        del self.sess, self.model
