"""The TensorRT plugin's plain logic on CPU, its callbacks against a stand-in `tensorrt.plugin`,
and (where TensorRT 10.9+ is installed) a real registration.

The stand-in checks the callback schemas that `tensorrt.plugin` enforces (TensorRT
`python/packaging/bindings_wheel/tensorrt/plugin/_validate.py`): register takes annotated
TensorDescs then attributes; autotune `(inputs, [attrs], outputs)`; impl `(inputs, [attrs],
outputs, stream[, tactic])`; aot_impl `(inputs, [attrs], outputs, tactic)` with a 4-tuple return
annotation. Shape expressions are stood in by `Expr`, which like `trtp.ShapeExpr` has `+ - * //`
with the expression on the left only.
"""

import importlib.util
import inspect
import sys
import types
import typing

import pytest

from plugins import NAMESPACE, OP_NAME, spec, trt_plugin


class Expr:
    """A concrete stand-in for trtp.ShapeExpr (no reflected operators, like the real one)."""

    def __init__(self, value, constant=False):
        self.value, self.is_constant, self.is_fake = value, constant, False

    def _v(self, other):
        return other.value if isinstance(other, Expr) else other

    def __add__(self, o):
        return Expr(self.value + self._v(o))

    def __sub__(self, o):
        return Expr(self.value - self._v(o))

    def __mul__(self, o):
        return Expr(self.value * self._v(o))

    def __floordiv__(self, o):
        return Expr(self.value // self._v(o))

    def constant_value(self):
        return self.value


def value(x):
    return x.value if isinstance(x, Expr) else x


def test_import_does_not_need_tensorrt():
    code = "import sys, plugins.trt_plugin; print('tensorrt' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("version,ok", [("10.8.0.43", False), ("10.6.0", False),
                                        ("10.9.0.34", True), ("10.13.3.9.post1", True),
                                        ("11.1.0", True), ("8.6.1", False)])
def test_version_supported(version, ok):
    got, why = trt_plugin.version_supported(version)
    assert got is ok
    assert version in why
    if not ok:
        assert "10.9" in why


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed")
def test_unsupported_here_says_why():
    ok, why = trt_plugin.plugin_supported()
    assert not ok and "tensorrt" in why
    with pytest.raises(RuntimeError, match=f"cannot register the {NAMESPACE}::{OP_NAME}"):
        trt_plugin.register()


def test_autotune_types():
    entries = [e.strip() for e in trt_plugin.autotune_io_types().split(",")]
    assert len(entries) == len(spec.INPUT_NAMES) + 1
    assert entries[spec.INPUT_NAMES.index("pos")] == "INT64*INT32"
    assert all(e == "FP32|FP16|BF16" for i, e in enumerate(entries) if i != 5)


def test_dtype_names():
    for trt_name, name in trt_plugin.DTYPE_NAMES.items():
        assert trt_plugin.dtype_name(types.SimpleNamespace(name=trt_name)) == name
    with pytest.raises(spec.AttentionSpecError, match="INT8"):
        trt_plugin.dtype_name(types.SimpleNamespace(name="INT8"))


def test_check_ranks():
    trt_plugin.check_ranks([4, 4, 4, 4, 4, 1])
    with pytest.raises(spec.AttentionSpecError, match="input pos: expected rank 1"):
        trt_plugin.check_ranks([4, 4, 4, 4, 4, 2])


@pytest.mark.parametrize("shape", [(2, 8, 5, 64, 2, 16), (1, 4, 1, 128, 4, 33),
                                   (3, 12, 40, 8, 1, 7)])
def test_aot_launch_matches_spec_on_ints_and_exprs(shape):
    b, hq, s, d, hkv, c = shape
    dims = spec.Dims(b, hq, hkv, s, c, d)
    q, kv, cache = (b, hq, s, d), (b, hkv, s, d), (b, hkv, c, d)
    grid, scalars = trt_plugin.aot_launch(q, kv, cache, spec.BLOCK_M)
    assert grid == spec.launch_grid(dims) and scalars == (b, hq, hkv, s, c)
    grid_e, scalars_e = trt_plugin.aot_launch(*([Expr(x) for x in t] for t in (q, kv, cache)),
                                              spec.BLOCK_M)
    assert tuple(map(value, grid_e)) == grid and tuple(map(value, scalars_e)) == scalars


def test_constant_head_dim():
    assert trt_plugin.constant_head_dim([None, None, None, Expr(64, constant=True)]) == 64
    with pytest.raises(spec.AttentionSpecError, match="must be static"):
        trt_plugin.constant_head_dim([None, None, None, Expr(64)])


# ---- the callbacks, against a stand-in tensorrt.plugin ------------------------------------------

