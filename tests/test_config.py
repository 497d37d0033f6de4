import json

import pytest

from ccad.config import BankConfig, ConfigError, DetectorConfig, DiffusionConfig
from ccad.registry import VARIANTS, UnknownVariant, available_variants, default_config, get_variant


def test_detector_config_json_round_trip(tmp_path):
    cfg = DetectorConfig(variant="ccad-v", image_size=128, bank=BankConfig(layers=(1, 2, 3), size=150),
                         diffusion=DiffusionConfig(start_step=200, steps=5))
    cfg.save(tmp_path / "config.json")
    back = DetectorConfig.load(tmp_path / "config.json")
    assert back == cfg
    assert back.bank.layers == (1, 2, 3)  # lists in JSON come back as tuples


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="bank.size"):
        DetectorConfig(bank=BankConfig(size=5000)).validate()
    with pytest.raises(ConfigError, match="diffusion.steps"):
        DetectorConfig(diffusion=DiffusionConfig(start_step=10, steps=20)).validate()
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"variant": "patchcore", "bank": {"bogus": 1}}))
    with pytest.raises(ConfigError, match=r"config.json.*bank.*bogus"):
        DetectorConfig.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DetectorConfig.load(bad)
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(ConfigError, match="newer"):
        DetectorConfig.load(bad)


def test_registry_lists_published_variants_and_refuses_planned_ones():
    assert {"patchcore", "ccad-v", "ccad-c", "ccad-f", "d3ad", "deco-diff", "glad"} <= set(VARIANTS)
    assert set(available_variants()) >= {"patchcore", "ccad-v"}
    assert default_config("patchcore").patchcore is not None
    cfg = default_config("ccad-v", image_size=64)
    assert cfg.image_size == 64 and cfg.diffusion.start_step == 250 and cfg.diffusion.steps == 10
    assert cfg.diffusion.guidance == 2.0 and cfg.diffusion.beta_end == 0.02  # DDAD's published defaults
    with pytest.raises(UnknownVariant, match="planned"):
        default_config("ccad-f")
    with pytest.raises(UnknownVariant, match="known: patchcore"):
        get_variant("nope")
