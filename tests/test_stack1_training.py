"""The trainer's stack-1 options: detached memory keys/values, the auxiliary loss on stack 1, the
learning-rate multiplier's parameter groups, and a training run that uses them all."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model
from stagcompile import checkpoint
from stagcompile.config import preset
from stagcompile.errors import StagError
from stagcompile.train import TrainOptions, make_optimizer, stack1_only, train, training_loss

CFG = preset("tiny").replace(num_stacks=2)


def _batch(cfg, seed=0):
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _grads(model, opts: TrainOptions) -> tuple[float, float, dict[str, torch.Tensor | None]]:
    """(objective, model loss, gradient of every parameter) of one training batch."""
    model.zero_grad(set_to_none=True)
    objective, loss = training_loss(model, *_batch(model.cfg), opts)
    objective.backward()
    return objective.item(), loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_detached_keys_or_values_split_the_gradient_into_stack1():
    """The forward is the same; stack 1's gradient through the keys alone plus through the values
    alone is its full gradient; detaching both leaves it none; the memory's own projections and
    norm train the same in every mode."""
    model = make_model(CFG).train()
    runs = {mode: _grads(model, TrainOptions(detach_memory=mode))
            for mode in ("none", "keys", "values", "both")}
    assert len({r[1] for r in runs.values()}) == 1
    grads = {mode: r[2] for mode, r in runs.items()}
    stack1 = [n for n in grads["none"] if n.startswith("trunks.0.")]
    assert stack1
    for n in stack1:
        assert grads["both"][n] is None
        assert grads["keys"][n].abs().max() > 0 and grads["values"][n].abs().max() > 0
        assert not torch.allclose(grads["keys"][n], grads["values"][n])
        torch.testing.assert_close(grads["keys"][n] + grads["values"][n], grads["none"][n],
                                   atol=1e-6, rtol=1e-4)
    shared_path = [n for n in grads["none"] if n.startswith(("crosses.", "trunks.1.",
                                                             "mem_norms.", "norm_f"))]
    for mode in ("keys", "values", "both"):
        for n in shared_path:
            torch.testing.assert_close(grads[mode][n], grads["none"][n], atol=1e-6, rtol=1e-4)


def test_aux_loss_changes_only_stack1_gradients():
    """The auxiliary loss adds weight * (stack 1's next-token loss) to the objective and not to
    the reported loss; it changes the gradients of what stack 1 computes with (its trunk, its
    memory norm, the tied embedding) and nothing of stack 2's."""
    model = make_model(CFG).train()
    obj0, loss0, g0 = _grads(model, TrainOptions())
    obj1, loss1, g1 = _grads(model, TrainOptions(aux_loss=0.25))
    obj2, _, _ = _grads(model, TrainOptions(aux_loss=1.0))
    assert obj0 == loss0 == loss1 and obj1 > loss1
    assert obj2 - loss1 == pytest.approx(4 * (obj1 - loss1), rel=1e-5)
    changed = {n for n in g0 if not torch.allclose(g0[n], g1[n], atol=1e-7, rtol=0)}
    assert changed == ({n for n in g0 if n.startswith("trunks.0.")}
                       | {"mem_norms.0.weight", "embed.weight"})
    for n in set(g0) - changed:
        assert torch.equal(g0[n], g1[n]), n


@pytest.mark.parametrize("shared", [False, True])
def test_stack1_lr_multiplier_groups(shared):
    model = make_model(CFG.replace(shared_weights=shared))
    names = {id(p): n for n, p in model.named_parameters()}
    opt, mults = make_optimizer(model, TrainOptions(stack1_lr_mult=0.3))
    slow = {names[id(p)] for g, m in zip(opt.param_groups, mults) if m == 0.3 for p in g["params"]}
    want = ({"mem_norms.0.weight"} if shared else
            {n for n in names.values() if n.startswith("trunks.0.")} | {"mem_norms.0.weight"})
    assert slow == stack1_only(model) == want
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0
               for p in g["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    default, default_mults = make_optimizer(model, TrainOptions())
    assert default_mults == [1.0, 1.0] and len(default.param_groups) == 2


def test_training_with_every_option(tmp_path):
    """A short run with the gate, per-stack init, aux loss, lr multiplier and detached keys:
    loss goes down, the gates leave zero, the checkpoint reloads with its gates."""
    from pydoc_data.topics import topics
    text = tmp_path / "topics.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    opts = TrainOptions(steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup=2, eval_every=2,
                        eval_batches=2, save_every=4, seed=1, stack1_lr_mult=0.3, aux_loss=0.25,
                        detach_memory="keys", init_depth="stack")
    over = ["d_model=32", "n_heads=2", "n_kv_heads=2", "d_ff=64", "layers_per_stack=1",
            "max_seq_len=32", "cross_gate=true"]
    log = train([text], tmp_path / "run", "tiny", over, opts, vocab_size=300, show_progress=False)
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    model = checkpoint.load(tmp_path / "run")
    assert model.cfg.cross_gate and model.crosses[0].layers[0].gate.abs().item() > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cross_gate"] is True


@pytest.mark.parametrize("options, message", [
    ({"stack1_lr_mult": 0.0}, "--stack1-lr-mult 0.0: must be in (0, 10]"),
    ({"aux_loss": -1.0}, "--aux-loss -1.0: must be >= 0"),
    ({"detach_memory": "queries"}, "--detach-memory queries: expected one of none, keys"),
    ({"init_depth": "layer"}, "--init-depth layer: expected one of model, stack"),
])
def test_bad_options(options, message):
    with pytest.raises(StagError) as err:
        TrainOptions(seq_len=32, **options).check(CFG)
    assert message in str(err.value)


@pytest.mark.parametrize("options", [{"stack1_lr_mult": 0.3}, {"aux_loss": 1.0},
                                     {"detach_memory": "keys"}])
def test_stack1_options_need_two_stacks(options):
    with pytest.raises(StagError, match="needs num_stacks >= 2"):
        TrainOptions(seq_len=32, **options).check(CFG.replace(num_stacks=1))
