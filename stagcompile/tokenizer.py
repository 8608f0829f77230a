"""Text files and the byte-level BPE tokenizer (the `tokenizers` package).

`read_texts` reads .txt and .txt.xz files (UTF-8) with clear errors for missing, unreadable or
empty files. `train_tokenizer` trains a byte-level BPE (every byte is in the base alphabet, so any
text round-trips) with one special token, `<|endoftext|>`, placed between documents.
"""

from __future__ import annotations

import lzma
from pathlib import Path

from stagcompile.errors import StagError

EOT = "<|endoftext|>"
MIN_VOCAB = 257         # the 256 bytes + EOT


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise StagError(f"{path}: file not found (expected a .txt or .txt.xz text file)")
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise StagError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    if not text.strip():
        raise StagError(f"{path}: the file is empty (expected training text)")
    return text


def read_texts(paths: list[Path]) -> str:
    if not paths:
        raise StagError("no text files given")
    return "\n\n".join(read_text(p) for p in paths)


def train_tokenizer(text: str, vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise StagError(f"--vocab-size {vocab_size}: must be >= {MIN_VOCAB} (256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    docs = [d for d in text.split("\n\n") if d.strip()]
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:      # tokenizers raises a bare Exception on bad files
        raise StagError(f"{path}: not a tokenizers JSON file ({exc})") from None


def encode(tok, text: str, chunk: int = 1 << 16):
    """Token ids (numpy int32) of `text`, exactly (no tokens added): the text is cut at
    paragraph breaks into ~64 KiB pieces that are encoded in parallel."""
    import numpy as np
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + chunk)
        end = len(text) if end < 0 else end + 2
        pieces.append(text[start:end])
        start = end
    ids = [np.array(e.ids, dtype=np.int32) for e in tok.encode_batch(pieces)]
    return np.concatenate(ids) if ids else np.zeros(0, np.int32)
