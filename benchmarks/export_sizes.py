"""Export time, graph size and ORT-vs-reference error per preset, flavour and dtype.

    python benchmarks/export_sizes.py [--presets tiny small base] [--dtypes fp32 fp16]

For each preset: a random checkpoint is exported (`stagcompile export`, all three flavours), the
wall time and the graph bytes are reported, and every stack graph is run by ONNX Runtime on the
bundle's golden trace (prefill + decode steps) to report the largest absolute difference from the
PyTorch reference, per flavour (the plugin flavour through the ONNX Runtime kernel, fp32 only;
the ort flavour through `stagcompile.ort_replay`, which maps its layout to the trace's).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from stagcompile import checkpoint
from stagcompile.config import preset
from stagcompile.export import export_bundle
from stagcompile.model import StagFormer
from stagcompile.ort_replay import OrtReplay
from stagcompile.replay import Trace, load_trace
from stagcompile.runtime.bundle import Bundle


def worst(bundle_dir: Path, flavour: str) -> float:
    bundle = Bundle.load(bundle_dir)
    so = ort.SessionOptions()
    if flavour == "plugin":
        from plugins.ort_kernel import session_options
        so = session_options(so)
    sess = [ort.InferenceSession(str(bundle.graph(flavour, k + 1)), so)
            for k in range(bundle.num_stacks)]
    err = 0.0
    if flavour == "ort":
        replay = OrtReplay(bundle, Trace(bundle))
        for st in replay.steps(bundle.dtype):
            names = [o.name for o in sess[st.stack - 1].get_outputs()]
            got = replay.to_golden(st.stack, st.feeds,
                                   dict(zip(names, sess[st.stack - 1].run(names, st.feeds))))
            for n, want in st.golden.items():
                err = max(err, float(np.abs(got[n].astype(np.float32) - want).max()))
        return err
    for st in load_trace(bundle_dir).steps(bundle.dtype):
        names = list(st.golden)
        for n, v in zip(names, sess[st.stack - 1].run(names, st.feeds)):
            err = max(err, float(np.abs(v.astype(np.float32) - st.golden[n]).max()))
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--max-seq-len", type=int, default=256)
    args = ap.parse_args()
    print("$ python benchmarks/export_sizes.py " + shlex.join(sys.argv[1:]))
    print(f"{'preset':6} {'dtype':5} {'params':>11} {'export s':>9} {'ort MiB':>8} "
          f"{'portable MiB':>13} {'plugin MiB':>11} {'max|err| ort':>13} "
          f"{'max|err| portable':>18} {'max|err| plugin':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            model = StagFormer(preset(name))
            ck = checkpoint.save(model, Path(tmp) / f"{name}-ck")
            params = sum(p.numel() for p in model.parameters())
            for dtype in args.dtypes:
                out = Path(tmp) / f"{name}-{dtype}"
                t0 = time.perf_counter()
                export_bundle(ck, out, "all", dtype, args.max_seq_len, 8, show_progress=False)
                secs = time.perf_counter() - t0
                sizes = {fl: sum(p.stat().st_size for p in (out / "graphs" / fl).iterdir()) / 2**20
                         for fl in ("ort", "portable", "plugin")}
                plug = worst(out, "plugin") if dtype == "fp32" else float("nan")
                print(f"{name:6} {dtype:5} {params:11,} {secs:9.1f} {sizes['ort']:8.1f} "
                      f"{sizes['portable']:13.1f} {sizes['plugin']:11.1f} "
                      f"{worst(out, 'ort'):13.2e} {worst(out, 'portable'):18.2e} {plug:16.2e}",
                      flush=True)


if __name__ == "__main__":
    main()
