"""diffusers holding the same weights as ours: the peer every benchmark compares against.

The UNet and VAE come from diffusers' own single-file conversion of the original-format state dict, loaded strictly;
the text encoder is the very `CLIPTextModel` object ours wraps (same weights, no second copy); the tokenizer reads
our CLIP vocabulary; the scheduler is DDIM configured as CompVis samples (scaled-linear β, "leading" timesteps offset
by one, no clipping, ᾱ_prev of the last step = ᾱ_0). Imported only by the benchmarks: the product never needs
diffusers, and the load children of the CPU benchmark must not pay for importing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.generation_request import GenerationRequest
from ldm.model import StableDiffusion
from ldm.request_texts import clip_text
from ldm.tokenizer import CONTEXT_LENGTH, VOCAB_DIR


def diffusers_networks(state_dict: dict[str, torch.Tensor], config_path: Path) -> tuple[nn.Module, nn.Module]:
    """diffusers' UNet and VAE on an original-format state dict (keys with their `model.diffusion_model.` etc.)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from diffusers.models.attention_processor import AttnProcessor2_0

    original_config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    unet_config = create_unet_diffusers_config_from_ldm(original_config, state_dict)
    vae_config = create_vae_diffusers_config_from_ldm(original_config, state_dict)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    for module, weights in (
        (unet, convert_ldm_unet_checkpoint(state_dict, unet_config)),
        (vae, convert_ldm_vae_checkpoint(state_dict, vae_config)),
    ):
        module.load_state_dict(weights, strict=True, assign=True)
        left_on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        assert not left_on_meta, f"{type(module).__name__}: not loaded: {left_on_meta[:5]}"
        processors = {type(p).__name__ for p in module.attn_processors.values()}
        assert processors == {AttnProcessor2_0.__name__}, f"{type(module).__name__} attention: {processors}"
        module.eval().requires_grad_(False)
    return unet, vae


def diffusers_pipeline(
    ours: StableDiffusion, state_dict: dict[str, torch.Tensor], config_path: Path, device: torch.device
) -> Any:
    """A `StableDiffusionPipeline` on `state_dict`'s weights, on `device` in the dtype of `ours`, sharing its CLIP."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae = diffusers_networks(state_dict, config_path)
    config = ours.config
    scheduler = DDIMScheduler(
        num_train_timesteps=config.timesteps,
        beta_start=config.linear_start,
        beta_end=config.linear_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    # from_pretrained on the folder, not the constructor: transformers 5's constructor takes the files' paths
    # without complaint and then maps every word to id 0/2.
    tokenizer = CLIPTokenizer.from_pretrained(str(VOCAB_DIR), model_max_length=CONTEXT_LENGTH)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=ours.text_encoder.transformer,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, ours.dtype)


def call_arguments(request: GenerationRequest) -> dict[str, Any]:
    """What a diffusers pipeline is called with to make a resolved `request`'s first image: the texts as CLIP reads
    them (LoRA tags cut out), size, steps, guidance, and a CPU generator seeded as ours draws its starting noise."""
    assert request.seed is not None and request.height is not None, "a resolved request"
    return {
        "prompt": clip_text(request, "prompt"),
        "negative_prompt": clip_text(request, "negative_prompt"),
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "guidance_scale": request.scale,
        "generator": torch.Generator().manual_seed(request.seed),
        "output_type": "np",
    }
