"""`stagcompile validate`: every backend available here against the PyTorch reference's golden trace.

    backend        what runs                                        when
    ort            ONNX Runtime, contrib-op graphs (ort flavour)    ort graphs (fp32, fp16)
    ort-portable   ONNX Runtime, standard-op graphs                 always
    ort-plugin     ONNX Runtime + the plugin node's kernel          fp32 plugin graphs, extensions
    onnx-reference ONNX's reference evaluator, portable graphs      bf16 bundles (no ORT CPU kernels)
    trt            TensorRT engines from `stagcompile build`        tensorrt, a GPU, built engines

Per backend and stack, Polygraphy's runner executes the graph on every traced step (inputs from
`stagcompile.replay`) and Polygraphy's Comparator checks each output against the reference with
dtype-appropriate tolerances (the ort flavour's different layout is translated by
`stagcompile.ort_replay`). An engine has one optimization profile per step kind (decode:
sequence 1, prefill: 1..max_prefill), so each step runs on a TrtRunner created with the
`optimization_profile` whose ranges hold its batch and sequence length. Then the runtime's
greedy tokens (both schedules, every ONNX Runtime flavour) are checked against the trace. A
failure names the stack, output, step, worst element and its error, and saves the inputs and
expected outputs so the printed `polygraphy run ...` command reproduces it. A bundle with
quantized weights (`export --quant`) is held to quality thresholds instead of tolerances: token
agreement over the golden trace and, with `--text FILE`, bits per byte against an fp32 reference
bundle (stagcompile.quality). Writes `validation/report.json` (atomically). Needs no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stagcompile.atomic import check_writable, write_text_atomic
from stagcompile.errors import StagError
from stagcompile.ort_replay import OrtReplay
from stagcompile.replay import Trace
from stagcompile.runtime.bundle import Bundle, BundleError
from stagcompile.runtime.ort_backend import BF16_UNSUPPORTED

FLAVOUR_OF = {"ort": "ort", "ort-portable": "portable", "ort-plugin": "plugin",
              "onnx-reference": "portable"}
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (5e-2, 1e-2), "bfloat16": (1.5e-1, 2e-2)}


@dataclass
class Check:
    backend: str
    stack: int
    steps: int = 0
    outputs: int = 0
    max_abs: float = 0.0
    worst: str = ""
    passed: bool = True
    failure: str = ""
    repro: str = ""


@dataclass
class Report:
    bundle: str
    dtype: str
    atol: float
    rtol: float
    checks: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    tokens: list = field(default_factory=list)
    text: dict | None = None

    @property
    def ran(self) -> bool:
        return bool(self.checks or self.tokens)

    @property
    def passed(self) -> bool:
        return (self.ran and all(c.passed for c in self.checks)
                and all(t["passed"] for t in self.tokens)
                and (self.text is None or self.text["passed"]))

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "dtype": self.dtype, "atol": self.atol, "rtol": self.rtol,
                "passed": self.passed, "ran": self.ran, "checks": [asdict(c) for c in self.checks],
                "skipped": self.skipped, "tokens": self.tokens, "text": self.text}


def _quiet_polygraphy():
    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.ERROR


def _one_runner(runner):
    """A backend whose runner takes every step: step feeds -> (runner, None)."""
    return lambda feeds: (runner, None)


def _ort_runners(bundle: Bundle, flavour: str, name: str):
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    def loader(path):
        def make():
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if flavour == "plugin":
                from plugins.ort_kernel import session_options
                so = session_options(so)
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return make

    return [_one_runner(OnnxrtRunner(loader(bundle.graph(flavour, k + 1)), name=name))
            for k in range(bundle.num_stacks)]


def _reference_runners(bundle: Bundle):
    from stagcompile.refrunner import OnnxReferenceRunner
    return [_one_runner(OnnxReferenceRunner(bundle.graph("portable", k + 1),
                                            name="onnx-reference"))
            for k in range(bundle.num_stacks)]


def profile_for(profiles: list[dict], batch: int, seq: int) -> dict | None:
    """The first optimization profile whose batch and sequence ranges hold (batch, seq)."""
    return next((p for p in profiles if p["batch"][0] <= batch <= p["batch"][2]
                 and p["seq"][0] <= seq <= p["seq"][2]), None)


def _trt_runners(bundle: Bundle):
    """Per stack: feeds -> (the TrtRunner of the profile that holds them, or None and why)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    profiles = bundle.manifest["engines"]["profiles"]
    ranges = "; ".join(f"{p['name']}: batch {p['batch'][0]}..{p['batch'][2]}, sequence "
                       f"{p['seq'][0]}..{p['seq'][2]}" for p in profiles)

    def picker(plan: bytes):
        runners = {p["index"]: TrtRunner(EngineFromBytes(plan), name="trt",
                                         optimization_profile=p["index"]) for p in profiles}

        def pick(feeds):
            batch, seq = feeds["input_ids"].shape
            p = profile_for(profiles, batch, seq)
            if p is None:
                return None, (f"batch {batch}, sequence {seq} is outside every optimization "
                              f"profile of the engine ({ranges}); rebuild with `stagcompile "
                              "build` and larger --max-batch / --max-prefill")
            return runners[p["index"]], None
        return pick

    return [picker(bundle.engine(k + 1).read_bytes()) for k in range(bundle.num_stacks)]


