"""Reading original-format config YAMLs into typed, frozen dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.config import CLIP_VIT_L14_TEXT, ConfigError, load_config, parse_config
from tests.reference import TINY_CONFIG

FULL_CONFIG = Path(__file__).parents[1] / "configs" / "v1-inference.yaml"


def test_full_config_is_sd_v1() -> None:
    config = load_config(FULL_CONFIG)
    assert (config.linear_start, config.linear_end, config.timesteps) == (0.00085, 0.012, 1000)
    assert config.scale_factor == 0.18215
    assert config.vae.downsampling_factor == 8
    assert config.default_image_size == 512
    assert config.unet.channel_mult == (1, 2, 4, 4)
    assert config.unet.attention_heads(320) == (8, 40)
    assert config.text == CLIP_VIT_L14_TEXT


def test_text_config_overrides_clip_defaults() -> None:
    config = load_config(TINY_CONFIG)
    assert config.text["hidden_size"] == 32 and config.text["num_hidden_layers"] == 3
    assert config.text["vocab_size"] == 49408  # from the YAML, equal to the default


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(TINY_CONFIG).scale_factor = 1.0  # type: ignore[misc]


def test_head_channels_and_legacy_rules() -> None:
    unet = load_config(FULL_CONFIG).unet
    by_channels = dataclasses.replace(unet, num_heads=-1, num_head_channels=64)
    assert by_channels.attention_heads(640) == (10, 64)
    legacy = dataclasses.replace(unet, num_heads=8, num_head_channels=64, legacy=True)
    assert legacy.attention_heads(640) == (10, 80)


def raw_config():
    return OmegaConf.load(FULL_CONFIG)


def test_v_parameterization_is_refused_clearly() -> None:
    raw = raw_config()
    raw.model.params.parameterization = "v"
    with pytest.raises(ConfigError, match=r"parameterization is 'v'.*SD 2\.x"):
        parse_config(raw)


def test_missing_key_is_named() -> None:
    raw = raw_config()
    del raw.model.params.unet_config.params.model_channels
    with pytest.raises(ConfigError, match=r"model\.params\.unet_config\.params\.model_channels"):
        parse_config(raw)


def test_context_dim_must_match_text_width() -> None:
    raw = raw_config()
    raw.model.params.unet_config.params.context_dim = 1024
    with pytest.raises(ConfigError, match=r"context_dim \(1024\) must equal the text encoder's hidden_size \(768\)"):
        parse_config(raw)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"model:\n  params: [\n", "not a YAML config file: while parsing"),
        (b"\x80\x02}q\x00.", "not a YAML config file: 'utf-8' codec can't decode"),  # a .ckpt handed as the config
        (b"- model\n", "not a config in the original layout"),
        (None, "a value is not the number it must be: could not convert string to float: 'abc'"),
        (b"model: {}\n", "config is missing 'model.params'"),
        (b"model: 5\n", "'<root>.model' must be a mapping of settings, got 5"),
        (b"model: {params: 5}\n", "'model.params' must be a mapping of settings, got 5"),
    ],
)
def test_a_config_that_cannot_be_read_is_one_error_naming_the_file(
    tmp_path: Path, text: bytes | None, message: str
) -> None:
    path = tmp_path / "odd.yaml"
    demo = (Path(__file__).parents[1] / "configs" / "tiny-demo.yaml").read_text()
    demo = demo.replace("linear_start: 0.00085", "linear_start: abc")
    path.write_bytes(text if text is not None else demo.encode())
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {message}")
