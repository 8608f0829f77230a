"""Two-stream overlap of a StagFormer's two stacks on a GPU (PyTorch, CUDA graphs), against one
stream and a P = 1 model of equal depth, at batch 1.

    python benchmarks/streams.py [--presets small base] [--context 128] [--steps 200]
                                 [--rounds 5] [--dtype bfloat16] [--json F] [--dry-run]

Per (stack, parity) one CUDA graph of the decode step on static buffers, with the TensorRT
runtime's dataflow (DESIGN.md section 4): stack k reads pending[k][p] and writes the consumer's
next cross entry into pending[k+1][1-p]; it commits its new entries into its rings at slot
pos mod C on the device (index_copy_); the last stack writes the greedy token and the position of
the next step into the step buffers of the other parity. Attention is the Triton kernel (the
deployment kernel; no host syncs). Per token:

    two streams   stack k's graph on stream k; events as in the runtime (stack 2 waits for stack
                  1's previous step, stack 1 for the previous token)
    one stream    the same graphs one after another
    eager         the same step functions without graphs, one stream
    baseline      a P = 1 model with the same total depth and width, one graph per step

Times are wall-clock milliseconds per token over `--steps` steps (the next token is chosen on the
GPU, so no host sync per step), the median of `--rounds` rounds (positions restart at `--context`
each round; cache contents do not change the work).
The graphs' greedy tokens and logits are checked against the same step functions run eagerly.
`--dry-run`, or no CUDA: the step functions run eagerly on the CPU for a tiny model and are
checked against `stagcompile.generate.cached_generate`; nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Decode:
    """Static decode state of one model and its per-(stack, parity) step functions."""

    def __init__(self, model, batch: int, device):
        import torch

        cfg, dt = model.cfg, model.embed.weight.dtype
        self.model, self.cfg, self.p = model, cfg, cfg.num_stacks
        if self.p > 2:
            raise ValueError("the step buffers here are shared by the stacks: P <= 2")
        kv = (batch, cfg.n_kv_heads, 1, cfg.head_dim)

        def rings(cap):
            return [(torch.zeros(kv[:2] + (cap,) + kv[3:], dtype=dt, device=device),
                     torch.zeros(kv[:2] + (cap,) + kv[3:], dtype=dt, device=device))
                    for _ in range(cfg.layers_per_stack)]

        self.self_cache = [rings(cfg.self_capacity()) for _ in range(self.p)]
        self.cross_cache = [None] + [rings(cfg.cross_capacity()) for _ in range(self.p - 1)]
        self.pending = [None] + [[[(torch.zeros(kv, dtype=dt, device=device),
                                    torch.zeros(kv, dtype=dt, device=device))
                                   for _ in range(cfg.layers_per_stack)] for _ in (0, 1)]
                                 for _ in range(self.p - 1)]
        self.ids = [torch.zeros(batch, 1, dtype=torch.int64, device=device) for _ in (0, 1)]
        self.pos = [torch.zeros(batch, dtype=torch.int64, device=device) for _ in (0, 1)]
        self.logits = torch.zeros(batch, cfg.vocab_size, device=device)

    def reset(self, token: int, pos: int) -> None:
        """Empty caches, the null entry pending for position 0, `token` at `pos` (parity 0)."""
        import torch

        for rings in self.self_cache + [c for c in self.cross_cache if c]:
            for k, v in rings:
                k.zero_()
                v.zero_()
        with torch.no_grad():
            for c in range(1, self.p):
                for (pk, pv), (nk, nv) in zip(self.pending[c][0],
                                              self.model.null_entries(c, self.ids[0].shape[0])):
                    pk.copy_(nk)
                    pv.copy_(nv)
        self.ids[0].fill_(token)
        self.pos[0].fill_(pos)

    def seek(self, pos: int) -> None:
        self.pos[0].fill_(pos)

    def step(self, k: int, parity: int) -> None:
        """Stack k's decode step at the position in pos[parity] (device tensors only)."""
        import torch

        ids, pos = self.ids[parity], self.pos[parity]
        cross_in = self.pending[k][parity] if k > 0 else None
        with torch.no_grad():
            out = self.model.stack_step(k, ids, pos, self.self_cache[k], self.cross_cache[k],
                                        cross_in, with_null=False)
            for rings, news in ((self.self_cache[k], out.new_self),
                                (self.cross_cache[k], cross_in)):
                for ring, new in zip(rings or [], news or []):
                    slot = pos[:1] % ring[0].shape[2]                     # ring slot, on device
                    ring[0].index_copy_(2, slot, new[0])
                    ring[1].index_copy_(2, slot, new[1])
            if k < self.p - 1:
                for (dk, dv), (ok, ov) in zip(self.pending[k + 1][1 - parity], out.cross_out):
                    dk.copy_(ok)
                    dv.copy_(ov)
            else:
                self.logits.copy_(out.logits[:, -1])
                self.ids[1 - parity].copy_(self.logits.argmax(-1, keepdim=True))
                self.pos[1 - parity].copy_(pos + 1)


