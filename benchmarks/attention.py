"""Benchmark BoundedWindowAttention on a GPU: the Triton kernel against torch SDPA with a mask.

    python benchmarks/attention.py [--dtype float16] [--batch 1 8] [--seq 1 256] ... [--json F]
                                   [--dry-run]

For each (batch, S, window, cache size C) it times the median of `triton.testing.do_bench` (CUDA
events, L2 flushed between runs; the launcher's Python overhead hides behind the flush):

    triton  plugins.triton_kernel.bounded_window_attention_triton (reads only the window)
    sdpa    torch.nn.functional.scaled_dot_product_attention over cat(cache, new) with the boolean
            mask of plugins.reference (mask and concatenation prepared outside the timing, so
            this is SDPA's best case; it still reads all C slots)

and prints the time and the achieved bandwidth: bytes the op needs (q, the new entries, the cache
entries inside the windows, pos, the output) divided by the time, also as a share of the
device's peak (from torch's device properties, else a table for H100 / H200 / Orin). The Triton
output is checked against the torch reference on every row. Without a GPU it says so and exits 0;
`--dry-run` instead checks one small case on the CPU under the Triton interpreter (no timing).
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "Orin": 204.8e9}


def peak_bandwidth(props) -> float:
    """Bytes/s: 2 (DDR) * memory clock * bus width, else by device name, else 0 (unknown)."""
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8
    return next((v for k, v in PEAK_BYTES_PER_S.items() if k in props.name), 0.0)


def needed_bytes(q, k_new, k_cache, pos, window: int) -> int:
    """Minimum traffic of one call: every input element that some query needs, plus the output."""
    b, hq, s, d = q.shape
    hkv = k_new.shape[1]
    item = q.element_size()
    read_cache = sum(min(p, window - 1) if window else p for p in pos.tolist())  # slots per head
    return item * (2 * b * hq * s * d + 2 * b * hkv * s * d + 2 * hkv * d * read_cache) \
        + pos.numel() * pos.element_size()


def make_inputs(torch, batch, q_heads, kv_heads, seq, capacity, head_dim, window, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=dtype)

    full = 3 * capacity + 7 if window else capacity       # bounded: wrapped ring; else: full cache
    pos = torch.full((batch,), full, device="cuda", dtype=torch.int64)
    return (rand(batch, q_heads, seq, head_dim), rand(batch, kv_heads, seq, head_dim),
            rand(batch, kv_heads, seq, head_dim), rand(batch, kv_heads, capacity, head_dim),
            rand(batch, kv_heads, capacity, head_dim), pos)


def run_case(torch, args, batch, seq, window, capacity, peak) -> dict:
    """Check and time one configuration; its numbers and table row."""
    from triton.testing import do_bench

    from plugins import reference
    from plugins.triton_kernel import bounded_window_attention_triton

    q, kn, vn, kc, vc, pos = make_inputs(torch, batch, args.q_heads, args.kv_heads, seq, capacity,
                                         args.head_dim, window, getattr(torch, args.dtype))
    out = torch.empty_like(q)
    want = reference.bounded_window_attention(q, kn, vn, kc, vc, pos, window=window)
    got = bounded_window_attention_triton(q, kn, vn, kc, vc, pos, window, out=out)
    err = (got.float() - want.float()).abs().max().item()
    mask = reference.attention_mask(pos, capacity, seq, window)          # [B, 1, S, C + S]
    keys, values = torch.cat([kc, kn], 2), torch.cat([vc, vn], 2)         # [B, Hkv, C + S, D]
    t_triton = do_bench(lambda: bounded_window_attention_triton(q, kn, vn, kc, vc, pos, window,
                                                                out=out),
                        return_mode="median") * 1e-3
    t_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, enable_gqa=True), return_mode="median") * 1e-3
    nbytes = needed_bytes(q, kn, kc, pos, window)
    cols = []
    for t in (t_triton, t_sdpa):
        bw = nbytes / t
        cols.append(f"{t * 1e6:>10.1f} {bw / 1e9:>7.0f} "
                    f"{100 * bw / peak if peak else float('nan'):>6.1f}")
    row = (f"{batch:>3} {seq:>5} {window:>7} {capacity:>7} | {cols[0]} | {cols[1]} | "
           f"{t_sdpa / t_triton:>7.2f} {err:>8.1e}")
    return {"batch": batch, "seq": seq, "window": window, "capacity": capacity,
            "triton_us": t_triton * 1e6, "sdpa_us": t_sdpa * 1e6, "max_err": err, "row": row}


def dry_run(args) -> dict:
    """One small case on the CPU under the Triton interpreter: numerics only."""
    os.environ["TRITON_INTERPRET"] = "1"       # before triton is imported
    import torch

    from plugins import reference
    from plugins.triton_kernel import bounded_window_attention_triton, interpreter_mode
    if not interpreter_mode():
        return {"dry_run": True, "rows": [], "summary": ["dry run: triton was imported before "
                                                         "TRITON_INTERPRET could be set"]}
    torch.manual_seed(0)
    q, kn, vn = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    kc, vc = torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)
    pos = torch.tensor([13])
    err = float((bounded_window_attention_triton(q, kn, vn, kc, vc, pos, 8)
                 - reference.bounded_window_attention(q, kn, vn, kc, vc, pos, 8)).abs().max())
    return {"dry_run": True, "rows": [{"max_err": err}], "summary": [
        f"dry run (CPU, Triton interpreter, fp32 GQA decode, window 8, wrapped ring): max err "
        f"{err:.1e} against the reference; no timing"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, nargs="+", default=[1, 256], help="new positions S")
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 1024, 4096],
                    help="bounded windows (C = window)")
    ap.add_argument("--unbounded", type=int, nargs="*", default=[4096, 32768],
                    help="cache sizes C for window = 0")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", type=Path, help="also write the rows and a summary here")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    print("$", shlex.join([sys.executable, *sys.argv]))
    if args.dry_run:
        result = dry_run(args)
        print(result["summary"][0])
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU: nothing to benchmark (the kernel's CPU tests run under "
              "TRITON_INTERPRET=1 in tests/test_triton_kernel.py).")
        return 0
    from plugins import spec
    from plugins.triton_kernel import interpreter_mode

    if interpreter_mode():
        print("triton was imported with TRITON_INTERPRET=1; unset it to benchmark the GPU kernel")
        return 1
    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props)
    print(f"{props.name}, sm_{props.major}{props.minor}, peak {peak / 1e9:.0f} GB/s; "
          f"{args.dtype}, Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}; "
          f"{spec.kernel_config(args.dtype, args.head_dim)}")
    header = (f"{'B':>3} {'S':>5} {'window':>7} {'C':>7} | {'triton us':>10} {'GB/s':>7} "
              f"{'%peak':>6} | {'sdpa us':>10} {'GB/s':>7} {'%peak':>6} | {'speedup':>7} "
              f"{'max err':>8}")
    print(header)
    print("-" * len(header))
    cases = [(w, w) for w in args.windows] + [(0, c) for c in args.unbounded]
    rows = []
    for batch in args.batch:
        for seq in args.seq:
            for window, capacity in cases:
                rows.append(run_case(torch, args, batch, seq, window, capacity, peak))
                print(rows[-1]["row"], flush=True)
    if args.json:
        speedups = [r["sdpa_us"] / r["triton_us"] for r in rows]
        summary = (f"Triton vs SDPA, {props.name} {args.dtype}: {len(rows)} cases, speedup "
                   f"{min(speedups):.2f}-{max(speedups):.2f}x, worst max err "
                   f"{max(r['max_err'] for r in rows):.1e}")
        args.json.write_text(json.dumps({"dry_run": False, "device": props.name, "rows": rows,
                                         "summary": [summary]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
