"""Hugging Face Llama folders <-> stagcompile checkpoints.

`import_hf(folder, out)` reads a local Llama (or Mistral) folder: config.json, model.safetensors
(or sharded, with model.safetensors.index.json) and tokenizer.json, and writes a P = 1 checkpoint
with the same weights in the same dtype. Hugging Face's Llama is this project's block exactly
(RMSNorm pre-norm, rotate-half RoPE, SwiGLU, no biases, GQA), so the mapping is by name:

    model.embed_tokens.weight                    embed.weight
    model.layers.{l}.input_layernorm.weight      trunks.0.layers.{l}.attn_norm.weight
    model.layers.{l}.self_attn.{q,k,v,o}_proj    trunks.0.layers.{l}.attn.{wq,wk,wv,wo}
    model.layers.{l}.post_attention_layernorm    trunks.0.layers.{l}.mlp_norm
    model.layers.{l}.mlp.{gate,up,down}_proj     trunks.0.layers.{l}.mlp.{w1,w3,w2}
    model.norm.weight                            norm_f.weight
    lm_head.weight (untied only)                 lm_head.weight (config tie_embeddings=false)

What the block cannot express is refused by name: rope scaling, biases, another activation, a
head_dim other than hidden_size / heads. A Mistral sliding window becomes `self_window`.

`restack=P` splits the L layers into P stacks of L/P (stack k takes layers kL/P .. (k+1)L/P - 1)
and adds each consumer's cross-attention with a zero output projection and a zero null slot, so
every cross-attention starts as a no-op: an initialisation for fine-tuning, not the same model
(stack k > 1 starts again from the embedding).

`export_hf(model, out)` writes a P = 1 checkpoint as a Llama folder (the ONNX Runtime GenAI
comparison in `stagcompile bench --peer ortgenai` builds its model from it).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from stagcompile.config import TOKENIZER_FILE, ConfigError, StagConfig
from stagcompile.errors import StagError

PER_LAYER = {"input_layernorm.weight": "attn_norm.weight",
             "self_attn.q_proj.weight": "attn.wq.weight", "self_attn.k_proj.weight": "attn.wk.weight",
             "self_attn.v_proj.weight": "attn.wv.weight", "self_attn.o_proj.weight": "attn.wo.weight",
             "post_attention_layernorm.weight": "mlp_norm.weight",
             "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.up_proj.weight": "mlp.w3.weight",
             "mlp.down_proj.weight": "mlp.w2.weight"}
MODEL_TYPES = ("llama", "mistral")


class HfError(StagError):
    """A Hugging Face folder that cannot become a stagcompile checkpoint."""


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise HfError(f"{path}: file not found (expected a Hugging Face model folder with "
                      "config.json and model.safetensors)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HfError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HfError(f"{path}: expected a JSON object")
    return data


def _field(hf: dict, name: str, source: Path, kinds=(int,)):
    value = hf.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise HfError(f"{source}: field {name} is {value!r}; expected a number")
    return value


def _rope_theta(hf: dict, source: Path) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else None
    kind = kind or params.get("rope_type")
    if kind not in (None, "default"):
        raise HfError(f"{source}: rope scaling {kind!r} is not supported (the block uses plain "
                      "RoPE); use a model without rope_scaling")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise HfError(f"{source}: rope_theta {theta!r}: expected a finite number > 1")
    return float(theta)


def hf_config(hf: dict, source: Path) -> StagConfig:
    """The P = 1 StagConfig of a Hugging Face Llama/Mistral config (refusing what differs)."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise HfError(f"{source}: model_type {kind!r} is not supported; expected one of "
                      f"{', '.join(MODEL_TYPES)} (Llama-style decoders)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HfError(f"{source}: {flag}=true is not supported (the block has no biases)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HfError(f"{source}: hidden_act {act!r} is not supported (the block is SwiGLU, silu)")
    d = _field(hf, "hidden_size", source)
    heads = _field(hf, "num_attention_heads", source)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != d:
        raise HfError(f"{source}: head_dim {head_dim} x num_attention_heads {heads} != "
                      f"hidden_size {d}; the block needs head_dim = hidden_size / heads")
    try:
        return StagConfig(
            vocab_size=_field(hf, "vocab_size", source), d_model=d, n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            d_ff=_field(hf, "intermediate_size", source), num_stacks=1,
            layers_per_stack=_field(hf, "num_hidden_layers", source),
            self_window=hf.get("sliding_window") if kind == "mistral" else None,
            max_seq_len=_field(hf, "max_position_embeddings", source),
            rope_theta=_rope_theta(hf, source),
            norm_eps=float(_field(hf, "rms_norm_eps", source, (int, float))),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except ConfigError as exc:
        raise HfError(f"{source}: {exc}") from None


def _read_tensors(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise HfError(f"{index}: not a safetensors index ({exc})") from None
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise HfError(f"{path}: file not found (the model's weights, safetensors)")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise HfError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors


def _rename(tensors: dict, cfg: StagConfig, source: Path) -> dict:
    """Hugging Face names -> the P = 1 state dict; every missing or unused tensor is an error."""
    out = {"embed.weight": tensors.get("model.embed_tokens.weight"),
           "norm_f.weight": tensors.get("model.norm.weight")}
    for l in range(cfg.layers_per_stack):
        for hf_name, ours in PER_LAYER.items():
            out[f"trunks.0.layers.{l}.{ours}"] = tensors.get(f"model.layers.{l}.{hf_name}")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = tensors.get("lm_head.weight")
    missing = sorted(n for n, t in out.items() if t is None)
    if missing:
        raise HfError(f"{source}: weights missing for {', '.join(missing[:6])}"
                      f"{' ...' if len(missing) > 6 else ''}")
    used = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    used |= {f"model.layers.{l}.{n}" for l in range(cfg.layers_per_stack) for n in PER_LAYER}
    unused = sorted(n for n in set(tensors) - used if not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise HfError(f"{source}: tensors this block has no place for: {', '.join(unused[:6])}")
    return out


def restacked(model, stacks: int, seed: int = 0):
    """A P-stack StagFormer initialised from P = 1 `model`'s layers, cross-attention a no-op."""
    import torch

    from stagcompile.model import StagFormer
    cfg = model.cfg
    if stacks < 2 or cfg.layers_per_stack % stacks:
        raise HfError(f"--restack {stacks}: must be >= 2 and divide the {cfg.layers_per_stack} "
                      "layers")
    per = cfg.layers_per_stack // stacks
    new = StagFormer(cfg.replace(num_stacks=stacks, layers_per_stack=per))
    new.reset_parameters(seed)
    new = new.to(model.embed.weight.dtype)
    state = new.state_dict()
    old = model.state_dict()
    for name, value in old.items():
        if name.startswith("trunks.0.layers."):
            layer, rest = name.removeprefix("trunks.0.layers.").split(".", 1)
            k, l = divmod(int(layer), per)
            state[f"trunks.{k}.layers.{l}.{rest}"] = value
        else:
            state[name] = value
    for name in state:
        if name.startswith("crosses.") and name.endswith(("attn.wo.weight", "null")):
            state[name] = torch.zeros_like(state[name])
    new.load_state_dict(state)
    return new.eval()


def import_hf(folder: Path, out: Path, restack: int | None = None, force: bool = False) -> Path:
    import torch

    from stagcompile import checkpoint
    from stagcompile.model import StagFormer
    from stagcompile.atomic import check_target
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise HfError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    check_target(out, force, "checkpoint", [folder])
    cfg = hf_config(_read_config(folder), folder / "config.json")
    state = _rename(_read_tensors(folder), cfg, folder / "model.safetensors")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float16,
                                                       torch.bfloat16):
        raise HfError(f"{folder}: weights in {sorted(map(str, dtypes))}; expected one of "
                      "float32, float16, bfloat16")
    dtype = next(iter(dtypes))
    with torch.device("meta"):
        model = StagFormer(cfg)
    model.load_state_dict(state, assign=True)
    if restack:
        model = restacked(model, restack)
    tok = folder / TOKENIZER_FILE
    return checkpoint.save(model.eval(), out, dtype=dtype, tokenizer=tok if tok.is_file() else None,
                           force=force, sources=[folder])


def export_hf(model, out: Path) -> Path:
    """Write a P = 1 reference model as a Hugging Face Llama folder (fp32)."""
    from safetensors.torch import save_file

    cfg = model.cfg
    if cfg.num_stacks != 1 or cfg.self_window is not None:
        raise HfError("only P = 1 models without a self window are Llama models "
                      f"(num_stacks={cfg.num_stacks}, self_window={cfg.self_window})")
    state = {n: t.detach().float().contiguous() for n, t in model.state_dict().items()}
    tensors = {"model.embed_tokens.weight": state["embed.weight"],
               "model.norm.weight": state["norm_f.weight"]}
    for l in range(cfg.layers_per_stack):
        for hf_name, ours in PER_LAYER.items():
            tensors[f"model.layers.{l}.{hf_name}"] = state[f"trunks.0.layers.{l}.{ours}"]
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.layers_per_stack,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}, indent=2))
    return out


def copy_tokenizer(tokenizer: Path, out: Path, eos: str = "<|endoftext|>") -> None:
    """tokenizer.json plus the tokenizer_config.json that transformers' AutoTokenizer reads."""
    shutil.copyfile(tokenizer, Path(out) / TOKENIZER_FILE)
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}))
