"""`stagcompile train`: train a StagFormer (or a P = 1 baseline) with the reference model.

Teacher-forced next-token loss on the last stack's logits (DESIGN section 1). AdamW with linear
warm-up and cosine decay to 10 %, gradient clipping, periodic evaluation (loss, perplexity, bits
per byte), and checkpoints that resume exactly: batch b of step s is drawn from a generator
seeded by (seed, s), and model, optimizer and step are restored, so a resumed run reproduces the
uninterrupted one. Uses a CUDA GPU when there is one.

The checkpoint folder holds config.json, model.safetensors, tokenizer.json, train_state.json and
train_state.safetensors (optimizer and step, for --resume; no pickle: see stagcompile.train_state)
and train_log.json (every evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stagcompile import checkpoint, train_state
from stagcompile.atomic import check_target
from stagcompile.config import StagConfig, preset
from stagcompile.errors import StagError
from stagcompile.model import StagFormer
from stagcompile.progress import progress
from stagcompile.tokenizer import (MIN_VOCAB, encode, load_tokenizer, read_text, read_texts,
                                   train_tokenizer)

LOG_FILE = "train_log.json"
DEFAULT_SEQ_LEN = 128       # --seq-len when not given (at most the model's max_seq_len)


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int | None = None      # None: DEFAULT_SEQ_LEN, at most the model's max_seq_len
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    seed: int = 0
    val_fraction: float = 0.02

    def check(self, cfg: StagConfig) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) < 1:
                raise StagError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.seq_len > cfg.max_seq_len:
            raise StagError(f"--seq-len {self.seq_len}: above the model's max_seq_len="
                            f"{cfg.max_seq_len} (raise it with --set max_seq_len=N)")
        if not 0 < self.lr < 1:
            raise StagError(f"--lr {self.lr}: must be in (0, 1)")
        if self.seed < 0:
            raise StagError(f"--seed {self.seed}: must be >= 0")


@dataclass
class Data:
    train: np.ndarray
    val: np.ndarray
    val_bytes_per_token: float

    @classmethod
    def build(cls, tok, text: str, val_text: str | None, val_fraction: float, need: int) -> "Data":
        if val_text is None:
            cut = text.rfind("\n\n", 0, int(len(text) * (1 - val_fraction)))
            cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
            text, val_text = text[:cut], text[cut:]
        train, val = encode(tok, text), encode(tok, val_text)
        for name, arr in (("training", train), ("validation", val)):
            if len(arr) <= need:
                raise StagError(f"the {name} text has {len(arr)} tokens; one sequence needs "
                                f"{need} (use more text or a shorter --seq-len)")
        return cls(train, val, len(val_text.encode("utf-8")) / len(val))

    def batch(self, split: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int):
        starts = rng.integers(0, len(split) - seq_len - 1, batch)
        rows = np.stack([split[s: s + seq_len + 1] for s in starts]).astype(np.int64)
        x = torch.from_numpy(rows)
        return x[:, :-1], x[:, 1:]


def lr_at(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: StagFormer, opts: TrainOptions) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: StagFormer, data: Data, opts: TrainOptions, device) -> dict:
    """Mean validation loss over fixed windows, perplexity and bits per byte."""
    model.eval()
    rng = np.random.default_rng([opts.seed, 2**31 - 1])
    losses = []
    for _ in range(opts.eval_batches):
        x, y = data.batch(data.val, rng, opts.batch_size, opts.seq_len)
        losses.append(float(model(x.to(device), y.to(device))[1]))
    model.train()
    loss = float(np.mean(losses))
    return {"val_loss": loss, "val_ppl": math.exp(loss),
            "val_bpb": loss / math.log(2) / data.val_bytes_per_token}


def _save(model, out: Path, tok, opt, step: int, opts: TrainOptions, log: list,
          sources=()) -> None:
    extra = {"tokenizer.json": tok.to_str(), LOG_FILE: json.dumps(log, indent=1),
             **train_state.files(step, opt, asdict(opts))}
    checkpoint.save(model, out, sources=sources, extra_files=extra)


def tokenizer_size(cfg: StagConfig, overrides, vocab_size: int | None) -> int:
    """The BPE size to train: --vocab-size, else the config's vocab_size (a --set one as given;
    a preset's raised to MIN_VOCAB, since the `tiny` preset's 97 is for random-weight tests)."""
    if vocab_size is not None:
        return vocab_size
    if any(o.partition("=")[0].strip() == "vocab_size" for o in overrides):
        if cfg.vocab_size < MIN_VOCAB:
            raise StagError(f"--set vocab_size={cfg.vocab_size}: a byte-level BPE needs >= "
                            f"{MIN_VOCAB} tokens (256 bytes + <|endoftext|>)")
        return cfg.vocab_size
    return max(cfg.vocab_size, MIN_VOCAB)


def train(files: list[Path], out: Path, preset_name: str = "demo", overrides: list[str] = (),
          opts: TrainOptions = TrainOptions(), resume: bool = False, val_file: Path | None = None,
          vocab_size: int | None = None, tokenizer_file: Path | None = None,
          show_progress: bool = True) -> list[dict]:
    out = Path(out)
    cfg = preset(preset_name).with_overrides(list(overrides))
    sources = [*files, *(p for p in (val_file, tokenizer_file) if p is not None)]
    if opts.seq_len is None:
        opts = dataclasses.replace(opts, seq_len=min(DEFAULT_SEQ_LEN, cfg.max_seq_len))
    opts.check(cfg)
    text = read_texts(files)
    val_text = read_text(val_file) if val_file is not None else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(opts.seed)
    if resume:
        state = train_state.load(out)
        tok = load_tokenizer(out / "tokenizer.json")
        saved = checkpoint.load_config(out)
        if saved != cfg.replace(vocab_size=saved.vocab_size):
            diff = {k: (v, cfg.to_dict()[k]) for k, v in saved.to_dict().items()
                    if k != "vocab_size" and cfg.to_dict()[k] != v}
            raise StagError(f"--resume {out}: the checkpoint's config differs from the requested "
                            f"one: {', '.join(f'{k} saved {a} vs {b}' for k, (a, b) in diff.items())}")
        cfg = saved
        model = checkpoint.load(out).to(device).train()
        check_target(out, True, "checkpoint", sources)      # saving must not delete an input
        start, log = state["step"], train_state.read_json(out / LOG_FILE)
    else:
        if out.exists():
            raise StagError(f"{out}: already exists; pass --resume to continue it or choose "
                            "another folder")
        tok = (load_tokenizer(tokenizer_file) if tokenizer_file
               else train_tokenizer(text, tokenizer_size(cfg, overrides, vocab_size)))
        cfg = cfg.replace(vocab_size=tok.get_vocab_size())
        model = StagFormer(cfg)
        model.reset_parameters(opts.seed)
        model = model.to(device).train()
        start, log, state = 0, [], None
    data = Data.build(tok, text, val_text, opts.val_fraction, opts.seq_len + 1)
    opt = make_optimizer(model, opts)
    if state is not None:
        train_state.restore(opt, state, out)
    tokens_per_step = opts.batch_size * opts.seq_len
    with progress(show_progress) as bar:
        task = bar.add_task("train", total=opts.steps, completed=start)
        t0, done = time.perf_counter(), 0
        for step in range(start, opts.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, opts)
            x, y = data.batch(data.train, np.random.default_rng([opts.seed, step]),
                              opts.batch_size, opts.seq_len)
            _, loss = model(x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            opt.step()
            done += 1
            rate = done * tokens_per_step / (time.perf_counter() - t0)
            entry = {"step": step + 1, "loss": loss.item(), "lr": lr_at(step, opts),
                     "tokens": (step + 1) * tokens_per_step, "tokens_per_s": rate}
            if (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps:
                entry |= evaluate(model, data, opts, device)
                entry["wall_s"] = time.perf_counter() - t0
                log.append(entry)
                bar.console.print(f"step {step + 1}: train loss {entry['loss']:.4f}, val loss "
                                  f"{entry['val_loss']:.4f}, val bpb {entry['val_bpb']:.4f}, "
                                  f"{rate:,.0f} tok/s, {entry['wall_s']:.0f} s", highlight=False)
            bar.update(task, advance=1, description=f"loss {entry['loss']:.3f} "
                       f"{'val bpb %.3f ' % entry['val_bpb'] if 'val_bpb' in entry else ''}"
                       f"{rate:,.0f} tok/s")
            if (step + 1) % opts.save_every == 0 or step + 1 == opts.steps:
                _save(model, out, tok, opt, step + 1, opts, log, sources)
    return log
