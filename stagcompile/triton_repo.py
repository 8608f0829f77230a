"""`stagcompile triton BUNDLE -o REPO`: a Triton Inference Server model repository for a bundle.

    REPO/<model>/config.pbtxt        Python backend, decoupled (one response per token), CPU
    REPO/<model>/1/model.py          stagcompile/triton_model.py
    REPO/<model>/1/runtime/          the runtime package (numpy + onnxruntime + tokenizers)
    REPO/<model>/1/bundle/           a copy of the bundle

    tritonserver --model-repository REPO          # then stream with tritonclient's gRPC client

The repository is written atomically; the bundle is loaded (checksums verified) first, so a
broken bundle writes nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stagcompile.atomic import atomic_dir
from stagcompile.codegen import write_runtime
from stagcompile.errors import StagError
from stagcompile.runtime.bundle import Bundle

MODEL_FILE = Path(__file__).resolve().parent / "triton_model.py"

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "stop_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true }}
]
output [
  {{ name: "token" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "max_batch" value {{ string_value: "{max_batch}" }} }}
parameters {{ key: "schedule" value {{ string_value: "{schedule}" }} }}
"""


def write_repository(bundle: Path, output: Path, model_name: str = "stagformer",
                     max_batch: int | None = None, schedule: str = "staggered",
                     force: bool = False) -> Path:
    b = Bundle.load(bundle)
    if not model_name or not all(c.isalnum() or c in "-_" for c in model_name):
        raise StagError(f"--model-name {model_name!r}: use letters, digits, - and _")
    if max_batch is not None and not 1 <= max_batch <= b.manifest["max_batch"]:
        raise StagError(f"--max-batch {max_batch}: must be in 1..{b.manifest['max_batch']} (the "
                        "bundle's max_batch)")
    with atomic_dir(output, force, "triton model repository", [bundle]) as tmp:
        model = tmp / model_name
        version = model / "1"
        version.mkdir(parents=True)
        (model / "config.pbtxt").write_text(CONFIG.format(name=model_name, schedule=schedule,
                                                          max_batch=max_batch or 0))
        shutil.copyfile(MODEL_FILE, version / "model.py")
        write_runtime(version)
        shutil.copytree(b.root, version / "bundle")
    return output
