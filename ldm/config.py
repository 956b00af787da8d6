"""Typed view of an original Stable Diffusion v1 config YAML (the layout of CompVis' `v1-inference.yaml`).

The original code builds its classes from the YAML's `target:` strings; we read only the numbers we need into frozen
dataclasses, so the class graph stays visible in code and a wrong config fails here, with the key's name, rather
than as a shape mismatch deep inside a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

# CLIP ViT-L/14's text tower, the text encoder of every SD v1.x checkpoint.
CLIP_VIT_L14_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}


# The configs the repository ships (configs/): SD v1's text-to-image one and the one of its inpainting checkpoints.
# Not in the model archive, which carries its own config: for the commands that build one.
SHIPPED_CONFIGS = Path(__file__).parents[1] / "configs"
TEXT_TO_IMAGE_CONFIG = SHIPPED_CONFIGS / "v1-inference.yaml"
INPAINTING_CONFIG = SHIPPED_CONFIGS / "v1-inpainting-inference.yaml"


class ConfigError(ValueError):
    """The config YAML is missing a key, has a wrong value, or describes a model we do not support."""


@dataclass(frozen=True)
class UNetConfig:
    """`model.params.unet_config.params` of the original config (openaimodel.UNetModel)."""

    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    num_heads: int
    num_head_channels: int
    transformer_depth: int
    context_dim: int
    legacy: bool

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of a transformer block at `channels`, as openaimodel.UNetModel derives them."""
        if self.num_head_channels == -1:
            heads = self.num_heads
            head_dim = channels // heads
        else:
            heads = channels // self.num_head_channels
            head_dim = self.num_head_channels
        if self.legacy:
            head_dim = channels // self.num_heads
        return heads, head_dim


@dataclass(frozen=True)
class VAEConfig:
    """`model.params.first_stage_config.params` (AutoencoderKL) with its `ddconfig` flattened in."""

    embed_dim: int
    z_channels: int
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    double_z: bool

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD v1)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    """Everything of a config YAML that inference needs."""

    linear_start: float
    linear_end: float
    timesteps: int
    scale_factor: float
    latent_channels: int
    latent_size: int
    unet: UNetConfig
    vae: VAEConfig
    text: dict[str, Any] = field(default_factory=lambda: dict(CLIP_VIT_L14_TEXT))
    conditioning_key: str = "crossattn"
    source: str = "<memory>"

    @property
    def default_image_size(self) -> int:
        """The side in pixels the model was trained at (512 for SD v1)."""
        return self.latent_size * self.vae.downsampling_factor

    @property
    def inpainting(self) -> bool:
        """An inpainting model (RunwayML's sd-v1-5-inpainting): its UNet also reads the mask and the masked image's
        latent, concatenated to its input (`conditioning_key: hybrid`)."""
        return self.conditioning_key == "hybrid"


def _require(node: DictConfig, key: str, where: str) -> Any:
    if key not in node or node[key] is None:
        raise ConfigError(f"config is missing '{where}.{key}'")
    return node[key]


def _section(node: DictConfig, key: str, where: str) -> DictConfig:
    """`_require` of a part that holds settings of its own: a mapping, or the config names it."""
    section = _require(node, key, where)
    if not isinstance(section, DictConfig):
        raise ConfigError(f"'{where}.{key}' must be a mapping of settings, got {section!r}")
    return section


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _unet(node: DictConfig) -> UNetConfig:
    where = "model.params.unet_config.params"
    if not node.get("use_spatial_transformer", False):
        raise ConfigError(f"{where}.use_spatial_transformer must be true: SD v1 conditions on text by cross-attention")
    if node.get("use_linear_in_transformer", False):
        raise ConfigError(f"{where}.use_linear_in_transformer is an SD 2.x setting; only SD v1.x is supported")
    num_heads = int(node.get("num_heads", -1))
    num_head_channels = int(node.get("num_head_channels", -1))
    if num_heads == -1 and num_head_channels == -1:
        raise ConfigError(f"{where}: either num_heads or num_head_channels must be set")
    return UNetConfig(
        in_channels=int(_require(node, "in_channels", where)),
        out_channels=int(_require(node, "out_channels", where)),
        model_channels=int(_require(node, "model_channels", where)),
        attention_resolutions=_ints(_require(node, "attention_resolutions", where)),
        num_res_blocks=int(_require(node, "num_res_blocks", where)),
        channel_mult=_ints(_require(node, "channel_mult", where)),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=int(node.get("transformer_depth", 1)),
        context_dim=int(_require(node, "context_dim", where)),
        legacy=bool(node.get("legacy", True)),
    )


