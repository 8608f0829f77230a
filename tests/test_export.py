"""Export: every variant's graphs (and a cross-gated model's) reproduce the reference's golden
trace in ONNX Runtime (all three flavours), graphs and manifest are well formed, fp16 stays close,
bad input is refused cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import BF16_CFG, bundle_for, grouped, make_model, variant_id, VARIANTS
from plugins.ort_kernel import session_options
from stagcompile import checkpoint
from stagcompile.config import preset
from stagcompile.errors import StagError
from stagcompile.export import export_bundle
from stagcompile.ort_replay import OrtReplay
from stagcompile.replay import Trace, load_trace
from stagcompile.runtime.bundle import Bundle


def sessions(bundle: Bundle, flavour: str):
    so = session_options() if flavour == "plugin" else ort.SessionOptions()
    so.log_severity_level = 3
    return [ort.InferenceSession(str(bundle.graph(flavour, k + 1)), so)
            for k in range(bundle.num_stacks)]


def worst_difference(bundle_dir, flavour: str, dtype: str | None = None, sess=None) -> float:
    """Largest |graph output - golden| over the trace; `sess` (one per stack, with ONNX
    Runtime's `run(names, feeds)`) defaults to ONNX Runtime sessions of `flavour`."""
    bundle = Bundle.load(bundle_dir)
    sess = sess or sessions(bundle, flavour)
    worst = 0.0
    steps = 0
    for st in load_trace(bundle_dir).steps(dtype):
        names = list(st.golden)
        got = sess[st.stack - 1].run(names, st.feeds)
        for name, value in zip(names, got):
            diff = np.abs(value.astype(np.float32) - st.golden[name]).max()
            worst = max(worst, float(diff))
        steps += 1
    assert steps > bundle.num_stacks           # prefill plus decode steps
    return worst


@pytest.mark.parametrize("flavour", ["portable", "plugin"])
def test_graphs_match_reference_trace(bundle_root, variant, flavour):
    path, _ = bundle_for(bundle_root, variant)
    assert worst_difference(path, flavour) < 1e-4


def ort_worst_difference(bundle_dir, dtype: str | None = None) -> float:
    """Largest |ort graph output - golden| over the trace, in the golden layout."""
    bundle = Bundle.load(bundle_dir)
    replay, sess = OrtReplay(bundle, Trace(bundle)), sessions(bundle, "ort")
    worst, steps = 0.0, 0
    for st in replay.steps(dtype):
        s = sess[st.stack - 1]
        names = [o.name for o in s.get_outputs()]
        got = replay.to_golden(st.stack, st.feeds, dict(zip(names, s.run(names, st.feeds))))
        assert set(got) == set(st.golden)
        for name, want in st.golden.items():
            worst = max(worst, float(np.abs(got[name].astype(np.float32) - want).max()))
        steps += 1
    assert steps > bundle.num_stacks
    return worst


def test_ort_graphs_match_reference_trace(bundle_root, variant):
    path, _ = bundle_for(bundle_root, variant)
    assert ort_worst_difference(path) < 1e-4


GATED_CFG = preset("tiny").replace(num_stacks=3, cross_gate=True, cross_window=4, self_window=8)


@pytest.mark.parametrize("cfg", grouped([GATED_CFG]))
def test_gated_graphs_match_reference_trace(bundle_root, cfg):
    """cross_gate lives in the reference's layer, so the traced graphs of every stack (the
    middle one consumes and produces) carry it: every flavour reproduces the golden trace."""
    path, model = bundle_for(bundle_root, cfg)
    assert all(cl.gate.abs().item() > 0.01 for cs in model.crosses for cl in cs.layers)
    for flavour in ("portable", "plugin"):
        assert worst_difference(path, flavour) < 1e-4
    assert ort_worst_difference(path) < 1e-4


def test_trace_passes_every_window(bundle_root, variant):
    path, _ = bundle_for(bundle_root, variant)
    trace = load_trace(path)
    decode = trace.num_steps - 1
    for w in (variant.self_window, variant.cross_window):
        if w:
            assert decode >= 2 * w, "decode steps must wrap every ring at least twice"


@pytest.mark.parametrize("cfg", grouped([VARIANTS[4]]))
def test_manifest_and_graph_structure(bundle_root, cfg):
    path, model = bundle_for(bundle_root, cfg)
    man = json.loads((path / "manifest.json").read_text())
    assert man["opset"] == 18 and man["config"] == cfg.to_dict()
    assert [io["stack"] for io in man["io"]] == list(range(1, cfg.num_stacks + 1))
    names = [t["name"] for t in man["io"][1]["inputs"]]
    assert names[:4] == ["input_ids", "pos", "self.k.0", "self.v.0"]
    assert "cross_in.k.1" in names and "cross.v.0" in names
    assert [t["name"] for t in man["io"][0]["outputs"]][-1] == "cross_null.v.1"
    assert man["caches"]["cross"]["capacity"] == cfg.cross_window
    for flavour in ("portable", "plugin"):
        for k in range(cfg.num_stacks):
            proto = onnx.load(str(path / man["graphs"][flavour][k]["file"]), load_external_data=False)
            plugin_nodes = [n for n in proto.graph.node if n.domain == "stagformer"]
            if flavour == "portable":
                assert not plugin_nodes and all(o.domain in ("", "ai.onnx") for o in proto.opset_import)
            else:
                layers = cfg.layers_per_stack * (2 if k > 0 else 1)
                assert len(plugin_nodes) == layers
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugin_nodes[0].attribute}
                assert attrs["plugin_namespace"] == b"stagformer" and attrs["aot"] == 1
                assert plugin_nodes[0].op_type == "BoundedWindowAttention"
    bundle = Bundle.load(path)
    assert len(bundle.manifest["files"]) > 3 * cfg.num_stacks


