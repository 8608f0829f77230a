"""Shared fixtures: tiny configs of every variant, seeded models with non-trivial weights."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

from stagcompile.config import preset  # noqa: E402


def variant_matrix():
    """P in {1,2,3} x shared {no, yes} x cross_window {None,1,4} x self_window {None,8}."""
    out = []
    for p, shared, cw, sw in itertools.product([1, 2, 3], [False, True], [None, 1, 4], [None, 8]):
        if p == 1 and (shared or cw is not None):
            continue
        out.append(preset("tiny").replace(num_stacks=p, shared_weights=shared, cross_window=cw,
                                          self_window=sw))
    return out


def variant_id(cfg) -> str:
    return (f"P{cfg.num_stacks}-{'shared' if cfg.shared_weights else 'sep'}"
            f"-cw{cfg.cross_window}-sw{cfg.self_window}{'-gate' if cfg.cross_gate else ''}")


VARIANTS = variant_matrix()
BF16_CFG = preset("tiny").replace(cross_window=4, self_window=8)   # the bf16 export tests' model


def make_model(cfg, seed: int = 0):
    """A reference model whose weights are far from the init (norms and nulls perturbed too;
    cross gates, zero at init, drawn from N(0, 1) so that they matter)."""
    import torch

    from stagcompile.model import StagFormer
    torch.manual_seed(seed)
    model = StagFormer(cfg)
    model.reset_parameters(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            scale = 1.0 if name.endswith("gate") else 0.1
            prm.add_(torch.randn(prm.shape, generator=gen) * scale)
    return model.eval()


def grouped(configs):
    """pytest params that keep every test of one variant on one xdist worker (bundles are
    exported once per worker and variant)."""
    return [pytest.param(c, id=variant_id(c), marks=pytest.mark.xdist_group(variant_id(c)))
            for c in configs]


@pytest.fixture(params=grouped(VARIANTS))
def variant(request):
    return request.param


_BUNDLES: dict = {}


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bundles")


def bundle_for(root, cfg, dtype: str = "fp32", flavour: str = "all", seed: int = 0):
    """Export (once per process) a bundle of a seeded tiny model; returns (bundle path, model)."""
    from stagcompile import checkpoint
    from stagcompile.export import export_bundle
    key = (cfg.to_json(), dtype, flavour, seed)
    if key not in _BUNDLES:
        name = f"{variant_id(cfg)}-L{cfg.max_seq_len}-{dtype}-{flavour}-{seed}"
        model = make_model(cfg, seed)
        checkpoint.save(model, root / name / "ck")
        export_bundle(root / name / "ck", root / name / "bundle", flavour, dtype,
                      show_progress=False)
        _BUNDLES[key] = (root / name / "bundle", model)
    return _BUNDLES[key]


def extra_requirement(extra: str, name: str):
    """The `name` requirement of pyproject.toml's optional dependency `extra`."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in project["project"]["optional-dependencies"][extra]]
    return next(r for r in reqs if r.name == name)


def free_ports(n: int = 1) -> list[int]:
    """n distinct TCP ports free on localhost right now (for servers the tests start)."""
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