def make_model(cfg, dtype: str, device):
    """Random weights, perturbed far from the init so that greedy tokens vary."""
    import torch

    from stagcompile.model import StagFormer
    torch.manual_seed(0)
    model = StagFormer(cfg)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape) * 0.1)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def eager_tokens(dec: Decode, steps: int, token: int = 1) -> tuple[list, list]:
    """Greedy tokens and logits of `steps` decode steps from position 0, eagerly."""
    dec.reset(token, 0)
    tokens, logits = [], []
    for i in range(steps):
        for k in range(dec.p):
            dec.step(k, i % 2)
        tokens.append(int(dec.ids[(i + 1) % 2][0, 0]))
        logits.append(dec.logits.float().cpu().clone())
    return tokens, logits


def dry_run() -> dict:
    """The step functions on the CPU against the reference's cached decoding (tiny model)."""
    import torch

    from stagcompile.config import preset
    from stagcompile.generate import cached_generate
    cfg = preset("tiny")
    dec = Decode(make_model(cfg, "float32", "cpu"), 1, "cpu")
    tokens, _ = eager_tokens(dec, 12)
    want, _ = cached_generate(dec.model, torch.ones(1, 1, dtype=torch.int64), 13)
    ok = tokens == want[0, :12].tolist() and len(set(tokens)) > 1
    return {"dry_run": True, "tokens_match": ok, "rows": [],
            "summary": [f"dry run (CPU, tiny, eager step functions): tokens "
                        f"{'match' if ok else 'DIFFER from'} cached_generate"]}


class Graphs:
    """One CUDA graph per (stack, parity) of `dec`, captured after a warm-up."""

    def __init__(self, dec: Decode):
        import torch

        self.dec, self.graphs = dec, []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                     # warm-up: Triton compiles, cuBLAS plans
            for _ in range(3):
                for parity in (0, 1):
                    for k in range(dec.p):
                        dec.step(k, parity)
        torch.cuda.current_stream().wait_stream(side)
        for k in range(dec.p):
            self.graphs.append([])
            for parity in (0, 1):
                g = torch.cuda.CUDAGraph()              # own memory pool: graphs run concurrently
                with torch.cuda.graph(g):
                    dec.step(k, parity)
                self.graphs[k].append(g)

    def run(self, steps: int, streams: list, events, start: int = 0) -> None:
        """Decode steps start .. start+steps-1; stack k on streams[k] (events order the
        stacks: the first waits for the previous token, the others for the stack before)."""
        import torch

        p = self.dec.p
        for i in range(start, start + steps):
            parity = i % 2
            for k in range(p):
                s = streams[k]
                with torch.cuda.stream(s):
                    if k == 0:
                        s.wait_event(events["token"][1 - parity])
                    else:
                        s.wait_event(events["written"][k - 1][1 - parity])
                    self.graphs[k][parity].replay()
                    events["written"][k][parity].record(s)
                    if k == p - 1:
                        events["token"][parity].record(s)