@pytest.mark.parametrize("cfg", grouped([VARIANTS[4]]))
def test_ort_flavour_structure(bundle_root, cfg):
    """About a dozen contrib-op nodes per layer; every cache input is written in place by an
    output that names it; the manifest says which attention and RoPE paths the graphs use."""
    path, _ = bundle_for(bundle_root, cfg)
    man = json.loads((path / "manifest.json").read_text())["ort"]
    assert man["opset"] == 23 and "GroupQueryAttention" in man["attention"]
    assert man["caches"]["cross"] == {"capacity": 2 * cfg.cross_window, "window": cfg.cross_window,
                                      "layout": man["caches"]["cross"]["layout"]}
    for k, io in enumerate(man["io"]):
        ins = {t["name"]: t for t in io["inputs"]}
        aliases = {t["alias"] for t in io["outputs"] if t["alias"]}
        assert aliases == {n for n, t in ins.items() if t["role"] in ("self", "cross")}
        proto = onnx.load(str(path / "graphs" / "ort" / f"stack{k + 1}.onnx"),
                          load_external_data=False)
        ops = [n.op_type for n in proto.graph.node]
        assert ops.count("GroupQueryAttention") == cfg.layers_per_stack * (2 if k else 1)
        assert ops.count("SkipSimplifiedLayerNormalization") >= 2 * cfg.layers_per_stack
        assert len(ops) < 40 + 16 * cfg.layers_per_stack, len(ops)


@pytest.mark.parametrize("cfg", grouped([VARIANTS[4]]))
def test_first_layer_qkv_table(bundle_root, tmp_path, cfg):
    """auto takes the first-layer Q|K|V table on the tiny model (vocab 97 <= 16 x 64): each
    stack's first projection is one Gather of a [vocab, (H + 2 Hkv) D] table and the first
    RMSNormalization and MatMul are gone; off keeps them. Both reproduce the golden trace and
    generate the same greedy tokens, and the manifest says which path each bundle took."""
    from stagcompile.runtime.generator import Generator

    on, _ = bundle_for(bundle_root, cfg)
    off = tmp_path / "off"
    export_bundle(on.parent / "ck", off, "ort", qkv_table="off", show_progress=False)
    width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 5))
    tokens = []
    for path, table in ((on, True), (off, False)):
        man = json.loads((path / "manifest.json").read_text())["ort"]
        assert man["qkv_table"] is table
        assert man["first_qkv"].startswith("Gather" if table else "MatMul")
        for k in range(cfg.num_stacks):
            proto = onnx.load(str(path / "graphs" / "ort" / f"stack{k + 1}.onnx"))
            ops = [n.op_type for n in proto.graph.node]
            inits = {i.name: list(i.dims) for i in proto.graph.initializer}
            assert ("RMSNormalization" in ops) is not table
            L, last = cfg.layers_per_stack, k == cfg.num_stacks - 1
            # qkv, wo, w13, w2 per layer; cross wq, wo (consumer); consumer's wkv or the LM head
            assert ops.count("MatMul") == 4 * L - table + 2 * L * (k > 0) + (1 if last else L)
            assert inits.get("embed.qkv_table") == ([cfg.vocab_size, width] if table else None)
        assert ort_worst_difference(path) < 1e-4
        gen = Generator.load(path, flavour="ort")
        try:
            tokens.append(gen.generate(prompt, 12))
        finally:
            gen.close()
    np.testing.assert_array_equal(tokens[0], tokens[1])


