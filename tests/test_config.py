"""Configuration: loading, overrides, validation messages that name the key and the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedlora.federation import config as C
from fedlora.federation.config import ConfigError


def test_presets_load_and_validate():
    names = C.preset_names()
    assert {"demo", "flexlora_paper", "flora_paper", "lora_a2_paper", "tiny"} <= set(names)
    for name in names:
        cfg = C.load_preset(name)
        assert cfg.name == name
        assert 1 <= cfg.sampled_per_round() <= cfg.num_train_clients()
    assert C.load_config().name == "demo"  # the default


def test_demo_is_small_and_heterogeneous():
    cfg = C.load_preset("demo")
    assert cfg.model.name == "smollm2" and cfg.heterogeneous()
    assert cfg.rounds <= 5 and cfg.data.num_clients <= 10 and cfg.sampled_per_round() <= 4
    assert cfg.data.partition == "natural"


def test_toml_roundtrip(tmp_path):
    cfg = C.load_preset("lora_a2_paper", {"strategy.options.renormalize": "true"})
    text = C.dumps_toml(cfg)
    path = tmp_path / "c.toml"
    path.write_text(text)
    again = C.load_config(path)
    assert again == cfg
    assert again.strategy.options == {"global_rank": 8, "renormalize": True}
    assert json.loads(C.dumps_json(cfg))["model"]["name"] == "minilm"


def test_extends(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "tiny"\nrounds = 7\n[train]\nlr = 0.01\n')
    cfg = C.load_config(path)
    assert cfg.rounds == 7 and cfg.train.lr == 0.01
    assert cfg.model.name == "tiny-llama" and cfg.train.local_steps == 2  # from the preset


def test_overrides_parse_to_field_types():
    cfg = C.load_preset("tiny")
    cfg = C.apply_overrides(cfg, {"rounds": 5, "strategy.name": "flora"})
    assert cfg.rounds == 5 and cfg.strategy.name == "flora"
    cfg = C.override(cfg, "train.lr", "3e-4")
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    cfg = C.override(cfg, "clients_per_round", "0.5")
    assert cfg.clients_per_round == 0.5 and cfg.sampled_per_round() == 3
    cfg = C.override(cfg, "clients_per_round", "2")
    assert cfg.clients_per_round == 2 and isinstance(cfg.clients_per_round, int)
    cfg = C.override(cfg, "resources.ranks", "1,3,5,7")
    assert cfg.resources.ranks == [1, 3, 5, 7]
    cfg = C.override(cfg, "model.rslora", "yes")
    assert cfg.model.rslora is True
    cfg = C.override(cfg, "data.max_examples_per_client", "none")
    assert cfg.data.max_examples_per_client is None
    with pytest.raises(ConfigError, match="flora has no option 'split'"):
        C.override(cfg, "strategy.options.split", "sqrt")
    cfg = C.override(C.override(cfg, "strategy.name", "flexlora"), "strategy.options.split", "sqrt")
    assert cfg.strategy.options == {"split": "sqrt"}
    cfg = C.override(cfg, "model.name", "123")  # strings stay strings
    assert cfg.model.name == "123"


def _error(fn, *args) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    return str(e.value)


def test_unknown_key_suggests_the_closest():
    msg = _error(C.load_config, {"rounds": 2, "trian": {"lr": 1e-3}})
    assert "'trian'" in msg and "train" in msg
    msg = _error(C.load_config, {"train": {"learning_rat": 1e-3}})
    assert "train.learning_rat" in msg
    msg = _error(C.load_config, {"train": {"local_step": 3}})
    assert "train.local_steps" in msg
    msg = _error(C.load_config, {"local_steps": 3})  # a section's key at top level
    assert "train.local_steps" in msg
    msg = _error(C.override, C.load_preset("tiny"), "strategy.nme", "flora")
    assert "strategy.name" in msg


def test_wrong_types_name_the_key():
    msg = _error(C.load_config, {"rounds": "three"})
    assert "rounds" in msg and "int" in msg
    msg = _error(C.load_config, {"model": {"rslora": 1}})
    assert "model.rslora" in msg and "bool" in msg
    msg = _error(C.load_config, {"resources": {"ranks": [4, "x"]}})
    assert "resources.ranks[1]" in msg
    msg = _error(C.load_config, {"model": {"kind": "casual"}})
    assert "model.kind" in msg and "'causal'" in msg
    msg = _error(C.load_config, {"data": {"partition": "dirichlett"}})
    assert "data.partition" in msg and "dirichlet" in msg


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"clients_per_round": 9, "data.num_clients": 8}, "clients_per_round"),
        ({"clients_per_round": 1.5}, "clients_per_round"),
        ({"clients_per_round": 0.0}, "clients_per_round"),
        ({"resources.ranks": [4, 0]}, "resources.ranks[1]"),
        (
            {"resources.homogeneous_rank": 0, "resources.distribution": "homogeneous"},
            "resources.homogeneous_rank",
        ),
        ({"model.alpha": 0.0}, "model.alpha"),
        ({"model.alpha": -1}, "model.alpha"),
        ({"data.dirichlet_alpha": 0}, "data.dirichlet_alpha"),
        ({"data.test_fraction": 1.0}, "data.test_fraction"),
        ({"data.test_fraction": 0}, "data.test_fraction"),
        ({"data.heldout_clients": 1.0}, "data.heldout_clients"),
        ({"rounds": 0}, "rounds"),
        ({"train.local_steps": 0}, "train.local_steps"),
        ({"eval.metrics": ["loss", "rouge"]}, "eval.metrics[1]"),
        ({"strategy.name": "flexlorra"}, "strategy.name"),
        ({"strategy.options": {"splitt": "sqrt"}}, "strategy.options.splitt"),
        ({"resources.distribution": "custom"}, "resources.custom_share"),
        ({"resources.ranks": [1, 2, 3]}, "resources.ranks"),
        ({"resources.homogeneous_rank": 2}, "resources.homogeneous_rank"),
        ({"resources.rank_cap_fraction": 2.0}, "resources.rank_cap_fraction"),
        ({"data.heldout_tasks": ["nope"]}, "data.heldout_tasks"),
    ],
)
def test_impossible_values_name_the_key(overrides, key):
    msg = _error(C.load_preset, "tiny", overrides)
    assert key in msg


def test_fix_is_suggested():
    msg = _error(C.load_preset, "tiny", {"strategy.name": "flexlorra"})
    assert "did you mean 'flexlora'" in msg
    msg = _error(C.load_preset, "tiny", {"clients_per_round": 9})
    assert "lower it" in msg


@pytest.mark.parametrize("name", ["fedit", "fedex_lora"])
def test_homogeneous_strategy_with_heterogeneous_ranks(name):
    msg = _error(C.load_preset, "tiny", {"strategy.name": name})
    assert "strategy.name" in msg and "resources.distribution" in msg and "homogeneous" in msg
    ok = C.load_preset(
        "tiny",
        {
            "strategy.name": name,
            "resources.distribution": "homogeneous",
            "resources.homogeneous_rank": 4,
        },
    )
    assert not ok.heterogeneous()


def test_many_problems_reported_together():
    msg = _error(C.load_preset, "tiny", {"rounds": 0, "model.alpha": 0})
    assert "2 problems" in msg and "rounds" in msg and "model.alpha" in msg


def test_unknown_preset_suggests():
    assert "'demo'" in _error(C.load_preset, "dmeo")
    assert "'tiny'" in _error(C.load_config, "tinyy")


def test_diff_names_keys():
    a = C.load_preset("tiny")
    b = C.apply_overrides(a, {"train.lr": 0.5, "output_dir": "elsewhere"})
    assert C.diff(a, b) == ["train.lr"]


def test_validation_is_light():
    # "light": a bad configuration is refused before transformers/peft are imported (and so
    # before any model loads); its speed follows from that and is not timed here
    code = (
        "import sys\n"
        "from fedlora.federation.config import load_preset, ConfigError\n"
        "try:\n    load_preset('demo', {'strategy.name': 'fedit'})\nexcept ConfigError:\n"
        "    pass\nelse:\n    raise SystemExit('no error')\n"
        "assert 'transformers' not in sys.modules and 'peft' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_optional_key_defaults_to_none():
    # apply_overrides and the run's config.toml leave None values out; that is lossless only
    # while no optional key has another default (else `--key none` would silently revert)
    import dataclasses
    import typing

    from fedlora.federation.config import ExperimentConfig

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
            elif type(None) in typing.get_args(tp):
                yield f"{prefix}{f.name}", f.default

    bad = [k for k, d in walk(ExperimentConfig) if d is not None]
    assert not bad, f"optional keys with a non-None default: {bad}"


def test_grad_clip_none_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="train.grad_clip"):
        C.override(C.load_preset("tiny"), "train.grad_clip", "none")
    assert C.override(C.load_preset("tiny"), "train.grad_clip", "0").train.grad_clip == 0