def _fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0.34"
    trt.QuickPluginCreationRequest = object
    trtp = types.ModuleType("tensorrt.plugin")
    trt.plugin = trtp
    trtp.registry, trtp.op = {}, types.SimpleNamespace()

    class TensorDesc:
        def __init__(self, shape=(), dtype=None):
            self.shape_expr, self.dtype = list(shape), dtype

        @property
        def ndim(self):
            return len(self.shape_expr)

        def like(self):
            return TensorDesc(self.shape_expr, self.dtype)

    class SymExprs(list):
        @classmethod
        def from_tuple(cls, items):
            return cls(items)

    class SymInt32:
        def __init__(self, v):
            self.value = value(v)

    class KernelLaunchParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    trtp.TensorDesc, trtp.Tensor, trtp.SymExprs = TensorDesc, type("Tensor", (), {}), SymExprs
    trtp.SymIntExprs = type("SymIntExprs", (SymExprs,), {})
    trtp.SymInt32, trtp.KernelLaunchParams = SymInt32, KernelLaunchParams
    trtp.AutoTuneCombination = type("AutoTuneCombination", (), {
        "__init__": lambda self, io_types=None, layouts=None, tactics=None: setattr(
            self, "io_types", io_types)})

    def decorator(kind):
        def make(plugin_id):
            def wrap(fn):
                assert kind == "register" or plugin_id in trtp.registry, "not registered"
                trtp.registry.setdefault(plugin_id, {})[kind] = fn
                if kind == "register":
                    ns, name = plugin_id.split("::")
                    assert not hasattr(getattr(trtp.op, ns, None), name), "defined twice"
                    setattr(trtp.op, ns, types.SimpleNamespace(**{name: fn}))
                return fn
            return wrap
        return make

    for kind in ("register", "autotune", "impl", "aot_impl"):
        setattr(trtp, kind, decorator(kind))
    return trt, trtp


@pytest.fixture
def fake_trtp(monkeypatch):
    trt, trtp = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_plugin, "_state", {"registered": False, "cc": None})
    return trtp


def _params(fn):
    return list(inspect.signature(fn).parameters)


def test_register_is_idempotent_and_matches_the_schemas(fake_trtp):
    trt_plugin.register(cc=90)
    trt_plugin.register()
    fns = fake_trtp.registry[f"{NAMESPACE}::{OP_NAME}"]
    assert set(fns) == {"register", "autotune", "impl", "aot_impl"}
    inputs, attrs = list(spec.INPUT_NAMES), ["window", "scale"]
    reg = inspect.signature(fns["register"])
    assert _params(fns["register"]) == inputs + attrs
    assert all(reg.parameters[n].annotation is fake_trtp.TensorDesc for n in inputs)
    assert [reg.parameters[n].annotation for n in attrs] == [int, float]
    assert reg.return_annotation is fake_trtp.TensorDesc
    assert _params(fns["autotune"]) == inputs + ["outputs"]
    assert _params(fns["impl"]) == inputs + attrs + ["outputs", "stream"]
    assert _params(fns["aot_impl"]) == inputs + attrs + ["outputs", "tactic"]
    ret = inspect.signature(fns["aot_impl"]).return_annotation
    assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 4
    assert typing.get_args(ret)[2] is fake_trtp.KernelLaunchParams


def _descs(trtp, dtype="HALF", dims=(2, 8, 2, 5, 33, 128), pos_dtype="INT64"):
    b, hq, hkv, s, c, d = dims
    dt, pt = types.SimpleNamespace(name=dtype), types.SimpleNamespace(name=pos_dtype)

    def desc(*shape, t=dt):
        return trtp.TensorDesc([Expr(x) for x in shape[:-1]] + [Expr(shape[-1], True)], t)

    return [desc(b, hq, s, d), desc(b, hkv, s, d), desc(b, hkv, s, d), desc(b, hkv, c, d),
            desc(b, hkv, c, d), desc(b, t=pt)]


def test_callbacks(fake_trtp):
    from plugins import aot

    trt_plugin.register(cc=90)
    fns = fake_trtp.registry[f"{NAMESPACE}::{OP_NAME}"]
    descs = _descs(fake_trtp)
    out = fns["register"](*descs, 16, 0.125)
    assert out.dtype.name == "HALF" and [value(e) for e in out.shape_expr] == [2, 8, 5, 128]
    with pytest.raises(spec.AttentionSpecError, match="differs from q's"):
        fns["register"](*_descs(fake_trtp)[:1], *_descs(fake_trtp, "FLOAT")[1:], 16, 0.125)
    [comb] = fns["autotune"](*descs, (out,))
    assert comb.io_types == trt_plugin.autotune_io_types()

    name, ptx, launch, extra = fns["aot_impl"](*descs, 16, 0.125, (out,), 0)
    kernel = aot.compile_ptx("float16", 128, 16, 0.125, 90, pos_dtype="int64")
    assert (name, ptx) == (kernel.name, kernel.ptx)
    assert (value(launch.grid_x), value(launch.grid_y), value(launch.grid_z)) == \
        spec.launch_grid(spec.Dims(2, 8, 2, 5, 33, 128))
    assert (launch.block_x, launch.shared_mem) == (kernel.num_warps * 32, kernel.shared_mem)
    assert [e.value for e in extra] == [2, 8, 2, 5, 33]
    assert all(isinstance(e, fake_trtp.SymInt32) for e in extra)


# ---- real TensorRT ------------------------------------------------------------------------------

def test_register_with_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not installed (full TensorRT comes from NVIDIA's index; "
                    "tensorrt_rtx has no tensorrt.plugin)")
    pytest.importorskip("tensorrt.plugin", reason="this TensorRT has no tensorrt.plugin module")
    ok, why = trt_plugin.plugin_supported()
    if not ok:
        pytest.skip(why)
    import tensorrt.plugin as trtp

    trt_plugin.register(cc=90)
    trt_plugin.register()
    assert hasattr(getattr(trtp.op, NAMESPACE), OP_NAME)