def test_qkv_table_choice():
    """auto: on for small vocabularies, off for large ones and for quantized weights; on with
    --quant and unknown values are refused by name."""
    from graphs.ort_stack import qkv_table_auto
    from stagcompile.export import use_qkv_table

    assert qkv_table_auto(preset("tiny"), None) and qkv_table_auto(preset("small"), None)
    assert not qkv_table_auto(preset("base"), None)           # 32000 > 16 x 768
    assert not qkv_table_auto(preset("small"), "int4")
    assert use_qkv_table(preset("base"), "on", None)
    assert not use_qkv_table(preset("small"), "off", None)
    with pytest.raises(StagError, match="--qkv-table on with --quant int8"):
        use_qkv_table(preset("small"), "on", "int8")
    with pytest.raises(StagError, match="--qkv-table 'maybe': expected one of auto, on, off"):
        use_qkv_table(preset("small"), "maybe", None)


def test_ort_flavour_needs_head_dim_multiple_of_16(tmp_path):
    cfg = preset("tiny").replace(d_model=32)                   # head_dim 8
    ck = tmp_path / "ck"
    checkpoint.save(make_model(cfg), ck)
    with pytest.raises(StagError, match="--flavour ort: .*head_dim that is a multiple of 16"):
        export_bundle(ck, tmp_path / "b", flavour="ort", show_progress=False)
    export_bundle(ck, tmp_path / "b", show_progress=False)
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.flavours == ["portable", "plugin"]
    assert "multiple of 16" in bundle.manifest["ort"]["skipped"]


@pytest.mark.parametrize("flavour", ["portable", "plugin"])
def test_null_slot_folds_to_constants(bundle_root, tmp_path, flavour):
    """The producer's null entry M[0] depends on weights only: after ONNX Runtime's constant
    folding no MatMul (no weight read) is left on its way to the cross_null outputs."""
    path, _ = bundle_for(bundle_root, VARIANTS[4])
    bundle = Bundle.load(path)
    so = session_options() if flavour == "plugin" else ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "stack1.opt.onnx")
    ort.InferenceSession(str(bundle.graph(flavour, 1)), so)
    graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    nulls = [o.name for o in graph.output if o.name.startswith("cross_null.")]
    assert nulls
    ops, todo, seen = set(), list(nulls), set()
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            ops.add(node.op_type)
            todo.extend(node.input)
    assert ops and not ops & {"MatMul", "FusedMatMul", "Gemm"}, ops


def test_shared_weights_named_in_manifest(bundle_root):
    cfg = preset("tiny").replace(num_stacks=3, shared_weights=True)
    path, _ = bundle_for(bundle_root, cfg)
    weights = json.loads((path / "manifest.json").read_text())["weights"]
    assert weights["shared_weights"] is True
    assert "trunks.0.layers.0.attn.wq.weight" in weights["shared"]
    assert all("trunks.0.layers.1.mlp.w2.weight" in names for names in weights["per_stack"].values())


