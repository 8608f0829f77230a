"""StagConfig: presets, JSON round trip, overrides, and one clear message per invalid value."""

from __future__ import annotations

import pytest

from stagcompile.config import PRESETS, ConfigError, StagConfig, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip(name):
    cfg = preset(name)
    assert StagConfig.from_json(cfg.to_json()) == cfg
    assert cfg.head_dim * cfg.n_heads == cfg.d_model


def test_small_and_base_sizes():
    small, base = preset("small"), preset("base")
    assert (small.d_model, small.num_stacks, small.layers_per_stack) == (512, 2, 4)
    assert base.d_model == 768 and base.num_layers == 12


@pytest.mark.parametrize("changes, message", [
    ({"d_model": 30}, "d_model=30: must be divisible by n_heads=4"),
    ({"n_kv_heads": 3}, "n_kv_heads=3: must divide n_heads=4"),
    ({"num_stacks": 1, "shared_weights": True}, "shared_weights=true: needs num_stacks >= 2"),
    ({"cross_window": 0}, "cross_window=0: must be null (unbounded) or an integer >= 1"),
    ({"self_window": -2}, "self_window=-2: must be null"),
    ({"num_stacks": 0}, "num_stacks=0: must be >= 1"),
    ({"vocab_size": "97"}, "vocab_size='97': expected an integer, got str"),
    ({"shared_weights": 1}, "shared_weights=1: expected true or false, got int"),
    ({"d_ff": 64.0}, "d_ff=64.0: expected an integer, got float"),
    ({"n_heads": True}, "n_heads=True: expected an integer, got bool"),
    ({"norm_eps": 2.0}, "norm_eps=2.0: must be in (0, 1)"),
    ({"num_stacks": 1, "cross_window": 4}, "cross_window=4: needs num_stacks >= 2"),
    ({"rope_theta": float("nan")}, "rope_theta=nan: must be a finite number"),
    ({"rope_theta": float("inf")}, "rope_theta=inf: must be a finite number"),
    ({"rope_theta": 10**400}, "must be a finite number"),
    ({"norm_eps": float("nan")}, "norm_eps=nan: must be a finite number"),
    ({"vocab_size": 10**12}, "vocab_size=1000000000000: must be <= 2147483647"),
    ({"max_seq_len": 2**63}, "max_seq_len=9223372036854775808: must be <= 2147483647"),
    ({"num_stacks": 1, "cross_gate": True}, "cross_gate=true: needs num_stacks >= 2"),
    ({"cross_gate": 1}, "cross_gate=1: expected true or false, got int"),
])
def test_invalid_values_are_named(changes, message):
    with pytest.raises(ConfigError) as err:
        preset("tiny").replace(**changes)
    assert message in str(err.value)


def test_unknown_and_missing_json_keys():
    with pytest.raises(ConfigError, match="unknown config field.*colour"):
        StagConfig.from_dict(preset("tiny").to_dict() | {"colour": "red"})
    data = preset("tiny").to_dict()
    del data["d_model"]
    with pytest.raises(ConfigError, match="missing config field.*d_model"):
        StagConfig.from_dict(data)
    with pytest.raises(ConfigError, match="not valid JSON"):
        StagConfig.from_json("{oops", "x.json")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        StagConfig.from_json("[1, 2]")
    text = preset("tiny").to_json().replace('"rope_theta": 10000.0', '"rope_theta": NaN')
    with pytest.raises(ConfigError, match="x.json: config field rope_theta=nan: must be a finite"):
        StagConfig.from_json(text, "x.json")


def test_overrides_parse_with_field_types():
    cfg = preset("tiny").with_overrides(["num_stacks=3", "cross_window=4", "shared_weights=true",
                                         "self_window=none", "rope_theta=500000"])
    assert (cfg.num_stacks, cfg.cross_window, cfg.shared_weights, cfg.self_window) == (3, 4, True, None)
    assert cfg.rope_theta == 500000.0
    with pytest.raises(ConfigError, match="unknown config field 'depth'"):
        preset("tiny").with_overrides(["depth=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        preset("tiny").with_overrides(["num_stacks"])
    with pytest.raises(ConfigError, match="num_stacks=two: expected an integer"):
        preset("tiny").with_overrides(["num_stacks=two"])
    with pytest.raises(ConfigError, match="rope_theta=inf: must be a finite number"):
        preset("tiny").with_overrides(["rope_theta=inf"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; available: tiny, demo"):
        preset("huge")


def test_capacities_and_unbounded_length():
    cfg = preset("tiny").replace(self_window=8, cross_window=4)
    assert (cfg.self_capacity(), cfg.cross_capacity()) == (8, 4)
    assert cfg.unbounded_length
    assert not preset("tiny").unbounded_length
    assert preset("tiny").replace(num_stacks=1, self_window=4).unbounded_length
