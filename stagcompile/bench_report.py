"""Ratios, targets, thread scaling, tables, JSON and plot for `stagcompile bench`.

Per cell (batch, context, cross window), from the medians of the measured rows:

    overlap          sequential 1 thread / staggered 1 thread per stack     (ideal: P)
    stagger gain     best sequential / best staggered                        (same cores, each at its best)
    vs baseline      best P = 1 baseline of the same depth / best staggered
    vs torch         best PyTorch eager cached decode / best staggered
    efficiency       slowest stack alone (1 thread) / staggered 1 thread per stack
    p1 vs stag 1t    P = 1 baseline at 1 thread / staggered at 1 thread per stack
    peer / p1 1t|Nt  ONNX Runtime GenAI (same weights) / our P = 1 baseline, both at 1 and at N
                     threads (N = all cores)                                (--peer ortgenai)
    peer / stag      ONNX Runtime GenAI at N threads / best staggered           (reported)
    q vs fp32        best staggered fp32 / best staggered with q = int8 | int4 weights
    q peer / P1 Nt   ONNX Runtime GenAI at q / our P = 1 baseline at q, both at N threads
    q peer / stag    ONNX Runtime GenAI at q, N threads / best staggered at q    (reported)
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stagcompile.progress import table_console

TARGETS = {"overlap": 1.8, "stagger_gain": 1.15, "vs_baseline": 1.1, "vs_torch": 3.0,
           "efficiency": 0.9, "stag_vs_p1_1t": 1.6, "p1_vs_peer_1t": 1.0, "p1_vs_peer_nt": 1.0,
           "stag_vs_peer": None, "int4_vs_fp32": 2.0, "int8_vs_fp32": None,
           "int4_p1_vs_peer_nt": 1.0, "int8_p1_vs_peer_nt": 1.0, "int4_stag_vs_peer": None,
           "int8_stag_vs_peer": None}
TARGET_NOTES = {
    "overlap": "staggered 1 thread/stack over sequential 1 thread",
    "stagger_gain": "staggered best split over best sequential",
    "vs_baseline": "StagFormer staggered over best P = 1 baseline of the same depth",
    "vs_torch": "stagcompile runtime over PyTorch eager cached decode",
    "efficiency": "slowest stack alone over the staggered step",
    "stag_vs_p1_1t": "staggered 1 thread/stack over the P = 1 baseline at 1 thread",
    "p1_vs_peer_1t": "our P = 1 over ONNX Runtime GenAI, same weights, 1 thread each",
    "p1_vs_peer_nt": "our P = 1 over ONNX Runtime GenAI, same weights, all cores each",
    "stag_vs_peer": "best staggered over ONNX Runtime GenAI P = 1 at all cores (reported)",
} | {f"{q}_{key}": note.format(q=q) for q in ("int8", "int4") for key, note in (
    ("vs_fp32", "staggered with {q} weights over staggered fp32, each at its best split"),
    ("p1_vs_peer_nt", "our P = 1 over ONNX Runtime GenAI, both {q}, same weights, all cores"),
    ("stag_vs_peer", "best staggered {q} over ONNX Runtime GenAI {q} P = 1 at all cores "
                     "(reported)"))}


def _best(rows, kind):
    cand = [r for r in rows if r["kind"] == kind]
    return min(cand, key=lambda r: r["median_ms"]) if cand else None


def _one_thread(rows, kind):
    cand = [r for r in rows if r["kind"] == kind and max(r["threads"]) == 1]
    return cand[0] if cand else None


def _threads(rows, kind, n):
    cand = [r for r in rows if r["kind"] == kind and tuple(r["threads"]) == (n,)]
    return cand[0] if cand else None


def _ratio(num, den):
    return num["median_ms"] / den["median_ms"] if num and den else None


def cell_ratios(rows: list[dict]) -> dict:
    seq1, stag1 = _one_thread(rows, "sequential"), _one_thread(rows, "staggered")
    seq, stag = _best(rows, "sequential"), _best(rows, "staggered")
    base, torch = _best(rows, "baseline"), _best(rows, "torch")
    stacks = [r for r in rows if r["kind"] == "stack"]
    out = {"best_sequential": seq["label"], "best_staggered": stag["label"],
           "best_baseline": base["label"] if base else None,
           "overlap": seq1["median_ms"] / stag1["median_ms"],
           "stagger_gain": seq["median_ms"] / stag["median_ms"],
           "vs_baseline": base["median_ms"] / stag["median_ms"] if base else None,
           "vs_torch": torch["median_ms"] / stag["median_ms"] if torch else None}
    if stacks:
        ideal = max(r["median_ms"] for r in stacks)
        out |= {"ideal_step_ms": ideal, "efficiency": ideal / stag1["median_ms"]}
    n = max((max(r["threads"]) for r in rows if r["kind"] == "baseline"), default=1)
    base1, peer1 = _one_thread(rows, "baseline"), _threads(rows, "peer", 1)
    out |= {"stag_vs_p1_1t": _ratio(base1, stag1), "p1_vs_peer_1t": _ratio(peer1, base1),
            "p1_vs_peer_nt": _ratio(_threads(rows, "peer", n), _threads(rows, "baseline", n)),
            "stag_vs_peer": _ratio(_threads(rows, "peer", n), stag)}
    for q in ("int8", "int4"):
        qstag = _best(rows, f"staggered {q}")
        out |= {f"{q}_vs_fp32": _ratio(stag, qstag),
                f"{q}_p1_vs_peer_nt": _ratio(_threads(rows, f"peer {q}", n),
                                             _threads(rows, f"baseline {q}", n)),
                f"{q}_stag_vs_peer": _ratio(_threads(rows, f"peer {q}", n), qstag)}
    return out


def scaling(rows: list[dict]) -> list[dict]:
    """Median step by intra-op threads per stack, sequential vs staggered (uniform splits)."""
    out = []
    for r in rows:
        uniform = len(set(r["threads"])) == 1
        if r["kind"] in ("sequential", "staggered") and uniform:
            out.append({"batch": r["batch"], "context": r["context"], "window": r["window"],
                        "schedule": r["kind"], "threads_per_stack": r["threads"][0],
                        "median_ms": r["median_ms"]})
    return out


def summarise(meta: dict, rows: list[dict]) -> dict:
    cells = sorted({(r["batch"], r["context"], r["window"]) for r in rows})
    ratios = []
    for b, c, w in cells:
        sub = [r for r in rows if (r["batch"], r["context"], r["window"]) == (b, c, w)]
        ratios.append({"batch": b, "context": c, "window": w} | cell_ratios(sub))
    return {"meta": meta, "rows": rows, "ratios": ratios, "scaling": scaling(rows)}


def print_report(res: dict, con: Console | None = None) -> None:
    con = con or table_console()
    m = res["meta"]
    con.print(f"[bold]stagcompile bench[/] ({m['backend']}, {m['cores']} cores, "
              f"{m['rounds']} rounds x {m['iters']} steps after {m['warmup']} warm-up, "
              f"ORT spinning {'on' if m['spinning'] else 'off'}"
              + (f", first-layer Q|K|V table {m['qkv_table']}" if m.get("qkv_table") else "")
              + (f", huge pages {'on' if m['huge_pages'] else 'off'}"
                 if m.get("huge_pages") is not None else "")
              + ")")
    t = Table(title="per-token decode latency (ms) and prefill throughput")
    for col in ("batch", "ctx", "cross win", "configuration", "median", "p10", "p90",
                "prefill tok/s"):
        t.add_column(col, justify="right" if col not in ("configuration", "cross win") else "left")
    for r in res["rows"]:
        t.add_row(str(r["batch"]), str(r["context"]), r["window"], r["label"],
                  f"{r['median_ms']:.3f}", f"{r['p10_ms']:.3f}", f"{r['p90_ms']:.3f}",
                  f"{r['prefill_tok_s']:,.0f}" if r["prefill_tok_s"] else "")
    con.print(t)
    checks = ([("fp32", m["peer_tokens"])] if m.get("peer_tokens") else []) + list(
        (m.get("peer_tokens_quant") or {}).items())
    for q, pt in checks:
        con.print(f"ONNX Runtime GenAI on the baseline's weights ({q}): greedy tokens "
                  f"{'[green]identical[/]' if pt['match'] else '[red]DIFFER[/]'} to ours "
                  f"over {len(pt['ours'])} steps")
    t = Table(title="ratios (higher is better; target in brackets)")
    keys = ["overlap", "stagger_gain", "vs_baseline", "vs_torch", "efficiency", "stag_vs_p1_1t"]
    if m.get("peer"):
        keys += ["p1_vs_peer_1t", "p1_vs_peer_nt", "stag_vs_peer"]
    for q in m.get("quant") or ():
        keys += [f"{q}_vs_fp32"] + ([f"{q}_p1_vs_peer_nt", f"{q}_stag_vs_peer"]
                                    if m.get("peer") else [])
    for col in ["batch", "ctx", "cross win"] + [_heading(k) for k in keys] + ["best staggered"]:
        t.add_column(col)
    for r in res["ratios"]:
        def fmt(key):
            v = r.get(key)
            if v is None:
                return "-"
            if TARGETS[key] is None:
                return f"{v:.2f}"
            return f"[{'green' if v >= TARGETS[key] else 'red'}]{v:.2f}[/]"
        t.add_row(str(r["batch"]), str(r["context"]), r["window"], *map(fmt, keys),
                  r["best_staggered"])
    con.print(t)
    for k in keys:
        con.print(f"  {_heading(k)}: {TARGET_NOTES[k]}", highlight=False)
    t = Table(title="thread scaling: median ms per step by intra-op threads per stack")
    for col in ("batch", "ctx", "cross win", "schedule", "threads/stack", "median ms"):
        t.add_column(col)
    for r in res["scaling"]:
        t.add_row(str(r["batch"]), str(r["context"]), r["window"], r["schedule"],
                  str(r["threads_per_stack"]), f"{r['median_ms']:.3f}")
    con.print(t)


HEADINGS = {"overlap": "overlap", "stagger_gain": "stagger gain", "vs_baseline": "vs baseline",
            "vs_torch": "vs torch", "efficiency": "efficiency", "stag_vs_p1_1t": "P1/stag 1t",
            "p1_vs_peer_1t": "peer/P1 1t", "p1_vs_peer_nt": "peer/P1 Nt",
            "stag_vs_peer": "peer Nt/stag"} | {
    f"{q}_{key}": f"{q} {head}" for q in ("int8", "int4") for key, head in (
        ("vs_fp32", "vs fp32"), ("p1_vs_peer_nt", "peer/P1 Nt"), ("stag_vs_peer", "peer Nt/stag"))}


def _heading(key: str) -> str:
    target = TARGETS[key]
    return HEADINGS[key] + (f" [{target:g}]" if target is not None else "")


def write_json(res: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(res, indent=2) + "\n")


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from stagcompile.errors import StagError
        raise StagError("--plot needs matplotlib: pip install matplotlib") from None
    cells = sorted({(r["batch"], r["context"], r["window"]) for r in res["rows"]})
    fig, axes = plt.subplots(len(cells), 1, figsize=(10, 3.2 * len(cells)), squeeze=False)
    for ax, (b, c, w) in zip(axes[:, 0], cells):
        sub = [r for r in res["rows"] if (r["batch"], r["context"], r["window"]) == (b, c, w)
               and r["kind"] != "stack"]
        ax.barh([r["label"] for r in sub], [r["median_ms"] for r in sub],
                xerr=[[r["median_ms"] - r["p10_ms"] for r in sub],
                      [r["p90_ms"] - r["median_ms"] for r in sub]], color="tab:blue")
        ax.set_title(f"batch {b}, context {c}, {w} cross window")
        ax.set_xlabel("ms per decode step (median, p10-p90)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