def test_polygraphy_reads_graphs(bundle_root):
    path, _ = bundle_for(bundle_root, VARIANTS[4])
    for flavour in ("portable", "plugin"):
        exe = str(Path(sys.executable).parent / "polygraphy")
        proc = subprocess.run([exe, "inspect", "model",
                               str(path / "graphs" / flavour / "stack2.onnx")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "input_ids" in proc.stdout and "logits" in proc.stdout


def test_fp16_export_close_to_fp32_reference(bundle_root):
    cfg = preset("tiny").replace(cross_window=4, self_window=8)
    path, _ = bundle_for(bundle_root, cfg, dtype="fp16", flavour="all")
    assert json.loads((path / "manifest.json").read_text())["dtype"] == "float16"
    worst = worst_difference(path, "portable", "float16")
    assert worst < 5e-2, worst          # fp16 weights and caches; fp32 softmax, norms, logits
    assert ort_worst_difference(path, "float16") < 5e-2


def test_bf16_export_types_and_reference_numerics(bundle_root):
    """bf16 graphs: bf16 weights and caches, fp32 softmax and logits, and (ONNX Runtime's CPU
    provider has no bf16 MatMul) ONNX's reference evaluator reproduces the golden trace."""
    from onnx.reference import ReferenceEvaluator
    path, _ = bundle_for(bundle_root, BF16_CFG, dtype="bf16", flavour="portable")
    bundle = Bundle.load(path)
    assert bundle.dtype == "bfloat16"
    for k in range(bundle.num_stacks):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(bundle.graph("portable", k + 1))))
        types = {v.name: v.type.tensor_type.elem_type
                 for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)}
        assert types["self.k.0"] == onnx.TensorProto.BFLOAT16
        if k == bundle.num_stacks - 1:
            assert types["logits"] == onnx.TensorProto.FLOAT
        softmax_in = [n.input[0] for n in model.graph.node if n.op_type == "Softmax"]
        assert softmax_in and all(types[t] == onnx.TensorProto.FLOAT for t in softmax_in)
    sess = [ReferenceEvaluator(str(bundle.graph("portable", k + 1)))
            for k in range(bundle.num_stacks)]
    worst = worst_difference(path, "portable", "bfloat16", sess)
    assert worst < 5e-2, worst


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tensorrt_rtx_builds_portable_graphs(bundle_root, dtype):
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="tensorrt-rtx-cu13-bindings is "
                              "not installed (make test installs it)")
    path, _ = (bundle_for(bundle_root, VARIANTS[4]) if dtype == "fp32"
               else bundle_for(bundle_root, BF16_CFG, dtype="bf16", flavour="portable"))
    bundle = Bundle.load(path)
    logger = trt.Logger(trt.Logger.ERROR)
    for k in range(bundle.num_stacks):
        builder = trt.Builder(logger)
        net = builder.create_network(0)
        parser = trt.OnnxParser(net, logger)
        assert parser.parse_from_file(str(bundle.graph("portable", k + 1))), \
            [str(parser.get_error(i)) for i in range(parser.num_errors)]
        cfg = builder.create_builder_config()
        for seq in ((1, 1, 1), (1, 4, 16)):
            prof = builder.create_optimization_profile()
            for i in range(net.num_inputs):
                t = net.get_input(i)
                dims = [[b if d == -1 and j == 0 else (s if d == -1 else d)
                         for j, d in enumerate(t.shape)] for b, s in ((1, seq[0]), (2, seq[1]), (4, seq[2]))]
                prof.set_shape(t.name, *dims)
            cfg.add_optimization_profile(prof)
        plan = builder.build_serialized_network(net, cfg)
        assert plan is not None and plan.nbytes > 0


def test_bad_inputs_leave_no_bundle(tmp_path):
    cfg = preset("tiny")
    ck = tmp_path / "ck"
    checkpoint.save(make_model(cfg), ck)
    with pytest.raises(StagError, match="--dtype fp8"):
        export_bundle(ck, tmp_path / "b", dtype="fp8")
    with pytest.raises(StagError, match="--flavour fast"):
        export_bundle(ck, tmp_path / "b", flavour="fast")
    with pytest.raises(StagError, match="--max-batch 0"):
        export_bundle(ck, tmp_path / "b", max_batch=0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(StagError, match="already exists; pass --force"):
        export_bundle(ck, tmp_path / "exists")
    bad = tmp_path / "bad"
    checkpoint.save(make_model(cfg), bad)
    (bad / "config.json").write_text(cfg.replace(d_model=128, n_heads=4).to_json())
    with pytest.raises(StagError, match="does not match"):
        export_bundle(bad, tmp_path / "b2")
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(StagError, match="cannot write the bundle folder here"):
        export_bundle(ck, tmp_path / "afile" / "b")
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert sorted(leftovers) == ["afile", "bad", "ck", "exists"]

