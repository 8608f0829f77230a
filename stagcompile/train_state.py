"""The trainer's resume state, without pickle: tensors in safetensors, the rest in JSON.

    train_state.safetensors   optimizer tensors, "state.{param index}.{name}" (AdamW: step,
                              exp_avg, exp_avg_sq)
    train_state.json          {"format": "stagcompile-train-state", "version": 1, "step": N,
                               "options": {TrainOptions fields}, "param_groups": [...]}

Loading reads data only (safetensors and JSON never run code), checks the JSON's fields and
tensor names, and names the file in every error. A `train_state.pt` from an older stagcompile is
a pickle and is never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from stagcompile.errors import StagError

TENSORS, META, LEGACY = "train_state.safetensors", "train_state.json", "train_state.pt"
FORMAT, VERSION = "stagcompile-train-state", 1


def files(step: int, optimizer: torch.optim.Optimizer, options: dict) -> dict[str, str | bytes]:
    """{file name: content} of the state after `step` optimizer steps."""
    sd = optimizer.state_dict()
    tensors, values = {}, {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values[f"state.{index}.{name}"] = value
    meta = {"format": FORMAT, "version": VERSION, "step": step, "options": options,
            "param_groups": sd["param_groups"], "values": values}
    return {TENSORS: save(tensors), META: json.dumps(meta, indent=1)}


def read_json(path: Path):
    """A JSON file of the trainer's folder; StagError naming it if it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StagError(f"{path}: not a readable JSON file ({exc})") from None


def _meta(path: Path) -> dict:
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StagError(f"{path}: not a stagcompile trainer state (format {FORMAT!r}, "
                        f"version {VERSION})")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise StagError(f"{path}: field step should be an integer >= 0, got {step!r}")
    for key, kind in (("options", dict), ("param_groups", list), ("values", dict)):
        if not isinstance(meta.get(key), kind):
            raise StagError(f"{path}: field {key} should be a JSON {kind.__name__}")
    for i, group in enumerate(meta["param_groups"]):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, int) for p in params):
            raise StagError(f"{path}: field param_groups[{i}].params should be a list of integers")
    return meta


def _entry(path: Path, key: str) -> tuple[int, str]:
    prefix, index, name = (key.split(".", 2) + ["", ""])[:3]
    if prefix != "state" or not index.isdigit() or not name:
        raise StagError(f"{path}: unexpected entry {key!r} (expected state.<index>.<name>)")
    return int(index), name


def load(folder: Path) -> dict:
    """{"step", "optimizer" (a state dict for Optimizer.load_state_dict), "options"}."""
    folder = Path(folder)
    meta_path, tensor_path = folder / META, folder / TENSORS
    if not meta_path.is_file():
        if (folder / LEGACY).is_file():
            raise StagError(f"{folder / LEGACY}: a pickled trainer state from an older stagcompile;"
                            " it is not loaded (unpickling can run code): train without --resume")
        raise StagError(f"{folder}: no {META} to resume from (train without --resume)")
    meta = _meta(meta_path)
    state: dict[int, dict] = {}
    try:
        with safe_open(str(tensor_path), framework="pt") as f:
            for key in f.keys():
                index, name = _entry(tensor_path, key)
                state.setdefault(index, {})[name] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StagError(f"{tensor_path}: not a readable safetensors file ({exc})") from None
    for key, value in meta["values"].items():
        index, name = _entry(meta_path, key)
        state.setdefault(index, {})[name] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"step": meta["step"], "options": meta["options"],
            "optimizer": {"state": state, "param_groups": groups}}


def restore(optimizer: torch.optim.Optimizer, state: dict, folder: Path) -> None:
    """Load a state from `load` into `optimizer`, naming the files when it does not fit."""
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StagError(f"{Path(folder) / META}: does not match this model's optimizer "
                        f"({exc})") from None