def _vae(node: DictConfig) -> VAEConfig:
    where = "model.params.first_stage_config.params"
    dd = _section(node, "ddconfig", where)
    dd_where = f"{where}.ddconfig"
    return VAEConfig(
        embed_dim=int(_require(node, "embed_dim", where)),
        z_channels=int(_require(dd, "z_channels", dd_where)),
        in_channels=int(_require(dd, "in_channels", dd_where)),
        out_ch=int(_require(dd, "out_ch", dd_where)),
        ch=int(_require(dd, "ch", dd_where)),
        ch_mult=_ints(_require(dd, "ch_mult", dd_where)),
        num_res_blocks=int(_require(dd, "num_res_blocks", dd_where)),
        attn_resolutions=_ints(dd.get("attn_resolutions", [])),
        resolution=int(dd.get("resolution", 256)),
        double_z=bool(dd.get("double_z", True)),
    )


def _text(node: DictConfig | None) -> dict[str, Any]:
    text = dict(CLIP_VIT_L14_TEXT)
    where = "model.params.cond_stage_config"
    if node is None:
        return text
    if not isinstance(node, DictConfig):
        raise ConfigError(f"'{where}' must be a mapping of settings, got {node!r}")
    if node.get("params") is None:
        return text
    overrides = _section(node, "params", where).get("text_config")
    if overrides is not None:
        if not isinstance(overrides, DictConfig):
            raise ConfigError(f"'{where}.params.text_config' must be a mapping of CLIPTextConfig fields")
        text.update(OmegaConf.to_container(overrides, resolve=True))
    return text


def _check_input_channels(config: ModelConfig, where: str) -> None:
    """The UNet reads the latent alone (`crossattn`), or the latent, the mask and the masked image's latent
    (`hybrid`, inpainting): its `in_channels` must say the same, or every image would fail at its first step."""
    channels = config.latent_channels
    wanted = {"crossattn": (channels, "the latent"), "hybrid": (2 * channels + 1, "the latent, mask and masked image")}
    if config.conditioning_key not in wanted:
        raise ConfigError(
            f"{where}.conditioning_key is '{config.conditioning_key}': SD v1 models use 'crossattn' (text to image) "
            "or 'hybrid' (inpainting)"
        )
    count, what = wanted[config.conditioning_key]
    if config.unet.in_channels != count:
        raise ConfigError(
            f"{where}.unet_config.params.in_channels is {config.unet.in_channels}, but conditioning_key "
            f"'{config.conditioning_key}' feeds the UNet {count} channels ({what})"
        )


def parse_config(raw: DictConfig, source: str = "<memory>") -> ModelConfig:
    """Read an omegaconf tree in the original layout; raise ConfigError naming the first problem."""
    model = _section(raw, "model", "<root>")
    params = _section(model, "params", "model")
    where = "model.params"
    parameterization = params.get("parameterization", "eps")
    if parameterization != "eps":
        raise ConfigError(
            f"{where}.parameterization is '{parameterization}': only 'eps' (Stable Diffusion v1.x) is supported; "
            "v-prediction models (SD 2.x 768-v) are not"
        )
    unet_node = _section(_section(params, "unet_config", where), "params", f"{where}.unet_config")
    vae_node = _section(_section(params, "first_stage_config", where), "params", f"{where}.first_stage_config")
    config = ModelConfig(
        linear_start=float(_require(params, "linear_start", where)),
        linear_end=float(_require(params, "linear_end", where)),
        timesteps=int(_require(params, "timesteps", where)),
        scale_factor=float(_require(params, "scale_factor", where)),
        latent_channels=int(params.get("channels", 4)),
        latent_size=int(params.get("image_size", 64)),
        unet=_unet(unet_node),
        vae=_vae(vae_node),
        text=_text(params.get("cond_stage_config")),
        conditioning_key=str(params.get("conditioning_key", "crossattn")),
        source=source,
    )
    _check_input_channels(config, where)
    if config.unet.context_dim != config.text["hidden_size"]:
        raise ConfigError(
            f"{where}.unet_config.params.context_dim ({config.unet.context_dim}) must equal the text encoder's "
            f"hidden_size ({config.text['hidden_size']})"
        )
    return config


def load_config(path: str | Path) -> ModelConfig:
    """Read an original-format config YAML file; whatever is wrong with it is one ConfigError naming it (a command
    may have picked it, or been handed the checkpoint in its place)."""
    try:
        raw = OmegaConf.load(str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a YAML config file: {error}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: not a config in the original layout (a mapping with model.params)")
    try:
        return parse_config(raw, source=str(path))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except ValueError as error:
        raise ConfigError(f"{path}: a value is not the number it must be: {error}") from None
    except TypeError as error:
        raise ConfigError(f"{path}: a value is not of the kind it must be: {error}") from None
