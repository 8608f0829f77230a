"""Hugging Face import: a Llama folder becomes a checkpoint with the same logits (checked against
transformers' own Llama when it is installed), untied heads compile and run, what the block
cannot express is refused by name, and --restack starts every cross-attention as a no-op."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import make_model
from stagcompile import checkpoint
from stagcompile.config import preset
from stagcompile.export import export_bundle
from stagcompile.generate import cached_generate
from stagcompile.hf import HfError, export_hf, import_hf
from stagcompile.runtime import Generator

P1 = preset("tiny").replace(num_stacks=1, layers_per_stack=4)


def hf_folder(tmp_path, cfg=P1, seed=0):
    model = make_model(cfg, seed)
    return model, export_hf(model, tmp_path / "hf")


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_keeps_every_weight(tmp_path, tied):
    model, folder = hf_folder(tmp_path, P1.replace(tie_embeddings=tied))
    out = import_hf(folder, tmp_path / "ck")
    back = checkpoint.load(out)
    assert back.cfg == model.cfg
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_logits_match_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, folder = hf_folder(tmp_path, P1.replace(tie_embeddings=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ours = checkpoint.load(import_hf(folder, tmp_path / "ck"))
    ids = torch.randint(0, P1.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flavour", ["ort", "portable"])
def test_untied_head_compiles_and_runs(tmp_path, flavour):
    model = make_model(P1.replace(tie_embeddings=False, layers_per_stack=2))
    checkpoint.save(model, tmp_path / "ck")
    export_bundle(tmp_path / "ck", tmp_path / "b", show_progress=False)
    prompt = np.random.default_rng(0).integers(0, P1.vocab_size, (2, 5))
    want, _ = cached_generate(model, torch.from_numpy(prompt), 8)
    gen = Generator.load(tmp_path / "b", flavour=flavour)
    assert np.array_equal(gen.generate(prompt, 8), want.numpy())
    gen.close()


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling 'yarn'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"head_dim": 32}, "head_dim 32 x num_attention_heads 4"),
    ({"rope_theta": float("nan")}, "rope_theta nan"),
])
def test_unsupported_features_are_refused_by_name(tmp_path, changes, message):
    _, folder = hf_folder(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(HfError, match=message):
        import_hf(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_missing_and_unknown_tensors_are_named(tmp_path):
    _, folder = hf_folder(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(HfError, match="weights missing for trunks.0.layers.1.mlp.w3.weight"):
        import_hf(folder, tmp_path / "ck")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.gate_proj.weight"].clone()
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(HfError, match="no place for: model.layers.0.self_attn.q_norm.weight"):
        import_hf(folder, tmp_path / "ck")


def test_cli_import_hf_and_errors(tmp_path):
    from cli import app
    _, folder = hf_folder(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["import-hf", str(folder), "-o", str(tmp_path / "ck"),
                              "--restack", "2"])
    assert res.exit_code == 0, res.output
    assert checkpoint.load(tmp_path / "ck").cfg.num_stacks == 2
    res = runner.invoke(app, ["import-hf", str(tmp_path / "nope"), "-o", str(tmp_path / "c2")])
    assert res.exit_code == 1 and "not a folder" in res.output
    res = runner.invoke(app, ["import-hf", str(folder), "-o", str(tmp_path / "c3"),
                              "--restack", "3"])
    assert res.exit_code == 1 and "--restack 3: must be >= 2 and divide the 4 layers" in res.output
    res = runner.invoke(app, ["import-hf", str(folder), "-o", str(tmp_path / "ck")])
    assert res.exit_code == 1 and "already exists; pass --force" in res.output
    res = runner.invoke(app, ["import-hf", str(folder), "-o", str(folder), "--force"])
    assert res.exit_code == 1 and "is the input" in res.output
    assert (folder / "model.safetensors").is_file()     # the Hugging Face folder is untouched


def test_restack_starts_cross_attention_as_a_no_op(tmp_path):
    model, folder = hf_folder(tmp_path)
    restacked = checkpoint.load(import_hf(folder, tmp_path / "ck", restack=2))
    cfg = restacked.cfg
    assert (cfg.num_stacks, cfg.layers_per_stack) == (2, 2)
    old, new = model.state_dict(), restacked.state_dict()
    for l in range(4):
        k, j = divmod(l, 2)
        assert torch.equal(new[f"trunks.{k}.layers.{j}.mlp.w2.weight"],
                           old[f"trunks.0.layers.{l}.mlp.w2.weight"])
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = restacked(ids)
        shaken = restacked(ids, perturb={0: torch.randn(2, 10, cfg.d_model)})
    torch.testing.assert_close(plain, shaken, atol=0, rtol=0)   # the memory is not read yet
