"""Shared fixtures: tiny configs of every variant, seeded models with non-trivial weights."""

from __future__ import annotations

import itertools
import os

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
            f"-cw{cfg.cross_window}-sw{cfg.self_window}")


VARIANTS = variant_matrix()


def make_model(cfg, seed: int = 0):
    """A reference model whose weights are far from the init (norms and nulls perturbed too)."""
    import torch

    from stagcompile.model import StagFormer
    torch.manual_seed(seed)
    model = StagFormer(cfg)
    model.reset_parameters(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(params=VARIANTS, ids=variant_id)
def variant(request):
    return request.param
