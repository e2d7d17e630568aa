"""Partial config sections: a key given in YAML or with --set changes that key only; every other
key of its section keeps the run's default (RunConfig's, e.g. LoRA rank 8 / alpha 16), not the
section class's own (LoraConfig's rank 16 / alpha 32)."""

import dataclasses

import pytest
import yaml

from arca_jax import config, configlib


def _sections():
    run = config.RunConfig()
    return [(f.name, getattr(run, f.name)) for f in dataclasses.fields(run)]


@pytest.mark.parametrize("section", [name for name, _ in _sections()])
def test_one_key_override_keeps_the_run_defaults(section):
    run = config.RunConfig()
    default = getattr(run, section)
    plain = configlib.to_dict(default)
    for field in plain:
        # the key set to its own default value: the whole config must be the default one
        value = yaml.safe_dump(plain[field], default_flow_style=True).strip()
        if value.endswith("..."):  # PyYAML closes a top-level scalar document with "..."
            value = value[:-3].strip()
        got = config.load(None, [f"{section}.{field}={value}"])
        assert got == run, (section, field, getattr(got, section), default)


def test_partial_yaml_section_and_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  rank: 4\ngrpo:\n  sharpening: 2.0\n")
    cfg = config.load(str(path), ["lora.dropout=0.1"])
    run = config.RunConfig()
    assert (cfg.lora.rank, cfg.lora.dropout, cfg.grpo.sharpening) == (4, 0.1, 2.0)
    assert cfg.lora.alpha == run.lora.alpha == 16.0 != config.LoraConfig().alpha
    assert cfg.lora.targets == run.lora.targets
    assert dataclasses.replace(cfg.grpo, sharpening=run.grpo.sharpening) == run.grpo
