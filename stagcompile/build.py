"""`stagcompile build`: a bundle's ONNX graphs -> one TensorRT engine per stack (no torch here).

    build_engines(bundle_dir, precision="graph", workspace_mib=4096, timing_cache=None,
                  max_batch=None, max_prefill=None, show_progress=True, module=None) -> dict

    module      `tensorrt` (10.x / 11.x, builds on the GPU that will run the engines) if importable,
                else TensorRT-RTX (`tensorrt_rtx`, or `tensorrt_rtx_bindings`: builds on a CPU,
                engines for RTX GPUs of compute capability 8.0, 8.6, 8.9, 12.0, 12.1 (not
                Hopper), JIT-specialised when loaded)
    flavour     plugin graphs when this TensorRT builds AOT `tensorrt.plugin` plugins (the
                BoundedWindowAttention plugin is registered for the GPU's compute capability
                before parsing), else the portable graphs; the reason is returned and recorded
    profiles    0 "decode":  batch 1..max_batch, seq 1
                1 "prefill": batch 1..max_batch, seq 1..max_prefill (opt max_prefill // 2)
                static dims (heads, cache capacity, head dim) come from the graph
    precision   "graph" = the exported dtype, strongly typed; fp16/bf16 from an fp32 graph only
                on TensorRT 10.x (weak typing + BuilderFlag.FP16/BF16); 11.x and RTX are always
                strongly typed (re-export with --dtype instead); fp32 engines are built with
                TF32 off (TensorRT's default is on)

With triton installed, `engines/ring_commit.ptx` (plugins/ring_commit.py, manifest
`engines.commit_kernel`) lets the runtime capture each decode step as a CUDA graph.

Engines are written to a temporary folder inside the bundle, swapped in as `engines/`, then
manifest.json is rewritten (`engines` metadata, checksums): a failed or cancelled (Ctrl-C) build
leaves the previous bundle untouched.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from stagcompile.atomic import check_writable
from stagcompile.errors import StagError
from stagcompile.progress import progress
from stagcompile.runtime.bundle import Bundle, BundleError, sha256
from stagcompile.runtime.device import DeviceError, gpu_info
from stagcompile.runtime.trt_backend import RTX_DEFAULT_CC, RTX_MODULES, cc_list, make_logger

MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
PRECISIONS = {"graph": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
WEAK_FLAGS = {"float16": "FP16", "bfloat16": "BF16"}
RTX_DEFAULT = (f"TensorRT-RTX default targets: RTX GPUs of compute capability "
               f"{cc_list(RTX_DEFAULT_CC)} (not Turing 7.5, not Hopper or other datacenter GPUs)")
ENGINES = "engines"


def missing_message(tried, errors) -> str:
    return ("no TensorRT Python module is importable (tried " + ", ".join(tried) + ": "
            + "; ".join(errors) + "). Install one: on x86_64 with an NVIDIA driver "
            "`pip install tensorrt` (TensorRT 10.x or 11.x; engines are built on the GPU that "
            "will run them); on Jetson use the TensorRT that ships with JetPack (apt package "
            "python3-libnvinfer; PyPI wheels do not cover it); for a CPU-only build check "
            "`pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings` (the "
            "stagcompile[trt-rtx] extra: TensorRT-RTX builds engines without a GPU)")


def pick_module(module: str | None = None):
    """(trt module, its name): `module` if given, else the first importable of MODULES."""
    tried, errors = [module] if module else list(MODULES), []
    for name in tried:
        try:
            return importlib.import_module(name), name
        except (ImportError, OSError) as exc:
            errors.append(f"{name}: {exc}")
    raise StagError(missing_message(tried, errors))


def major_version(version: str) -> int:
    return int(version.split(".")[0])


def resolve_precision(precision: str, graph_dtype: str, module: str, version: str,
                      builder_flags) -> dict:
    """{"dtype", "strongly_typed", "flag"} for a --precision request on this TensorRT."""
    if precision not in PRECISIONS:
        raise StagError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    want = PRECISIONS[precision] or graph_dtype
    if want == graph_dtype:
        return {"dtype": want, "strongly_typed": True, "flag": None}
    if graph_dtype != "float32":
        raise StagError(f"--precision {precision}: the graphs are {graph_dtype}; TensorRT can only "
                        f"lower fp32 graphs. Re-export with `stagcompile export --dtype "
                        f"{precision}`")
    flag = WEAK_FLAGS.get(want)
    if module in RTX_MODULES or major_version(version) >= 11 or not hasattr(builder_flags, flag):
        raise StagError(f"--precision {precision}: {module} {version} builds strongly typed "
                        f"networks only, so an engine takes its graph's dtype ({graph_dtype}). "
                        f"Re-export with `stagcompile export --dtype {precision}`")
    return {"dtype": want, "strongly_typed": False, "flag": flag}


def builder_config(trt, builder, prec: dict, workspace_mib: int):
    """A builder config for `prec` (resolve_precision): workspace limit, the weak-typing flag,
    and TF32 cleared for fp32 engines (TensorRT enables it by default; it rounds fp32 matmul
    inputs to 10-bit mantissas, far outside fp32 tolerances)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if prec["flag"]:
        config.set_flag(getattr(trt.BuilderFlag, prec["flag"]))
    if prec["dtype"] == "float32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    return config


