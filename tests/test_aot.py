"""AOT PTX for sm_87 (Jetson Orin) and sm_90 (Hopper), compiled on CPU with Triton.

What Triton 3.9 emits: an `.entry` with the 12 parameters TensorRT passes (6 input pointers,
5 u32 scalars, 1 output pointer) followed by 2 hidden pointers (global_scratch, profile_scratch),
which the kernel never reads; `compile_ptx` drops them, so the PTX declares exactly 12. The
target line is `.target sm_87` and `.target sm_90a` (Triton compiles Hopper for the
arch-specific target), with the PTX ISA pinned to 7.4 / 8.0.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: no AOT compilation")

from conftest import extra_requirement  # noqa: E402
from plugins import aot, spec  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIM, WINDOW, SCALE = 128, 16, 0.125       # the largest common head dim: most shared memory


def entry_params(ptx: str, name: str) -> list[str]:
    body = re.search(rf"\.visible \.entry {name}\((.*?)\)", ptx, flags=re.S)
    assert body, f"no .visible .entry {name}( in the PTX"
    return re.findall(r"\.param (\.\w+)", body.group(1))


@pytest.mark.parametrize("cc", aot.BUNDLE_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ptx_for_target(dtype, cc):
    k = aot.compile_ptx(dtype, HEAD_DIM, WINDOW, SCALE, cc)
    assert re.search(rf"^\.target sm_{cc}a?\b", k.ptx, flags=re.M)
    version = aot.default_ptx_version(cc)
    assert re.search(rf"^\.version {version // 10}\.{version % 10}$", k.ptx, flags=re.M)
    params = entry_params(k.ptx, k.name)
    assert params == [".u64"] * 6 + [".u32"] * 5 + [".u64"], params
    assert len(params) == aot.NUM_PARAMS == 12
    assert k.hidden_params == 2                # triton 3.9: global_scratch + profile_scratch
    assert k.name == "bounded_window_attention_kernel"
    assert k.num_warps == spec.NUM_WARPS
    assert 0 < k.shared_mem <= aot.MAX_STATIC_SHARED
    assert k.config == spec.kernel_config(dtype, HEAD_DIM)


def test_compile_is_cached():
    a = aot.compile_ptx("float16", HEAD_DIM, WINDOW, SCALE, 90)
    assert aot.compile_ptx("float16", HEAD_DIM, WINDOW, SCALE, 90) is a


def _ptxas(cc: int) -> Path | None:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas") if cc >= 90 else ("ptxas",):
        if (bin_dir / name).exists():
            return bin_dir / name
    found = shutil.which("ptxas")
    return Path(found) if found else None


@pytest.mark.parametrize("cc", aot.BUNDLE_TARGETS)
def test_ptx_assembles(cc, tmp_path):
    """The PTX, hidden parameters dropped, is valid for the target (ptxas runs on CPU)."""
    import subprocess

    ptxas = _ptxas(cc)
    if ptxas is None:
        pytest.skip("no ptxas (neither bundled with triton nor on PATH)")
    k = aot.compile_ptx("bfloat16", HEAD_DIM, WINDOW, SCALE, cc)
    src = tmp_path / "k.ptx"
    src.write_text(k.ptx)
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    run = subprocess.run([str(ptxas), "-v", "--gpu-name", arch, str(src), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert " 0 bytes spill stores" in run.stderr, run.stderr


def test_write_ptx_bundle(tmp_path):
    paths = aot.write_ptx_bundle(tmp_path, head_dim=HEAD_DIM, window=WINDOW, scale=SCALE)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(paths) == len(index) + 1 == len(DTYPES) * len(aot.BUNDLE_TARGETS) + 1
    for entry in index:
        ptx = (tmp_path / entry["file"]).read_text()
        assert f".entry {entry['kernel_name']}(" in ptx
        assert entry["block_threads"] == entry["num_warps"] * 32
        assert re.search(rf"^\.target sm_{entry['cc']}a?\b", ptx, flags=re.M)


def test_ptx_version():
    assert (aot.default_ptx_version(87), aot.default_ptx_version(90)) == (74, 80)
    assert aot.default_ptx_version(75) == 64
    assert aot.default_ptx_version(70) is None      # unknown: Triton's default
    with pytest.raises(aot.AotError, match="PTX ISA 7.0 cannot target sm_87"):
        aot.compile_ptx("float16", 64, 0, 0.125, 87, ptx_version=70)


def test_hidden_param_that_is_read_is_refused():
    names = [f"k_param_{i}" for i in range(aot.NUM_PARAMS + 1)]
    decl = ",\n".join(f"\t.param .u64 {n}" for n in names)
    ptx = f".visible .entry k(\n{decl}\n)\n{{\n\tld.param.b64 %rd1, [{names[-1]}];\n}}\n"
    with pytest.raises(aot.AotError, match="reads hidden parameter"):
        aot._drop_hidden_params(ptx, "k")
    unread = ptx.replace(f"[{names[-1]}]", f"[{names[0]}]")
    kept, dropped = aot._drop_hidden_params(unread, "k")
    assert dropped == 1 and entry_params(kept, "k") == [".u64"] * aot.NUM_PARAMS


def test_bad_arguments():
    with pytest.raises(spec.AttentionSpecError, match="dtype float64"):
        aot.compile_ptx("float64", 64, 0, 0.125, 90)
    with pytest.raises(spec.AttentionSpecError, match="window"):
        aot.compile_ptx("float16", 64, -1, 0.125, 90)
    with pytest.raises(spec.AttentionSpecError, match="head dim D=512"):
        aot.compile_ptx("float16", 512, 0, 0.125, 90)


def test_triton_pin_matches_the_astsource_api_aot_uses():
    """Triton 3.2's ASTSource takes an AttrsDescriptor; aot needs >= 3.3 and says so."""
    spec_set = extra_requirement("plugin", "triton").specifier
    need = ".".join(map(str, aot.MIN_TRITON))
    assert not spec_set.contains("3.2.0") and spec_set.contains(f"{need}.0")
    aot.check_triton_version(triton.__version__)
    with pytest.raises(aot.AotError, match=r"triton 3.2.0 is too old.*triton>=3.3"):
        aot.check_triton_version("3.2.0")