def available_backends(bundle: Bundle) -> tuple[dict, dict]:
    """{backend: runner factory} and {backend: why it is skipped}."""
    ready, skipped = {}, {}
    for flavour in ("ort", "portable", "plugin"):
        name = "ort" if flavour == "ort" else f"ort-{flavour}"
        if flavour not in bundle.flavours:
            why = (bundle.manifest.get("ort") or {}).get("skipped") if flavour == "ort" else None
            skipped[name] = why or f"the bundle has no {flavour} graphs"
            continue
        if bundle.dtype == "bfloat16":
            skipped[name] = BF16_UNSUPPORTED
            if flavour == "portable":
                skipped[name] += "; checked with ONNX's reference evaluator instead"
                ready["onnx-reference"] = lambda: _reference_runners(bundle)
            continue
        if flavour == "plugin":
            try:
                from plugins.ort_kernel import OrtKernelUnavailable, check_graph_dtype, register
                check_graph_dtype(bundle.dtype, "plugin graphs")
                register()
            except (ImportError, OrtKernelUnavailable) as exc:
                skipped[name] = str(exc)
                continue
        ready[name] = (lambda f=flavour, n=name: _ort_runners(bundle, f, n))
    if not bundle.manifest.get("engines"):
        skipped["trt"] = "no engines in the bundle (run `stagcompile build` on a GPU machine)"
    else:
        try:
            import tensorrt  # noqa: F401
            from polygraphy.backend.trt import TrtRunner  # noqa: F401
            ready["trt"] = lambda: _trt_runners(bundle)
        except ImportError:
            skipped["trt"] = "tensorrt is not installed here"
    return ready, skipped