def build_limits(manifest: dict, max_batch: int | None, max_prefill: int | None) -> tuple:
    """(max_batch, max_prefill), defaults from the manifest, refused beyond what it allows."""
    bundle_batch = manifest["max_batch"]
    max_batch = bundle_batch if max_batch is None else max_batch
    if not 1 <= max_batch <= bundle_batch:
        raise StagError(f"--max-batch {max_batch}: must be 1 .. {bundle_batch}, the max_batch "
                        "this bundle was exported with (re-export with a larger --max-batch)")
    cfg, caches = manifest["config"], manifest["caches"]
    caps = [c["capacity"] for c in caches.values() if isinstance(c, dict) and "capacity" in c
            and not c.get("window")]
    limit = min(caps) if caps else None          # unbounded attention: the cache must hold it
    default = min([cfg["max_seq_len"]] + ([limit] if limit else []))
    max_prefill = default if max_prefill is None else max_prefill
    if max_prefill < 1 or (limit is not None and max_prefill > limit):
        raise StagError(f"--max-prefill {max_prefill}: must be 1 .. {limit or 'any'} (the cache "
                        "capacity of this model's unbounded attention)")
    return max_batch, max_prefill


def profile_specs(max_batch: int, max_prefill: int) -> list[dict]:
    batch = [1, max(1, max_batch // 2), max_batch]
    return [{"index": 0, "name": "decode", "batch": batch, "seq": [1, 1, 1]},
            {"index": 1, "name": "prefill", "batch": batch,
             "seq": [1, max(1, max_prefill // 2), max_prefill]}]


def profile_shapes(io: dict, profile: dict) -> dict[str, tuple]:
    """name -> (min, opt, max) shapes of every graph input under one profile."""
    out = {}
    for t in io["inputs"]:
        dims = [(d, d, d) if isinstance(d, int) else tuple(profile[d]) for d in t["shape"]]
        out[t["name"]] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return out


def choose_flavour(module: str, flavours: list[str]) -> tuple[str, str]:
    if module in RTX_MODULES:
        why = "TensorRT-RTX has no tensorrt.plugin (QDP) module"
    elif "plugin" not in flavours:
        why = "this bundle has no plugin graphs (export with --flavour plugin or both)"
    else:
        from plugins.trt_plugin import plugin_supported
        ok, why = plugin_supported()
        if ok:
            return "plugin", f"{why}: BoundedWindowAttention runs as an AOT plugin"
    if "portable" not in flavours:
        raise StagError(f"this bundle has only plugin graphs, and they cannot be built here "
                        f"({why}); re-export with --flavour portable or both")
    return "portable", why


def cancel_event() -> threading.Event:
    """Set to cancel a build (by Ctrl-C, or by a test)."""
    return threading.Event()


@contextmanager
def cancel_on_sigint(cancel: threading.Event):
    """First Ctrl-C asks TensorRT to stop (the progress monitor returns False); a second one
    interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def monitor_class(trt):
    class Monitor(trt.IProgressMonitor):
        """Feeds the rich bar; step_complete returns False once the build is cancelled."""

        def __init__(self, bar, cancel: threading.Event):
            trt.IProgressMonitor.__init__(self)
            self.bar, self.cancel, self.tasks, self.depth = bar, cancel, {}, {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                depth = self.depth.get(parent_phase, -1) + 1
                self.depth[phase_name] = depth
                self.tasks[phase_name] = self.bar.add_task("  " * depth + phase_name,
                                                           total=num_steps)
            except KeyboardInterrupt:
                self.cancel.set()

        def step_complete(self, phase_name, step):
            try:
                if phase_name in self.tasks:
                    self.bar.update(self.tasks[phase_name], completed=step + 1)
                return not self.cancel.is_set()
            except KeyboardInterrupt:
                self.cancel.set()
                return False

        def phase_finish(self, phase_name):
            try:
                task = self.tasks.pop(phase_name, None)
                if task is not None:
                    self.bar.remove_task(task)
            except KeyboardInterrupt:
                self.cancel.set()

    return Monitor


NOOP_CACHE = ("timing-cache calls are deprecated no-ops in this TensorRT (TensorRT-RTX >= 1.2): "
              "the file is read and written back, but does not speed up builds")


def _deprecations(caught) -> list[str]:
    """The no-op note when TensorRT flagged a timing-cache call as deprecated."""
    found = any(issubclass(w.category, DeprecationWarning)
                and "timing cache" in str(w.message).lower() for w in caught)
    return [NOOP_CACHE] if found else []


class TimingCache:
    """One timing cache for every stack's build: loaded from `path`, saved back after."""

    def __init__(self, path: Path | None):
        self.path, self.cache, self.notes = path, None, []
        self.info = {"path": str(path) if path else None, "loaded_bytes": 0, "reused": False}

    def attach(self, config) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = None
            if self.cache is None:
                data = self.path.read_bytes() if self.path.is_file() else b""
                self.cache = config.create_timing_cache(data)
                self.info["loaded_bytes"] = len(data)
            ok = config.set_timing_cache(self.cache, False)
        deprecated = _deprecations(caught)
        self.notes += [m for m in deprecated if m not in self.notes]
        if data is not None:
            self.info["reused"] = bool(data) and ok and not deprecated
        if not ok:
            self.notes.append(f"{self.path} was written for another GPU or TensorRT version; "
                              "started a new cache")
            self.cache = config.create_timing_cache(b"")
            self.info["reused"] = False
            config.set_timing_cache(self.cache, False)

    def save(self) -> dict:
        if self.path is not None and self.cache is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                data = bytes(memoryview(self.cache.serialize()))
            self.notes += [m for m in _deprecations(caught) if m not in self.notes]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(self.path)
            self.info["saved_bytes"] = len(data)
        self.info["note"] = " ".join(self.notes) or None
        return self.info


def _load(bundle_dir) -> Bundle:
    try:
        return Bundle.load(Path(bundle_dir))
    except BundleError as exc:
        raise StagError(str(exc)) from None


def _target(module: str, version: str) -> dict:
    if module in RTX_MODULES:
        return {"gpu": None, "compute_capabilities": [], "built_for": RTX_DEFAULT}
    try:
        name, cc = gpu_info()
    except DeviceError as exc:
        raise StagError(f"{module} {version} builds engines on the GPU that will run them, but no "
                        f"CUDA device is usable here ({exc}). Build on the target machine, or "
                        "check the build on a CPU with TensorRT-RTX (`pip install "
                        "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`)") from None
    return {"gpu": {"name": name, "compute_capability": list(cc)},
            "compute_capabilities": [list(cc)], "built_for": f"{name} (sm_{cc[0]}{cc[1]})"}


def _parse(trt, builder, logger, path: Path, stack: int, io: dict, strongly_typed: bool):
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        detail = "; ".join(f"node {e.node()} {e.node_name()!r} ({e.node_operator()}): {e.desc()}"
                           for e in errs) or " | ".join(logger.errors()[-3:]) or "no message"
        raise StagError(f"{path}: TensorRT's ONNX parser rejected stack {stack}: {detail}")
    have = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    for t in io["inputs"]:
        if t["name"] not in have or len(have[t["name"]].shape) != len(t["shape"]):
            raise StagError(f"{path}: stack {stack} input {t['name']} {t['shape']} is missing or "
                            "has another rank in the graph; re-export the bundle")
    for t in io["outputs"]:
        if t["name"] not in outputs:
            raise StagError(f"{path}: stack {stack} output {t['name']} is missing; re-export")
    return network, parser


def commit_kernel(folder: Path, cc: list | None) -> tuple[dict | None, str]:
    """Write the device ring-commit kernel (plugins/ring_commit.py) as PTX into `folder`: the
    TensorRT runtime captures each decode step as a CUDA graph with it. `cc` is the GPU's
    compute capability (None: TensorRT-RTX's targets); the PTX is for sm_80 (sm_75 on Turing),
    which the driver JIT-compiles for newer GPUs. Returns (manifest entry or None, note)."""
    if importlib.util.find_spec("triton") is None:
        return None, ("triton is not installed: no device commit kernel, so the runtime runs "
                      "without CUDA graphs")
    from plugins import aot, ring_commit
    try:
        kernel = ring_commit.compile_ptx(75 if cc and tuple(cc) < (8, 0) else ring_commit.BASE_CC)
    except aot.AotError as exc:
        return None, f"no device commit kernel, so no CUDA graphs ({exc})"
    (folder / "ring_commit.ptx").write_text(kernel.ptx)
    return ({"file": f"{ENGINES}/ring_commit.ptx", "name": kernel.name, "cc": kernel.cc,
             "num_warps": kernel.num_warps}, f"device commit kernel for sm_{kernel.cc}: the "
            "runtime captures each decode step as a CUDA graph")


def _swap_in(bundle: Bundle, built: Path, manifest: dict) -> None:
    """Replace engines/ by `built` and rewrite the manifest; restore both on failure."""
    root, dest = bundle.root, bundle.root / ENGINES
    old_parent = Path(tempfile.mkdtemp(prefix=".engines.old.", dir=root))
    old = old_parent / ENGINES
    previous = bundle.manifest
    try:
        if dest.exists():
            os.replace(dest, old)
        try:
            os.replace(built, dest)
            bundle.manifest = manifest
            bundle.write_manifest()
        except BaseException:
            bundle.manifest = previous
            shutil.rmtree(dest, ignore_errors=True)
            if old.exists():
                os.replace(old, dest)
            raise
    finally:
        shutil.rmtree(old_parent, ignore_errors=True)


def build_engines(bundle_dir, precision: str = "graph", workspace_mib: int = 4096,
                  timing_cache: Path | None = None, max_batch: int | None = None,
                  max_prefill: int | None = None, show_progress: bool = True,
                  module: str | None = None) -> dict:
    bundle = _load(bundle_dir)
    if precision not in PRECISIONS:
        raise StagError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if workspace_mib < 1:
        raise StagError(f"--workspace {workspace_mib}: must be >= 1 MiB")
    if timing_cache is not None:
        check_writable(Path(timing_cache), f"--timing-cache {timing_cache}")
    max_batch, max_prefill = build_limits(bundle.manifest, max_batch, max_prefill)
    trt, module = pick_module(module)
    version = trt.__version__
    prec = resolve_precision(precision, bundle.dtype, module, version, trt.BuilderFlag)
    target = _target(module, version)
    flavour, reason = choose_flavour(module, bundle.flavours)
    graphs = []
    for k in range(bundle.num_stacks):
        try:
            graphs.append(bundle.graph(flavour, k + 1))
        except BundleError as exc:
            raise StagError(str(exc)) from None
    if flavour == "plugin":
        from plugins.trt_plugin import register
        cc = target["gpu"]["compute_capability"]
        register(cc=cc[0] * 10 + cc[1])
    profiles = profile_specs(max_batch, max_prefill)
    logger = make_logger(trt, echo_severity=-1)
    cache = TimingCache(Path(timing_cache) if timing_cache else None)
    cancel = cancel_event()
    tmp = Path(tempfile.mkdtemp(prefix=".engines.tmp.", dir=bundle.root))
    seconds = []
    try:
        with progress(show_progress) as bar, cancel_on_sigint(cancel):
            if show_progress:
                bar.console.print(f"{module} {version}, {target['built_for']}; flavour {flavour}:"
                                  f" {reason}", highlight=False)
            task = bar.add_task("build", total=bundle.num_stacks)
            builder = trt.Builder(logger)
            monitor = monitor_class(trt)(bar, cancel)
            for k, path in enumerate(graphs):
                if cancel.is_set():
                    raise KeyboardInterrupt
                bar.update(task, description=f"stack {k + 1}/{bundle.num_stacks}: parse")
                network, _parser = _parse(trt, builder, logger, path, k + 1, bundle.io(k + 1),
                                          prec["strongly_typed"])
                config = builder_config(trt, builder, prec, workspace_mib)
                if timing_cache:
                    cache.attach(config)
                for spec in profiles:
                    prof = builder.create_optimization_profile()
                    for name, (lo, opt, hi) in profile_shapes(bundle.io(k + 1), spec).items():
                        prof.set_shape(name, lo, opt, hi)
                    if config.add_optimization_profile(prof) != spec["index"]:
                        raise StagError(f"stack {k + 1}: TensorRT rejected the {spec['name']} "
                                        f"profile: {' | '.join(logger.errors()[-2:])}")
                config.progress_monitor = monitor
                bar.update(task, description=f"stack {k + 1}/{bundle.num_stacks}: build")
                start = time.perf_counter()
                plan = builder.build_serialized_network(network, config)
                if cancel.is_set():
                    raise KeyboardInterrupt
                if plan is None:
                    raise StagError(f"{path}: TensorRT could not build stack {k + 1}: "
                                    f"{' | '.join(logger.errors()[-4:]) or 'no message'}")
                with open(tmp / f"stack{k + 1}.plan", "wb") as f:
                    f.write(memoryview(plan))
                seconds.append(round(time.perf_counter() - start, 3))
                bar.advance(task)
        files = [f"{ENGINES}/stack{k + 1}.plan" for k in range(bundle.num_stacks)]
        commit, commit_note = commit_kernel(tmp, (target["gpu"] or {}).get("compute_capability"))
        meta = {"files": files, "flavour": flavour, "reason": reason,
                "commit_kernel": commit, "commit_kernel_note": commit_note,
                "tensorrt": {"module": module, "version": version},
                **target, "profiles": profiles, "precision": prec["dtype"],
                "build_options": {"precision": precision, "strongly_typed":
                                  prec["strongly_typed"], "builder_flag": prec["flag"],
                                  "tf32": prec["dtype"] != "float32",
                                  "workspace_mib": workspace_mib, "max_batch": max_batch,
                                  "max_prefill": max_prefill},
                "timing_cache": cache.save() if timing_cache else None}
        tmp.chmod(0o755)
        checksums = {k: v for k, v in bundle.manifest["files"].items()
                     if not k.startswith(ENGINES + "/")}
        checksums.update({f: sha256(tmp / Path(f).name)
                          for f in files + ([commit["file"]] if commit else [])})
        versions = {**bundle.manifest.get("versions", {}), "tensorrt": f"{module} {version}"}
        _swap_in(bundle, tmp, {**bundle.manifest, "engines": meta, "files": checksums,
                               "versions": versions})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    warned = sorted({m for lvl, m in logger.records if lvl == 2})
    return {**meta, "bundle": str(bundle.root), "seconds": seconds, "warnings": warned,
            "paths": [str(bundle.root / f) for f in files]}
