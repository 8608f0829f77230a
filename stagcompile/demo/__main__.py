"""`python -m stagcompile.demo RUN DEST`: store a trained checkpoint as the demo (fp16 weights,
tokenizer, no optimizer state) and write its model card from the run's train_log.json."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from stagcompile import checkpoint, train_state
from stagcompile.train import LOG_FILE

CARD = """# stagcompile demo checkpoint

A StagFormer ({p} stacks x {l} layers, separate weights{gate}), d_model {d}, {h} heads, d_ff {ff},
vocabulary {v} (byte-level BPE), max_seq_len {msl}; {params:,} parameters stored in fp16
({mib:.1f} MiB).

- Data: `train.txt.xz` of the offline English corpus (Shakespeare, Milton, Austen, the World
  English Bible, Python 3.11 documentation; see `../shared/data/corpus/SOURCES.md`), evaluated on
  `val.txt.xz`.
- Training: {steps} steps x {batch} sequences x {seq} tokens = {tokens:,} tokens, AdamW (peak lr
  {lr}, {warmup} warm-up steps, cosine to 10 %), seed {seed}, {wall:.0f} s on a 2-core CPU{recipe}.
- Final validation: loss {loss:.4f}, perplexity {ppl:.2f}, **{bpb:.4f} bits per byte**.
- Command: `scripts/train_demo.sh` (exactly: `{command}`).

Evaluation history (step, val loss, val bits per byte):

{history}
"""


STACK1 = (("stack1_lr_mult", 1.0, "--stack1-lr-mult"), ("aux_loss", 0.0, "--aux-loss"),
          ("detach_memory", "none", "--detach-memory"), ("init_depth", "model", "--init-depth"))


def recipe_flags(cfg, opts: dict) -> str:
    """The command-line flags of the run's stack-1 options and cross gate (README "Training
    stack 1") that differ from the defaults."""
    flags = ["--set cross_gate=true"] if cfg.cross_gate else []
    flags += [f"{flag} {opts[key]}" for key, default, flag in STACK1
              if opts.get(key, default) != default]
    return " ".join(flags)


def main(run: Path, dest: Path) -> None:
    model = checkpoint.load(run)
    log = train_state.read_json(run / LOG_FILE)
    opts = train_state.load(run)["options"]
    checkpoint.save(model, dest, dtype=torch.float16, tokenizer=run / "tokenizer.json",
                    force=True, sources=[run],
                    extra_files={"__init__.py": (Path(__file__).parent / "__init__.py").read_text(),
                                 "__main__.py": Path(__file__).read_text()})
    cfg, last = model.cfg, log[-1]
    recipe = recipe_flags(cfg, opts)
    params = sum(p.numel() for p in model.parameters())
    card = CARD.format(
        p=cfg.num_stacks, l=cfg.layers_per_stack, d=cfg.d_model, h=cfg.n_heads, ff=cfg.d_ff,
        v=cfg.vocab_size, msl=cfg.max_seq_len, params=params,
        gate=", tanh-gated cross-attention" if cfg.cross_gate else "",
        recipe=f"; stack-1 recipe: `{recipe}`" if recipe else "",
        mib=(dest / "model.safetensors").stat().st_size / 2**20, steps=last["step"],
        batch=opts["batch_size"], seq=opts["seq_len"], tokens=last["tokens"], lr=opts["lr"],
        warmup=opts["warmup"], seed=opts["seed"], wall=last["wall_s"], loss=last["val_loss"],
        ppl=last["val_ppl"], bpb=last["val_bpb"],
        command=(f"stagcompile train $CORPUS/train.txt.xz --val $CORPUS/val.txt.xz -o {run} "
                 f"--preset demo --steps {last['step']} --batch-size {opts['batch_size']} "
                 f"--seq-len {opts['seq_len']} --lr {opts['lr']} --warmup {opts['warmup']} "
                 f"--eval-every {opts['eval_every']} --save-every {opts['save_every']} "
                 f"--seed {opts['seed']}" + (f" {recipe}" if recipe else "")),
        history="\n".join(f"- {e['step']}: {e['val_loss']:.4f}, {e['val_bpb']:.4f}" for e in log))
    (dest / "MODEL_CARD.md").write_text(card)
    print(f"wrote {dest} ({params:,} parameters, val bpb {last['val_bpb']:.4f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
