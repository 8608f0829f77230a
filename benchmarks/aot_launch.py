"""The ahead-of-time PTX kernels, loaded and launched through cuda-python as the runtime does.

    python benchmarks/aot_launch.py [--dtype float16] [--json F] [--dry-run]

1. BoundedWindowAttention: `plugins.aot.compile_ptx` for this GPU's compute capability, loaded
   with `stagcompile.runtime.device.Cuda` (cuModuleLoadData) and launched (cuLaunchKernel) with
   the grid, block, shared memory and the 12 arguments the TensorRT AOT plugin passes
   (`plugins.trt_plugin.aot_launch`), on decode and prefill shapes, bounded and unbounded
   windows, GQA, positions that wrap the ring; checked against the torch reference.
2. The device ring-commit kernel (`plugins.ring_commit`, sm_80 PTX JIT-compiled by the driver)
   captured once in a CUDA graph (cudaStreamBeginCapture .. cudaGraphInstantiate) and replayed
   at several positions: the slot comes from the position on the device, as in the TensorRT
   runtime's decode graphs; checked against the numpy commit.

`--dry-run`, or no CUDA: both PTX are compiled on the CPU and their parameter lists checked;
nothing is launched.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (batch, q heads, kv heads, new positions S, capacity C, head dim, window, first position)
CASES = [(1, 8, 8, 1, 256, 64, 256, 1000), (2, 8, 2, 1, 512, 128, 0, 300),
         (1, 8, 2, 16, 64, 64, 64, 90), (2, 4, 4, 16, 128, 128, 0, 40)]
TOL = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 2e-5}


def entry_params(ptx: str, name: str) -> list[str]:
    body = re.search(rf"\.entry {name}\((.*?)\)", ptx, flags=re.S)
    return re.findall(r"\.param (\.\w+)", body.group(1)) if body else []


def dry_run(dtype: str) -> dict:
    from plugins import aot, ring_commit
    att = aot.compile_ptx(dtype, 64, 0, 0.125, 90)
    rc = ring_commit.compile_ptx()
    ok = (len(entry_params(att.ptx, att.name)) == aot.NUM_PARAMS
          and entry_params(rc.ptx, rc.name) == [".u64", ".u64"])
    return {"dry_run": True, "ok": ok, "summary": [
        f"dry run: attention PTX sm_90 ({len(att.ptx)} chars, {aot.NUM_PARAMS} params, "
        f"{att.shared_mem} B shared) and ring-commit PTX sm_{rc.cc} compiled; parameter lists "
        f"{'as launched' if ok else 'WRONG'}; nothing launched (no GPU)"]}


def attention(torch, cu, stream, dtype: str, cc: int) -> list[dict]:
    from plugins import aot, reference
    from plugins.trt_plugin import aot_launch

    rows = []
    for b, hq, hkv, s, c, d, window, first in CASES:
        g = torch.Generator(device="cuda").manual_seed(b * 100 + s)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=getattr(torch, dtype))

        q, kn, vn = rand(b, hq, s, d), rand(b, hkv, s, d), rand(b, hkv, s, d)
        kc, vc = rand(b, hkv, c, d), rand(b, hkv, c, d)
        pos = torch.arange(first, first + b, device="cuda", dtype=torch.int64)
        scale = d ** -0.5
        k = aot.compile_ptx(dtype, d, window, scale, cc)
        func = cu.function(cu.load_module(k.ptx), k.name)
        grid, scalars = aot_launch(tuple(q.shape), tuple(kn.shape), tuple(kc.shape),
                                   k.config.block_m)
        out = torch.empty_like(q)
        torch.cuda.synchronize()
        args = ([t.data_ptr() for t in (q, kn, vn, kc, vc, pos)]
                + [(int(x), ctypes.c_int) for x in scalars] + [out.data_ptr()])
        cu.launch(func, grid, k.num_warps * 32, stream, tuple(args), shared=k.shared_mem)
        cu.sync(stream)
        want = reference.bounded_window_attention(q, kn, vn, kc, vc, pos, window, scale)
        err = float((out.float() - want.float()).abs().max())
        rows.append({"case": [b, hq, hkv, s, c, d, window, first], "max_err": err,
                     "ok": err <= TOL[dtype]})
    return rows


def commit_graph(torch, cu, stream) -> dict:
    from plugins import ring_commit
    from stagcompile.runtime.device import commit_table
    from stagcompile.runtime.rings import commit

    k = ring_commit.compile_ptx()
    func = cu.function(cu.load_module(k.ptx), k.name)
    rings = [torch.zeros(2, 3, 8, 16, dtype=torch.float16, device="cuda"),
             torch.zeros(2, 3, 5, 16, dtype=torch.float32, device="cuda")]
    news = [torch.zeros(2, 3, 1, 16, dtype=r.dtype, device="cuda") for r in rings]
    table = torch.from_numpy(commit_table([(r.data_ptr(), n.data_ptr(), 6, r.shape[2],
                                            16 * r.element_size()) for r, n in zip(rings, news)]))
    table, pos = table.cuda(), torch.zeros(2, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    cu.begin_capture(stream)
    cu.launch(func, (len(rings), 6), 32 * k.num_warps, stream, (table.data_ptr(),
                                                                  pos.data_ptr()))
    exe = cu.instantiate(cu.end_capture(stream))
    want = [r.cpu().numpy() for r in rings]
    ok = True
    for p in (0, 3, 9, 100, 101):
        for n in news:
            n.copy_(torch.randn(n.shape))
        pos.fill_(p)
        torch.cuda.synchronize()
        cu.launch_graph(exe, stream)
        cu.sync(stream)
        for w, r, n in zip(want, rings, news):
            commit(w, n.cpu().numpy(), p)
            ok &= bool(np.array_equal(r.cpu().numpy(), w))
    return {"positions": [0, 3, 9, 100, 101], "ok": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=list(TOL))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    print("$", shlex.join(["python", "benchmarks/aot_launch.py", *sys.argv[1:]]), flush=True)
    import torch

    if args.dry_run or not torch.cuda.is_available():
        result = dry_run(args.dtype)
    else:
        from stagcompile.runtime.device import Cuda
        major, minor = torch.cuda.get_device_capability()
        cu = Cuda()
        try:
            stream = cu.stream()
            rows = attention(torch, cu, stream, args.dtype, major * 10 + minor)
            graph = commit_graph(torch, cu, stream)
        finally:
            cu.close()
        worst = max(r["max_err"] for r in rows)
        ok = all(r["ok"] for r in rows) and graph["ok"]
        result = {"dry_run": False, "device": torch.cuda.get_device_name(0), "ok": ok,
                  "attention": rows, "commit_graph": graph, "summary": [
                      f"attention PTX sm_{major}{minor} {args.dtype} via cuda-python: "
                      f"{sum(r['ok'] for r in rows)}/{len(rows)} cases within "
                      f"{TOL[args.dtype]:g} (worst {worst:.1e})",
                      f"ring-commit PTX in one CUDA graph replayed at positions "
                      f"{graph['positions']}: {'exact' if graph['ok'] else 'WRONG'}"]}
    for line in result["summary"]:
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
