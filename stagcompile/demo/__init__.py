"""The embedded demo checkpoint: a StagFormer (P = 2, separate weights) trained on the offline
English corpus, stored in fp16 in this folder (config.json, model.safetensors, tokenizer.json) with
its model card (MODEL_CARD.md). `make demo` compiles it; `python -m stagcompile.demo RUN DEST`
turns a training run into this form."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent


def available() -> bool:
    return (DEMO_DIR / "model.safetensors").is_file()
