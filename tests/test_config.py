"""Settings: the shipped YAML, validation, overrides."""

import dataclasses

import pytest

from pipeline.config import DEFAULT_CONFIG_PATH, Config, ConfigError, config_from_dict, load_config


def test_default_yaml_lists_every_setting_with_the_code_defaults():
    import yaml

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    defaults = Config().to_dict()
    assert set(raw) == set(defaults)
    for section, values in defaults.items():
        assert set(raw[section]) == set(values), section
    assert load_config(DEFAULT_CONFIG_PATH) == Config()


@pytest.mark.parametrize(
    "data, key",
    [
        ({"model": {"archh": "resnet18"}}, "model.archh"),
        ({"modell": {}}, "modell"),
        ({"model": {"arch": "vgg99"}}, "model.arch"),
        ({"model": {"batch_size": -1}}, "model.batch_size"),
        ({"model": {"batch_size": "8"}}, "model.batch_size"),
        ({"tiling": {"bands": [1, 2]}}, "tiling.bands"),
        ({"tiling": {"scale": [10, 5]}}, "tiling.scale"),
        ({"read": {"chunk_px": 1000}}, "read.chunk_px"),
        ({"store": {"dtype": "int8"}}, "store.dtype"),
        ({"cluster": {"scheduler": "nonsense"}}, "cluster.scheduler"),
    ],
)
def test_bad_settings_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(data)


def test_yaml_lists_become_tuples_and_override_wins(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tiling:\n  bands: [4, 1, 2]\n  scale: [0, 4095]\nmodel:\n  batch_size: 8\n")
    cfg = load_config(p)
    assert cfg.tiling.bands == (4, 1, 2) and cfg.tiling.scale == (0.0, 4095.0)
    cfg2 = cfg.override(**{"model.batch_size": 32, "model.device": None})
    assert cfg2.model.batch_size == 32 and cfg2.model.device == "auto"
    assert dataclasses.replace(cfg2.model, batch_size=8) == cfg.model
    with pytest.raises(ConfigError, match="read.chunk_px"):
        cfg.override(**{"read.chunk_px": 300})


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
