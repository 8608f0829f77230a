"""Quality of a weight-quantized bundle against the fp32 reference (`stagcompile validate`).

A quantized bundle's outputs differ from the fp32 reference by design, so instead of per-element
tolerances it must meet two thresholds (per bit width, overridable on the command line):

    token agreement   teacher-forced: at every position of the golden trace (prompt and decoded
                      tokens) the bundle is fed the reference's tokens and its greedy choice must
                      equal the reference's in at least `agreement` of the positions
    bits per byte     on a text (`validate --text FILE`): the bundle's bits per byte may exceed
                      the fp32 reference bundle's (`--reference`, the same checkpoint exported
                      without --quant) by at most `bpb_rise` (relative)

Bits per byte: the text is tokenized with the bundle's tokenizer and cut into rows of
`row_tokens` tokens; every token after a row's first is predicted (teacher-forced decode steps
through the runtime) and its -log2 p summed; the bytes are the UTF-8 bytes of the predicted
tokens' text (from the tokenizer's offsets). Needs no torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stagcompile.errors import StagError

THRESHOLDS = {8: {"agreement": 0.9, "bpb_rise": 0.01},
              4: {"agreement": 0.7, "bpb_rise": 0.02}}
# Measured on the demo checkpoint (README): int8 agrees on 30/30 trace positions (ort graphs) and
# 28/30 (portable), int4 on 25/30 and 27/30; the trace's prompts are random tokens, where the model's
# choices are near ties, so agreement is the coarse check and bits per byte the sharp one.
ROW_TOKENS = 128


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def teacher_forced(gen, prompt: np.ndarray, targets: np.ndarray, visit) -> None:
    """Prefill `prompt` [B, P], then step through `targets` [B, T]: `visit(t, logits)` sees the
    logits [B, vocab] that predict targets[:, t] (the step is fed targets[:, t - 1])."""
    logits = gen.prefill(prompt)
    for t in range(targets.shape[1]):
        if t:
            logits = gen.step(targets[:, t - 1])
        visit(t, logits)


def agreement(bundle, trace, backend: str, schedule: str, flavour: str | None,
              minimum: float) -> dict:
    """Teacher-forced greedy agreement with the reference over the golden trace (a `tokens`
    entry of the report): the bundle reads the trace's prompt and tokens one position at a time
    and its choice at every position is compared with the reference's (the argmax of the
    recorded prefill logits inside the prompt, the trace's next token after it)."""
    from stagcompile.runtime.generator import Generator, make_backend
    prefill = trace.data[f"s0/{bundle.num_stacks}/logits"]               # [B, P, vocab]
    fed = np.concatenate([trace.prompt, trace.tokens[:, :-1]], axis=1)   # [B, P + T - 1]
    want = np.concatenate([prefill.argmax(-1), trace.tokens[:, 1:]], axis=1)
    got = np.zeros_like(want)
    gen = Generator(bundle, make_backend(bundle, backend, schedule, flavour=flavour), schedule)

    def visit(t, logits):
        got[:, t] = logits.argmax(axis=-1)
    try:
        teacher_forced(gen, fed[:, :1], fed[:, 1:], visit)
        visit(fed.shape[1] - 1, gen.step(fed[:, -1]))
    finally:
        gen.close()
    share = float((got == want).mean())
    out = {"backend": backend if flavour is None else f"{backend} ({flavour})",
           "schedule": schedule, "steps": int(want.shape[1]), "agreement": share,
           "minimum": minimum, "passed": share >= minimum,
           "note": f"teacher-forced agreement {share:.1%} of {want.size} positions "
                   f"(minimum {minimum:.0%})"}
    if not out["passed"]:
        row, step = map(int, np.argwhere(got != want)[0])
        out["note"] += f"; first difference: row {row}, position {step}"
    return out


