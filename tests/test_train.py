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


class Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_state_is_safetensors_and_json_never_pickle(tmp_path, text_file):
    import pickle

    from safetensors.torch import load_file

    out = tmp_path / "run"
    train([text_file], out, "tiny", OVERRIDES, opts(1), vocab_size=300, show_progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert "train_state.json" in names and "train_state.safetensors" in names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".bin"))]
    meta = json.loads((out / "train_state.json").read_text())
    assert meta["step"] == 1 and meta["options"]["seq_len"] == 32
    assert "state.0.exp_avg" in load_file(str(out / "train_state.safetensors"))
    # a state from an older stagcompile (a pickle) is refused without being unpickled
    marker = tmp_path / "pwned"
    (out / "train_state.pt").write_bytes(pickle.dumps(Payload(marker)))
    for name in ("train_state.json", "train_state.safetensors"):
        (out / name).unlink()
    with pytest.raises(StagError, match="train_state.pt: a pickled trainer state.*not loaded"):
        train([text_file], out, "tiny", OVERRIDES, opts(2), resume=True, show_progress=False)
    assert not marker.exists()


def test_corrupt_resume_state_is_named(tmp_path, text_file):
    out = tmp_path / "run"
    train([text_file], out, "tiny", OVERRIDES, opts(1), vocab_size=300, show_progress=False)
    state = out / "train_state.json"
    good = state.read_text()
    for text, match in [("{oops", "train_state.json: not a readable JSON file"),
                        (good.replace('"step": 1', '"step": -1'), "field step should be"),
                        (good.replace('"format": "stagcompile-train-state"', '"format": "x"'),
                         "not a stagcompile trainer state")]:
        state.write_text(text)
        with pytest.raises(StagError, match=match):
            train([text_file], out, "tiny", OVERRIDES, opts(2), resume=True, show_progress=False)
    state.write_text(good)
    (out / "train_log.json").write_text("[{")
    with pytest.raises(StagError, match="train_log.json: not a readable JSON file"):
        train([text_file], out, "tiny", OVERRIDES, opts(2), resume=True, show_progress=False)
    (out / "train_state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(StagError, match="train_state.safetensors: not a readable safetensors"):
        train([text_file], out, "tiny", OVERRIDES, opts(2), resume=True, show_progress=False)


def test_demo_store_reads_the_options_and_never_replaces_its_run(tmp_path, text_file):
    from stagcompile.demo.__main__ import main as store_demo
    run = tmp_path / "run"
    train([text_file], run, "tiny", OVERRIDES, opts(1), vocab_size=300, show_progress=False)
    store_demo(run, tmp_path / "demo")
    card = (tmp_path / "demo" / "MODEL_CARD.md").read_text()
    assert "--batch-size 4 --seq-len 32 --lr 0.01 --warmup 2" in card
    assert not (tmp_path / "demo" / "train_state.json").exists()
    for dest in (run, tmp_path):
        with pytest.raises(StagError, match="(is|contains) the input"):
            store_demo(run, dest)
    assert (run / "train_state.json").is_file()


def test_preset_defaults_fit_the_tokenizer_and_the_model(tmp_path, text_file):
    """`train --preset tiny` with no --vocab-size or --seq-len: tiny's 97-token vocabulary is
    raised to the byte-level minimum, the sequence to its max_seq_len (64)."""
    small = tmp_path / "small.txt"
    small.write_text(text_file.read_text()[:60000])
    quick = TrainOptions(steps=1, batch_size=2, eval_every=1, eval_batches=1)
    log = train([small], tmp_path / "a", "tiny", [], quick, show_progress=False)
    assert log[-1]["step"] == 1
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["vocab_size"] == 257
    assert json.loads((tmp_path / "a" / "train_state.json").read_text())["options"]["seq_len"] == 64
    with pytest.raises(StagError, match="--set vocab_size=100: a byte-level BPE needs >= 257"):
        train([small], tmp_path / "b", "tiny", ["vocab_size=100"], quick, show_progress=False)
    with pytest.raises(StagError, match="--seed -5: must be >= 0"):
        train([small], tmp_path / "b", "tiny", [], TrainOptions(seed=-5), show_progress=False)