def timed(fn, rounds: int, steps: int, seek) -> float:
    """Median over rounds of wall-clock milliseconds per step of fn() (which runs `steps`
    steps), from an idle GPU to the end of the last stream's work."""
    import statistics
    import time

    import torch

    times = []
    for _ in range(rounds):
        seek()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(times)


def graph_tokens(graphs: Graphs, streams, events, steps: int) -> tuple[list, list]:
    """Greedy tokens and logits of `steps` graph steps from position 0, one step at a time."""
    import torch

    dec = graphs.dec
    dec.reset(1, 0)
    torch.cuda.synchronize()
    tokens, logits = [], []
    for i in range(steps):
        graphs.run(1, streams, events, start=i)
        torch.cuda.synchronize()
        tokens.append(int(dec.ids[(i + 1) % 2][0, 0]))
        logits.append(dec.logits.float().cpu().clone())
    return tokens, logits


def measure(preset_name: str, args) -> dict:
    """One preset: the graphs checked against eager steps, then every configuration timed."""
    import torch

    from plugins.dispatch import using
    from plugins.triton_kernel import bounded_window_attention_triton
    from stagcompile.config import preset
    cfg = preset(preset_name).replace(num_stacks=2)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.context + args.steps + 2))
    base_cfg = cfg.replace(num_stacks=1, layers_per_stack=cfg.num_layers, shared_weights=False,
                           cross_window=None)
    dev = torch.device("cuda")
    streams = [torch.cuda.Stream() for _ in range(2)]
    one = [torch.cuda.current_stream()] * 2
    ev = {"token": [torch.cuda.Event() for _ in (0, 1)],
          "written": [[torch.cuda.Event() for _ in (0, 1)] for _ in range(2)]}
    with using(bounded_window_attention_triton):
        dec, base = (Decode(make_model(c, args.dtype, dev), 1, dev) for c in (cfg, base_cfg))
        want_tokens, want_logits = eager_tokens(dec, 16)
        graphs, base_graphs = Graphs(dec), Graphs(base)
        got_tokens, got_logits = graph_tokens(graphs, streams, ev, 16)
        err = max(float((a - b).abs().max()) for a, b in zip(got_logits, want_logits))
        ms = {}
        for label, fn, d in (
                ("two streams", lambda: graphs.run(args.steps, streams, ev), dec),
                ("one stream", lambda: graphs.run(args.steps, one, ev), dec),
                ("eager", lambda: [dec.step(k, i % 2) for i in range(args.steps)
                                   for k in range(2)], dec),
                ("baseline", lambda: base_graphs.run(args.steps, one, ev), base)):
            d.reset(1, args.context)
            ms[label] = timed(fn, args.rounds, args.steps, lambda d=d: d.seek(args.context))
    overlap, gain = ms["one stream"] / ms["two streams"], ms["baseline"] / ms["two streams"]
    match = got_tokens == want_tokens
    return {"preset": preset_name, "dtype": args.dtype, "context": args.context,
            "ms_per_token": ms, "overlap": overlap, "vs_baseline": gain,
            "max_logit_diff_graph_vs_eager": err, "tokens_match": match,
            "summary": f"{preset_name} {args.dtype} ctx {args.context}: two streams "
                       f"{ms['two streams']:.3f} ms/token, one stream {ms['one stream']:.3f}, "
                       f"eager {ms['eager']:.3f}, P=1 baseline {ms['baseline']:.3f} -> overlap "
                       f"{overlap:.2f}x, vs baseline {gain:.2f}x; graph tokens "
                       f"{'match' if match else 'DIFFER'} (max |dlogit| {err:.1e})"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "base"])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    print("$", shlex.join(["python", "benchmarks/streams.py", *sys.argv[1:]]), flush=True)
    import torch

    if args.dry_run or not torch.cuda.is_available():
        result = dry_run()
    else:
        rows = [measure(name, args) for name in args.presets]
        result = {"dry_run": False, "device": torch.cuda.get_device_name(0), "rows": rows,
                  "summary": [r["summary"] for r in rows]}
    for line in result["summary"]:
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = result.get("tokens_match", True) and all(r["tokens_match"] for r in result["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