def _worst(got: np.ndarray, want: np.ndarray) -> tuple[float, tuple]:
    diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
    idx = np.unravel_index(int(np.nanargmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape)
    return float(diff[idx]) if not np.isnan(diff[idx]) else float("inf"), tuple(int(i) for i in idx)


def _save_repro(root: Path, backend: str, stack: int, step: int, feeds: dict, golden: dict,
                graph: Path, atol: float, rtol: float, profile: int | None = None) -> str:
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json
    out = root / "validation" / "repro"
    out.mkdir(parents=True, exist_ok=True)
    inputs = out / f"{backend}_stack{stack}_step{step}_inputs.json"
    expected = out / f"{backend}_stack{stack}_step{step}_expected.json"
    save_json([feeds], str(inputs))
    RunResults([("reference", [IterationResult(golden, runner_name="reference")])]).save(str(expected))
    runner = (f"--trt --model-type engine --optimization-profile {profile}" if backend == "trt"
              else "--onnxrt")
    note = {"ort-plugin": "  # plus the stagformer ORT kernel: not loadable from the CLI",
            "onnx-reference": "  # bf16: not on ONNX Runtime's CPU provider; with "
                              "onnxruntime-gpu try --providers cuda"}.get(backend, "")
    return (f"polygraphy run {graph} {runner} --load-inputs {inputs} --load-outputs {expected} "
            f"--atol {atol} --rtol {rtol}{note}")


def _check_stack(bundle, trace_steps, pick, backend, stack, atol, rtol, convert=None) -> Check:
    """`pick(feeds)` -> (runner, None) or (None, why) chooses the runner of each step;
    `convert(stack, feeds, outputs)`, when given, maps the graph's outputs to the golden names
    and layout first (the ort flavour)."""
    from polygraphy.comparator import (Comparator, IterationResult, RunResults,
                                       SimpleCompareFunc)
    feeds = [s.feeds for s in trace_steps]
    goldens = [s.golden for s in trace_steps]
    check = Check(backend, stack, steps=len(feeds), outputs=len(goldens[0]))
    groups: dict = {}                    # runner -> indices of the steps it runs
    ran_on = []
    for i, f in enumerate(feeds):
        runner, why = pick(f)
        if runner is None:
            check.passed = False
            check.failure = f"stack {stack}, step {trace_steps[i].step}: {why}"
            return check
        groups.setdefault(runner, []).append(i)
        ran_on.append(runner)
    outs = [None] * len(feeds)
    for runner, idx in groups.items():
        try:
            results = Comparator.run([runner], data_loader=[feeds[i] for i in idx])
        except Exception as exc:      # a runner that cannot load or run the graph is a failure
            check.passed = False
            check.failure = f"stack {stack}: {backend} could not run the graph: {exc}".strip()
            return check
        for i, result in zip(idx, results[runner.name]):
            outs[i] = result
    if convert is not None:
        outs = [IterationResult(convert(stack, f, dict(o)), runner_name=backend)
                for f, o in zip(feeds, outs)]
    expected = [IterationResult({n: g[n].astype(outs[i][n].dtype) for n in g},
                                runner_name="reference") for i, g in enumerate(goldens)]
    both = RunResults([("reference", expected), (backend, outs)])
    verdict = Comparator.compare_accuracy(both, compare_func=SimpleCompareFunc(
        atol=atol, rtol=rtol, check_error_stat="elemwise", infinities_compare_equal=False))
    # Polygraphy >= 0.53 returns AccuracyResults (one AccuracyResult per compare function)
    result = verdict if hasattr(verdict, "values") else verdict[0]
    per_iter = list(result.values())[0]
    for i, (it, golden) in enumerate(zip(per_iter, goldens)):
        for name in golden:
            err, idx = _worst(outs[i][name], golden[name])
            if err >= check.max_abs:
                check.max_abs, check.worst = err, f"{name} step {trace_steps[i].step} at {idx}"
            if not it[name] and check.passed:
                check.passed = False
                check.failure = (f"stack {stack}, output {name}, step {trace_steps[i].step} "
                                 f"({'prefill' if trace_steps[i].step == 0 else 'decode'}): "
                                 f"worst element {idx} differs by {err:.3g} "
                                 f"(got {float(outs[i][name][idx]):.6g}, expected "
                                 f"{float(golden[name][idx]):.6g}; atol {atol}, rtol {rtol})")
                graph = (bundle.engine(stack) if backend == "trt"
                         else bundle.graph(FLAVOUR_OF[backend], stack))
                check.repro = _save_repro(bundle.root, backend, stack, trace_steps[i].step,
                                          feeds[i], golden, graph, atol, rtol,
                                          getattr(ran_on[i], "optimization_profile", None))
                if convert is not None:
                    check.repro += ("  # ort flavour: outputs are in the graph's layout; "
                                    "stagcompile.ort_replay.OrtReplay.to_golden maps them")
    return check


def _token_check(bundle: Bundle, trace: Trace, backend: str, schedule: str, atol: float,
                 flavour: str | None = None) -> dict:
    from stagcompile.runtime.generator import Generator, make_backend
    gen = Generator(bundle, make_backend(bundle, backend, schedule, flavour=flavour), schedule)
    try:
        got = gen.generate(trace.prompt, trace.tokens.shape[1])
    finally:
        gen.close()
    want = trace.tokens
    out = {"backend": backend if flavour is None else f"{backend} ({flavour})",
           "schedule": schedule, "steps": int(want.shape[1]),
           "passed": bool(np.array_equal(got, want)), "note": ""}
    if not out["passed"]:
        row, step = map(int, np.argwhere(got != want)[0])
        out["note"] = f"row {row} diverges at step {step}: got {got[row, step]}, expected {want[row, step]}"
        if bundle.dtype != "float32":
            logits = trace.data[f"s{step}/{bundle.num_stacks}/logits"][row, -1]
            margin = float(logits[want[row, step]] - logits[got[row, step]])
            if margin <= atol:
                out["passed"] = True
                out["note"] += f" (reference margin {margin:.3g} <= atol: a near tie in {bundle.dtype})"
    return out


def validate_bundle(root: Path, atol: float | None = None, rtol: float | None = None,
                    show_progress: bool = True, text: Path | None = None,
                    reference: Path | None = None, min_agreement: float | None = None,
                    max_bpb_rise: float | None = None) -> Report:
    from stagcompile import quality
    from stagcompile.progress import progress
    try:
        bundle = Bundle.load(root)
    except BundleError as exc:
        raise StagError(str(exc)) from None
    try:
        trace = Trace(bundle)
    except FileNotFoundError as exc:
        raise StagError(str(exc)) from None
    d_atol, d_rtol = TOLERANCES[bundle.dtype]
    atol, rtol = (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)
    limits = quality.THRESHOLDS[bundle.quant["bits"]] if bundle.quant else {"agreement": 1.0,
                                                                            "bpb_rise": 0.0}
    min_agreement = limits["agreement"] if min_agreement is None else min_agreement
    max_bpb_rise = limits["bpb_rise"] if max_bpb_rise is None else max_bpb_rise
    for flag, value in (("--atol", atol), ("--rtol", rtol), ("--max-bpb-rise", max_bpb_rise)):
        if not (math.isfinite(value) and value >= 0):
            raise StagError(f"{flag} {value}: tolerances must be finite numbers >= 0")
    if not 0 <= min_agreement <= 1:
        raise StagError(f"--min-agreement {min_agreement}: expected a share between 0 and 1")
    ref_bundle = quality.load_reference(bundle, reference, text)
    report_file = bundle.root / "validation" / "report.json"
    check_writable(report_file)
    _quiet_polygraphy()
    ready, skipped = available_backends(bundle)
    report = Report(str(root), bundle.dtype, atol, rtol, skipped=skipped)
    by_stack: dict[str, dict[int, list]] = {}

    ort = OrtReplay(bundle, trace) if "ort" in ready else None

    def steps_of(backend: str) -> dict[int, list]:
        dtype = "float32" if backend == "onnx-reference" else bundle.dtype   # it casts itself
        key = (dtype, backend == "ort")
        if key not in by_stack:
            by_stack[key] = {}
            for st in (ort.steps(dtype) if backend == "ort" else trace.steps(dtype)):
                by_stack[key].setdefault(st.stack, []).append(st)
        return by_stack[key]
    # the runtime's ONNX Runtime backend runs the ort or the portable graphs
    token_runs = [("ort", s, f) for f in ("ort", "portable") for s in ("staggered", "sequential")
                  if ("ort" if f == "ort" else "ort-portable") in ready]
    if "ort-portable" not in ready:
        skipped["greedy tokens (ort, portable)"] = ("the runtime's ONNX Runtime backend runs "
                                                    "portable graphs: " + skipped["ort-portable"])
    if "trt" in ready:
        token_runs += [("trt", "staggered", None), ("trt", "sequential", None)]
    if bundle.quant:
        why = (f"weights quantized to {bundle.quant['weights']}: outputs differ from the fp32 "
               "reference by design; held to token agreement (and bits per byte with --text)")
        skipped |= {f"{name} (per-element)": why for name in ready}
        ready = {}
    with progress(show_progress) as bar:
        task = bar.add_task("validate", total=len(ready) * bundle.num_stacks + len(token_runs))
        for backend, make in ready.items():
            for k, pick in enumerate(make()):
                bar.update(task, description=f"{backend}: stack {k + 1}")
                report.checks.append(_check_stack(
                    bundle, steps_of(backend)[k + 1], pick, backend, k + 1, atol, rtol,
                    ort.to_golden if backend == "ort" else None))
                bar.advance(task)
        for backend, schedule, flavour in token_runs:
            bar.update(task, description=f"greedy tokens: {backend} {schedule}")
            report.tokens.append(
                quality.agreement(bundle, trace, backend, schedule, flavour, min_agreement)
                if bundle.quant else _token_check(bundle, trace, backend, schedule, atol, flavour))
            bar.advance(task)
        if text is not None:
            bar.update(task, description=f"bits per byte on {text}")
            report.text = quality.text_check(bundle, text, ref_bundle, max_bpb_rise)
    write_text_atomic(report_file, json.dumps(report.to_dict(), indent=2), "validation report")
    return report


def print_report(report: Report) -> None:
    from rich.table import Table

    from stagcompile.progress import table_console
    con = table_console()
    t = Table(title=f"validation of {report.bundle} ({report.dtype}, atol {report.atol}, "
                    f"rtol {report.rtol})")
    for col in ("backend", "stack", "steps", "outputs", "max |err|", "worst at", "verdict"):
        t.add_column(col)
    for c in report.checks:
        t.add_row(c.backend, str(c.stack), str(c.steps), str(c.outputs), f"{c.max_abs:.2e}",
                  c.worst, "[green]pass[/]" if c.passed else "[red]FAIL[/]")
    con.print(t)
    for tok in report.tokens:
        if "agreement" in tok:
            verdict = "[green]pass[/]" if tok["passed"] else "[red]FAIL[/]"
        else:
            verdict = "[green]match[/]" if tok["passed"] else "[red]MISMATCH[/]"
        con.print(f"greedy tokens, {tok['backend']} {tok['schedule']}: {verdict} over "
                  f"{tok['steps']} steps {tok['note']}")
    for r in (report.text or {}).get("results", []):
        ref = report.text["reference"]
        vs = (f" vs {ref['bpb']:.4f} for the reference {ref['bundle']}: {r['rise']:+.2%} "
              f"(at most {report.text['max_rise']:+.1%}) "
              + ("[green]pass[/]" if r["passed"] else "[red]FAIL[/]") if ref else "")
        con.print(f"bits per byte on {report.text['text']} ({r['flavour']} graphs, "
                  f"{r['tokens']} tokens, {r['bytes']} bytes): {r['bpb']:.4f}{vs}")
    for name, why in report.skipped.items():
        con.print(f"[yellow]skipped {name}[/]: {why}")
    if not report.ran:
        con.print("[bold red]NOTHING VALIDATED[/]: no backend that can run this bundle is "
                  "available here")
        return
    for c in report.checks:
        if not c.passed:
            con.print(f"[red]FAIL[/] {c.backend}: {c.failure}\n  reproduce: {c.repro}")
    con.print("[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]")
