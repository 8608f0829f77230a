"""`stagcompile train`: train a StagFormer (or a P = 1 baseline) with the reference model.

Teacher-forced next-token loss on the last stack's logits (DESIGN section 1). AdamW with linear
warm-up and cosine decay to 10 %, gradient clipping, periodic evaluation (loss, perplexity, bits
per byte), and checkpoints that resume exactly: batch b of step s is drawn from a generator
seeded by (seed, s), and model, optimizer and step are restored, so a resumed run reproduces the
uninterrupted one. Uses a CUDA GPU when there is one.

Options for training stack 1 of a StagFormer (all off by default; README "Demo model and
quality" measures them): `stack1_lr_mult` scales the learning rate of the parameters only stack 1
uses (`stack1_only`); `aux_loss` adds that weight times a next-token loss on stack 1's output
through the LM head (the validation loss never includes it); `detach_memory` stops the
gradient into stack 1 through the memory's keys, values or both; `init_depth` "stack" scales
the output projections' init by one stack's depth instead of the model's.

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
from stagcompile.model import DETACH, INIT_DEPTHS, StagFormer
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
    stack1_lr_mult: float = 1.0
    aux_loss: float = 0.0
    detach_memory: str = "none"
    init_depth: str = "model"

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
        if not 0 < self.stack1_lr_mult <= 10:
            raise StagError(f"--stack1-lr-mult {self.stack1_lr_mult}: must be in (0, 10]")
        if self.aux_loss < 0:
            raise StagError(f"--aux-loss {self.aux_loss}: must be >= 0")
        if self.detach_memory not in DETACH:
            raise StagError(f"--detach-memory {self.detach_memory}: expected one of "
                            f"{', '.join(DETACH)}")
        if self.init_depth not in INIT_DEPTHS:
            raise StagError(f"--init-depth {self.init_depth}: expected one of "
                            f"{', '.join(INIT_DEPTHS)}")
        stack1 = {"--stack1-lr-mult": self.stack1_lr_mult != 1.0, "--aux-loss": self.aux_loss > 0,
                  "--detach-memory": self.detach_memory != "none"}
        for flag, used in stack1.items():
            if used and cfg.num_stacks == 1:
                raise StagError(f"{flag}: needs num_stacks >= 2 (a single stack has no stack 1 "
                                "feeding a memory)")


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


def stack1_only(model: StagFormer) -> set[str]:
    """Names of the parameters that only stack 1 uses: its trunk and memory norm with separate
    weights, only the memory norm with shared weights (the shared trunk is every stack's)."""
    per_stack = model.stack_parameter_names()
    others = {n for k, names in per_stack.items() if k > 0 for n in names}
    return set(per_stack[0]) - others


def make_optimizer(model: StagFormer, opts: TrainOptions) -> tuple[torch.optim.AdamW, list[float]]:
    """AdamW over decayed (matrices) and undecayed parameters, and each group's learning-rate
    multiplier; with `stack1_lr_mult` != 1 each group splits into stack 1's and the rest."""
    special = stack1_only(model) if opts.stack1_lr_mult != 1.0 else set()
    groups, mults = [], []
    for mult, stack1 in ((1.0, False), (opts.stack1_lr_mult, True)):
        for decay, wd in ((True, opts.weight_decay), (False, 0.0)):
            params = [p for n, p in model.named_parameters()
                      if (n in special) == stack1 and (p.dim() >= 2) == decay]
            if params:
                groups.append({"params": params, "weight_decay": wd})
                mults.append(mult)
    opt = torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)
    return opt, mults


def stack1_loss(model: StagFormer, stream: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of stack 1's output h1 = mem_norm_1(x) [B, T, d_model] through
    the tied head (the auxiliary loss)."""
    logits = torch.matmul(model.mem_norms[0](stream).float(), model.head_weight().float().t())
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),  # [B*T, V]
                                             targets.reshape(-1))


def training_loss(model: StagFormer, x: torch.Tensor, y: torch.Tensor,
                  opts: TrainOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to minimise, the model's next-token loss): they differ by the auxiliary loss."""
    streams: list | None = [] if opts.aux_loss else None
    _, loss = model(x, y, stack_outputs=streams, detach_memory=opts.detach_memory)
    if not opts.aux_loss:
        return loss, loss
    return loss + opts.aux_loss * stack1_loss(model, streams[0], y), loss


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
        model.reset_parameters(opts.seed, opts.init_depth)
        model = model.to(device).train()
        start, log, state = 0, [], None
    data = Data.build(tok, text, val_text, opts.val_fraction, opts.seq_len + 1)
    opt, lr_mults = make_optimizer(model, opts)
    if state is not None:
        train_state.restore(opt, state, out)
    tokens_per_step = opts.batch_size * opts.seq_len
    with progress(show_progress) as bar:
        task = bar.add_task("train", total=opts.steps, completed=start)
        t0, done = time.perf_counter(), 0
        for step in range(start, opts.steps):
            for group, mult in zip(opt.param_groups, lr_mults):
                group["lr"] = lr_at(step, opts) * mult
            x, y = data.batch(data.train, np.random.default_rng([opts.seed, step]),
                              opts.batch_size, opts.seq_len)
            objective, loss = training_loss(model, x.to(device), y.to(device), opts)
            opt.zero_grad(set_to_none=True)
            objective.backward()
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
