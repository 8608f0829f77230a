"""Checkpoint folders: bit-exact round trips in three dtypes, cross gates and configs written
before the field, and one clear error per corruption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_model
from stagcompile import checkpoint
from stagcompile.config import preset
from stagcompile.errors import CheckpointError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    model = make_model(preset("tiny").replace(num_stacks=3, shared_weights=True)).to(dtype)
    checkpoint.save(model, tmp_path / "ck")
    loaded = checkpoint.load(tmp_path / "ck", dtype=None)
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype == dtype, name
        assert torch.equal(a, b), name


def _saved(tmp_path):
    path = tmp_path / "ck"
    checkpoint.save(make_model(preset("tiny")), path)
    return path


def test_truncated_weights(tmp_path):
    path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        checkpoint.load(path)


def test_corrupt_header(tmp_path):
    path = _saved(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_missing_files(tmp_path):
    path = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors: file not found"):
        checkpoint.load(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: file not found"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        checkpoint.load(tmp_path / "nowhere")


def test_config_that_does_not_parse(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").write_text("{\"d_model\": 32,")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        checkpoint.load(path)
    (path / "config.json").write_text(json.dumps(preset("tiny").to_dict() | {"n_heads": 5}))
    with pytest.raises(CheckpointError, match=r"config.json: config field d_model=64"):
        checkpoint.load(path)


def test_tensors_that_do_not_match_the_config(tmp_path):
    path = _saved(tmp_path)
    state = dict(make_model(preset("tiny")).state_dict())
    del state["norm_f.weight"]
    state["extra.bias"] = torch.zeros(3)
    state["embed.weight"] = torch.zeros(10, 32)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    msg = str(err.value)
    assert "missing: norm_f.weight" in msg
    assert "unexpected: extra.bias" in msg
    assert "embed.weight has shape (10, 32), config implies (97, 64)" in msg


def test_mixed_and_unsupported_dtypes(tmp_path):
    path = _saved(tmp_path)
    state = dict(make_model(preset("tiny")).state_dict())
    state["norm_f.weight"] = state["norm_f.weight"].half()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mixed dtypes float16, float32"):
        checkpoint.load(path)
    state = {n: t.double() for n, t in state.items()}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="dtype float64 not supported"):
        checkpoint.load(path)


def test_non_finite_weights_are_named(tmp_path):
    path = _saved(tmp_path)
    state = dict(make_model(preset("tiny")).state_dict())
    state["norm_f.weight"][3] = float("nan")
    state["embed.weight"][:2, 0] = float("inf")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: non-finite weights \(NaN or "
                                              r"inf\) in 2 tensor\(s\): embed.weight \(2 of "
                                              r"6,208\), norm_f.weight \(1 of 64\)"):
        checkpoint.load(path)


def test_cross_gate_round_trip_and_configs_without_the_field(tmp_path):
    gated = make_model(preset("tiny").replace(cross_gate=True))
    checkpoint.save(gated, tmp_path / "gated")
    loaded = checkpoint.load(tmp_path / "gated")
    assert loaded.cfg.cross_gate
    assert torch.equal(loaded.crosses[0].layers[1].gate, gated.crosses[0].layers[1].gate)
    plain = tmp_path / "plain"
    checkpoint.save(make_model(preset("tiny")), plain)
    older = json.loads((plain / "config.json").read_text())
    del older["cross_gate"]                       # as written before the field existed
    (plain / "config.json").write_text(json.dumps(older))
    assert checkpoint.load(plain).cfg.cross_gate is False
    (tmp_path / "gated" / "config.json").write_text(json.dumps(older))
    with pytest.raises(CheckpointError, match="unexpected: crosses.0.layers.0.gate, "
                                              "crosses.0.layers.1.gate"):
        checkpoint.load(tmp_path / "gated")