def text_rows(tokenizer, text: str, row_tokens: int) -> tuple[np.ndarray, int]:
    """Token rows [R, row_tokens] and the UTF-8 bytes of every predicted token's text."""
    enc = tokenizer.encode(text)
    n = len(enc.ids) // row_tokens
    if n == 0:
        raise StagError(f"the text has {len(enc.ids)} tokens; bits per byte needs at least "
                        f"{row_tokens}")
    rows = np.array(enc.ids[:n * row_tokens], np.int64).reshape(n, row_tokens)  # [R, L]
    spans = [(enc.offsets[r * row_tokens + 1][0], enc.offsets[(r + 1) * row_tokens - 1][1])
             for r in range(n)]
    return rows, sum(len(text[a:b].encode("utf-8")) for a, b in spans)


def bits_per_byte(bundle_dir: Path, text: str, flavour: str | None = None,
                  row_tokens: int = ROW_TOKENS) -> dict:
    """Bits per byte of a bundle's ONNX Runtime graphs on `text` (all cores, sequential)."""
    from stagcompile.runtime.generator import Generator
    gen = Generator.load(bundle_dir, schedule="sequential", flavour=flavour, verify=False)
    try:
        if gen.tokenizer is None:
            raise StagError(f"{bundle_dir}: the bundle has no tokenizer.json; bits per byte "
                            "needs one")
        cap = gen.bundle.config["max_seq_len"]
        rows, n_bytes = text_rows(gen.tokenizer, text, min(row_tokens, cap))
        batch = gen.bundle.manifest["max_batch"]
        nats = 0.0
        for start in range(0, len(rows), batch):
            ids = rows[start:start + batch]

            def visit(t, logits, ids=ids):
                nonlocal nats
                nats -= _log_softmax(logits)[np.arange(len(ids)), ids[:, t + 1]].sum()
            teacher_forced(gen, ids[:, :1], ids[:, 1:], visit)
    finally:
        gen.close()
    return {"bundle": str(bundle_dir), "flavour": gen.scheduler.backend.flavour,
            "bpb": float(nats / math.log(2) / n_bytes), "tokens": int(rows[:, 1:].size),
            "bytes": n_bytes}


def load_reference(bundle, reference: Path | None, text: Path | None):
    """The fp32 reference bundle for `--text` (checked before anything runs), or None."""
    from stagcompile.runtime.bundle import Bundle, BundleError
    if text is None:
        if reference is not None:
            raise StagError("--reference: only used with --text FILE (bits per byte)")
        return None
    if reference is None:
        if bundle.quant:
            raise StagError(f"--text on {bundle.root} (weights {bundle.quant['weights']}): give "
                            "--reference FP32_BUNDLE, the same checkpoint exported without "
                            "--quant, to compare bits per byte with")
        return None
    try:
        ref = Bundle.load(reference)
    except BundleError as exc:
        raise StagError(f"--reference: {exc}") from None
    if ref.quant:
        raise StagError(f"--reference {reference}: its weights are quantized "
                        f"({ref.quant['weights']}); give a bundle exported without --quant")
    diff = sorted(k for k in set(ref.config) | set(bundle.config)
                  if k != "max_seq_len" and ref.config.get(k) != bundle.config.get(k))
    if diff:
        raise StagError(f"--reference {reference}: config differs from {bundle.root} in "
                        f"{', '.join(diff)} (expected the same checkpoint)")
    return ref


def text_check(bundle, text_path: Path, reference, max_rise: float) -> dict:
    """Bits per byte of every ONNX Runtime flavour of `bundle` on the text, against the
    reference bundle's (when given)."""
    from stagcompile.tokenizer import read_text
    text = read_text(text_path)
    ref = bits_per_byte(reference.root, text) if reference is not None else None
    results = []
    for flavour in (f for f in ("ort", "portable") if f in bundle.flavours):
        r = bits_per_byte(bundle.root, text, flavour)
        r["rise"] = r["bpb"] / ref["bpb"] - 1 if ref else None
        r["passed"] = ref is None or r["rise"] <= max_rise
        results.append(r)
    return {"text": str(text_path), "reference": ref, "max_rise": max_rise, "results": results,
            "passed": all(r["passed"] for r in results)}
