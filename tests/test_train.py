"""The trainer: loss goes down on a small shipped text, resume is exact, the tokenizer
round-trips, and bad input gets clear errors."""

from __future__ import annotations

import json

import pytest

from stagcompile.errors import StagError
from stagcompile.tokenizer import encode, train_tokenizer
from stagcompile.train import TrainOptions, train


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 300 KB of English from the standard library's pydoc topics."""
    from pydoc_data.topics import topics
    path = tmp_path_factory.mktemp("text") / "topics.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return path


OVERRIDES = ["d_model=32", "n_heads=2", "n_kv_heads=2", "d_ff=64", "layers_per_stack=1",
             "max_seq_len=32"]


def opts(steps):
    return TrainOptions(steps=steps, batch_size=4, seq_len=32, lr=1e-2, warmup=2, eval_every=1,
                        eval_batches=2, save_every=3, seed=1)


def test_tokenizer_round_trips(text_file):
    text = text_file.read_text()[:50000]
    tok = train_tokenizer(text, 300)
    assert tok.get_vocab_size() == 300
    sample = "Résumé: naïve café — ∑ x² ≠ 0\n\n\tdef f(): return 'ok'  "
    assert tok.decode(tok.encode(sample).ids) == sample
    ids = encode(tok, text)
    assert tok.decode(ids.tolist()) == text


def test_loss_goes_down_and_resume_is_exact(tmp_path, text_file):
    full = train([text_file], tmp_path / "a", "tiny", OVERRIDES, opts(6), vocab_size=300,
                 show_progress=False)
    assert full[-1]["val_loss"] < full[0]["val_loss"]
    assert [e["step"] for e in full] == [1, 2, 3, 4, 5, 6]
    assert all(e["val_bpb"] > 0 for e in full)
    part = train([text_file], tmp_path / "b", "tiny", OVERRIDES, opts(3), vocab_size=300,
                 show_progress=False)
    resumed = train([text_file], tmp_path / "b", "tiny", OVERRIDES, opts(6), resume=True,
                    show_progress=False)
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
    assert part[-1]["loss"] == full[2]["loss"]
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["vocab_size"] == 300 and (tmp_path / "b" / "tokenizer.json").is_file()


def test_bad_input(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(StagError, match="empty.txt: the file is empty"):
        train([empty], tmp_path / "x", "tiny", OVERRIDES, opts(2), show_progress=False)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(StagError, match="bin.txt: cannot read it as UTF-8 text"):
        train([binary], tmp_path / "x", "tiny", OVERRIDES, opts(2), show_progress=False)
    with pytest.raises(StagError, match="missing.txt: file not found"):
        train([tmp_path / "missing.txt"], tmp_path / "x", "tiny", OVERRIDES, opts(2))
    long = TrainOptions(steps=2, seq_len=64)
    with pytest.raises(StagError, match="--seq-len 64: above the model's max_seq_len=32"):
        train([text_file], tmp_path / "x", "tiny", OVERRIDES, long, vocab_size=300,
              show_progress=False)
    train([text_file], tmp_path / "c", "tiny", OVERRIDES, opts(1), vocab_size=300,
          show_progress=False)
    with pytest.raises(StagError, match="config differs.*d_model saved 32 vs 64"):
        train([text_file], tmp_path / "c", "tiny", OVERRIDES + ["d_model=64"], opts(2),
              resume=True, show_progress=False)
    with pytest.raises(StagError, match="already exists; pass --resume"):
        train([text_file], tmp_path / "c", "tiny", OVERRIDES, opts(2), show_progress=False)
