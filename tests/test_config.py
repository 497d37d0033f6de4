import json

import pytest

from ccad.config import BankConfig, ConfigError, DiffusionConfig, set_option
from ccad.detector_config import DetectorConfig
from ccad.methods import UnknownVariant, get_method, method_names


def ccad_v_config(**diffusion):
    m = get_method("ccad-v").default_config("tiny")
    m.diffusion = DiffusionConfig(**diffusion)
    return m


def test_detector_config_json_round_trip(tmp_path):
    cfg = DetectorConfig(variant="ccad-v", image_size=128, bank=BankConfig(layers=(1, 2, 3), size=150),
                         method=ccad_v_config(start_step=200, steps=5))
    cfg.save(tmp_path / "config.json")
    back = DetectorConfig.load(tmp_path / "config.json")
    assert back == cfg
    assert back.bank.layers == (1, 2, 3)  # lists in JSON come back as tuples
    assert back.method.diffusion.start_step == 200 and back.method.preset == "tiny"


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="bank.size"):
        DetectorConfig(bank=BankConfig(size=5000)).validate()
    with pytest.raises(ConfigError, match="diffusion.steps"):
        DetectorConfig(variant="ccad-v", method=ccad_v_config(start_step=10, steps=20)).validate()
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"variant": "patchcore", "bank": {"bogus": 1}}))
    with pytest.raises(ConfigError, match=r"config.json.*bank.*bogus"):
        DetectorConfig.load(bad)
    bad.write_text(json.dumps({"variant": "ccad-v", "method": {"diffusion": {"strat": "x"}}}))
    with pytest.raises(ConfigError, match=r"method.diffusion.*strat"):
        DetectorConfig.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DetectorConfig.load(bad)
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(ConfigError, match="newer"):
        DetectorConfig.load(bad)


def test_version_1_configs_are_migrated(tmp_path):
    old = {"variant": "ccad-v", "image_size": 64, "bank": {"size": 100}, "patchcore": None,
           "denoiser": {"sample_size": 64, "bank_dim": 8}, "diffusion": {"start_step": 200, "steps": 5},
           "scoring": {}, "train": {"steps": 10, "preview_start_step": 250}, "version": 1}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = DetectorConfig.load(tmp_path / "config.json")
    assert cfg.version == 2 and cfg.method.diffusion.start_step == 200
    assert cfg.method.denoiser.bank_dim == 8 and cfg.train.steps == 10
    pc = DetectorConfig.from_dict({"variant": "patchcore", "patchcore": {"ratio": 0.05, "k": 1}, "version": 1})
    assert pc.method.ratio == 0.05


def test_options_are_typed_and_unknown_ones_are_named():
    m = get_method("ccad-v").default_config()
    set_option(m, "diffusion.start_step", "200")
    set_option(m, "diffusion.guidance", "1.5")
    assert m.diffusion.start_step == 200 and m.diffusion.guidance == 1.5
    with pytest.raises(ConfigError, match="unknown field 'start'.*start_step"):
        set_option(m, "diffusion.start", "3")
    with pytest.raises(ConfigError, match="cannot read 'abc' as int"):
        set_option(m, "diffusion.steps", "abc")


def test_registry_lists_available_and_refuses_unknown_variants():
    assert {"patchcore", "ccad-v"} <= set(method_names())
    assert {"ccad-c", "ccad-f", "deco-diff", "d3ad", "glad"} <= set(method_names())
    assert get_method("patchcore").default_config().ratio == 0.01
    cfg = get_method("ccad-v").default_config()
    assert cfg.diffusion.start_step == 250 and cfg.diffusion.steps == 10
    assert cfg.diffusion.guidance == 2.0 and cfg.diffusion.beta_end == 0.02  # DDAD's published defaults
    with pytest.raises(UnknownVariant, match="available: patchcore"):
        get_method("nope")


def test_the_baseline_heads_the_method_list_whatever_module_is_imported_first():
    """The app's default and every list start with PatchCore and follow ``_builtin``'s import order
    (a built-in method is its module plus one line there), even when a method module is imported
    before the registry is first read."""
    import subprocess
    import sys

    code = ("import ccad.methods.feat_diff, ccad.methods.glad\n"
            "from ccad.methods import method_names\n"
            "print(','.join(method_names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = out.strip().split(",")
    assert names[0] == "patchcore"
    assert names.index("glad") < names.index("feat-diff") and names.index("d3ad") < names.index("glad")


def test_an_unknown_reconstruction_strategy_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match="diffusion.strategy.*'ddad'.*'nope'"):
        DetectorConfig.from_dict({"variant": "ccad-v", "method": {"diffusion": {"strategy": "nope"}}})
    cfg = DetectorConfig.from_dict({"variant": "ccad-v", "method": {"diffusion": {"strategy": "ddad"}}})
    assert cfg.method.diffusion.strategy == "ddad"
