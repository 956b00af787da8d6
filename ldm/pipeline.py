"""txt2img, img2img and inpainting: a request in, uint8 images and their seeds out, per tests/fixtures/GENERATION.md.

Each generation is a column of numbered steps: (0) merge the LoRAs its prompt names (ldm/lora.py), (1) encode the
prompts (ldm/prompt_encoding.py), (2) draw each image's starting noise from its own CPU generator, (3) denoise with
classifier-free guidance and the request's sampler (DDIM, PLMS, or one of k-diffusion's), with A1111's hires fix upscale
and run (1)–(3) again at the larger size (ldm/hires.py), (4) decode (inpainting: and lay the init image back over the
kept part), (5) round to uint8. What a request is, its rules and the texts it reads are ldm/generation_request.py's,
ldm/request_checks.py's and ldm/request_texts.py's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm import (
    ddim,
    hires,
    inpainting,
    k_samplers,
    only_masked,
    plms,
    seed_resize,
    tiling,
    variation,
)
from ldm.conditioning import BatchConditions, ImageConditioning, lengths
from ldm.ddim import DDIMSchedule, StepCallback, StepHook, add_noise
from ldm.embeddings import EmbeddingLibrary, Vocabulary
from ldm.fast_path import FastPath, accelerate, warm_up
from ldm.generation_request import GenerationError, GenerationRequest, hires_pass
from ldm.host_memory import keep_freed_memory
from ldm.inpainting import KeptRegion
from ldm.lora import LoraError, LoraFile, LoraLibrary, LoraUse, kohya_targets, merged_into
from ldm.model import StableDiffusion
from ldm.prompt_encoding import PromptEncoder
from ldm.request_checks import check_clip_skip, check_hires, resolve
from ldm.request_texts import (
    embeddings_read,
    request_loras,
    run_steps,
    unread_warnings,
)


@dataclass(frozen=True)
class Progress:
    """One sampler step of one UNet batch (two UNet calls for Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE), reported so
    a caller can tell whose images just moved.

    A batch may mix images of several requests (`generate_many`), so each row of `latents` (B, C, h, w) is named by
    `images[row]` = (request index in the call, image index within that request). `step` runs 1..`total`, and
    restarts for each UNet batch, and for the hires fix's second pass (`hires`).
    """

    step: int
    total: int
    latents: torch.Tensor
    images: tuple[tuple[int, int], ...]
    hires: bool = False

    def first_rows(self) -> dict[int, int]:
        """Request index → the row of its first (lowest-index) image in this batch, in order of appearance."""
        rows: dict[int, int] = {}
        for row, (request_index, _) in enumerate(self.images):
            rows.setdefault(request_index, row)
        return rows


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Generation:
    """Images of a request: `images` uint8 (N, H, W, 3); `pixels` the same before rounding, float32 in [0, 255];
    `warnings`, what of its texts CLIP never read (`unread_warnings`); `lora_hashes` and `embedding_hashes`, (name,
    short hash) of each LoRA it merged and each textual-inversion embedding CLIP read of its texts, for the PNGs."""

    request: GenerationRequest
    images: np.ndarray
    pixels: np.ndarray
    warnings: tuple[str, ...] = ()
    lora_hashes: tuple[tuple[str, str], ...] = ()
    embedding_hashes: tuple[tuple[str, str], ...] = ()

    @property
    def seeds(self) -> list[int]:
        return self.request.seeds

    @property
    def subseeds(self) -> list[int | None]:
        """Each image's variation seed (None without variation seeds)."""
        return [*self.request.subseeds] or [None] * self.request.n_images


def encode_image(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB, LANCZOS-resized to (W, H), scaled to [−1, 1]: (1, 3, H, W) float32."""
    array = inpainting.resized_pixels(image, width, height).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


class Pipeline:
    """Runs requests on a loaded model, with the LoRAs of `lora_dir` (`ldm.lora`) and the textual-inversion
    embeddings of `embeddings_dir` (`ldm.embeddings`) that their prompts name.

    The model's weights keep the LoRAs of the last requests run until a request needs other ones (or none), so a run
    of requests with the same LoRAs merges them once.

    With a `fast_path` on a GPU, the configured shapes are compiled and captured here, before the first request. On
    the CPU, creating one tells the process's allocator to keep freed memory (`ldm.host_memory`): create it after
    loading, as the handler and the command lines do. A bf16 model on the CPU is put in channels-last layout.
    """

    def __init__(
        self,
        model: StableDiffusion,
        fast_path: FastPath | None = None,
        lora_dir: Path | None = None,
        embeddings_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.loras = LoraLibrary(lora_dir, kohya_targets(model))
        hidden = model.config.text["hidden_size"]
        self.embeddings = EmbeddingLibrary(embeddings_dir, model.text_encoder.tokenizer, hidden)
        self.prompts = PromptEncoder(model, self.embeddings)
        self.lora_weights = merged_into(model)
        self.factor = model.config.vae.downsampling_factor
        self.sigma_schedule = k_samplers.SigmaSchedule(model.alphas_cumprod)
        if model.device.type == "cuda" and model.dtype == torch.float32:
            # fp32 means fp32: TF32 convolutions (cuDNN's default) and matmuls would move pixels away from the CPU's.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        if model.device.type == "cpu":
            keep_freed_memory()  # every step remakes the same activations: stop faulting them back in each time
            if model.dtype == torch.bfloat16:
                # oneDNN's bf16 convolutions (AMX) reorder NCHW maps on every call: channels-last halves a 512x512
                # decode and takes a sixth off a UNet call (docs/PERFORMANCE.md). Not in float32, where it would copy
                # 2 GB of file-mapped weights for about 7 % and move pixels that match the original's exactly.
                model.unet.to(memory_format=torch.channels_last)
                model.vae.to(memory_format=torch.channels_last)
        self.fast = None if fast_path is None else accelerate(model, fast_path)
        # The configured shapes that compiled and captured: requests of these shapes replay graphs.
        self.fast_shapes: tuple[str, ...] = ()
        if self.fast is not None and fast_path is not None:
            self.fast_shapes = warm_up(model, self.fast, fast_path)

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int]:
        return (1, self.model.config.latent_channels, request.height // self.factor, request.width // self.factor)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """scale_factor × the VAE posterior mean of pixels (B, 3, H, W) in [−1, 1], float32."""
        with self.model.resident(self.model.vae) as vae:
            mean = vae.encode_mean(pixels.to(self.model.device, self.model.dtype))
        return self.model.config.scale_factor * mean.float()

    def init_picture(self, request: GenerationRequest, mask: torch.Tensor | None = None) -> Image.Image:
        """The init image at the request's size, as img2img encodes it and an inpainting model is shown it: for an
        inpainting whose masked content is not the original, the part its pixel mask (1, 1, H, W) repaints filled
        first, through the mask blurred as the seam is (A1111 fills for its latent noise and nothing too)."""
        assert request.init_image is not None and request.width is not None and request.height is not None
        picture = Image.fromarray(inpainting.resized_pixels(request.init_image, request.width, request.height))
        if request.masked_content != "original" and mask is not None:
            return inpainting.filled(picture, inpainting.blurred(mask, request.mask_blur))
        return picture

    def init_latent(self, picture: Image.Image) -> torch.Tensor:
        """z₀ of img2img: the latent of its `init_picture`."""
        return self.encode_pixels(encode_image(picture, *picture.size))

    def image_condition(self, mask: torch.Tensor, picture: Image.Image | None) -> torch.Tensor:
        """What an inpainting model reads beside the latent (1, C + 1, h, w): the pixel mask (1, 1, H, W) at latent
        size, then the latent of the request's `init_picture` with its masked part blanked (all blank without
        one)."""
        if picture is None:
            blank = torch.zeros(1, 3, *mask.shape[-2:])
        else:
            blank = inpainting.blank_masked(encode_image(picture, *picture.size), mask)
        masked = self.encode_pixels(blank)
        return torch.cat([inpainting.latent_mask(mask, self.factor).to(masked.device), masked], dim=1)

    @torch.inference_mode()
    def denoise(
        self,
        x: torch.Tensor,
        contexts: BatchConditions,
        scales: torch.Tensor,
        sampler: str,
        schedule: DDIMSchedule,
        m: int,
        etas: Sequence[float],
        generators: Sequence[torch.Generator],
        callback: StepCallback | None = None,
        image_condition: torch.Tensor | None = None,
        after_step: StepHook | None = None,
        max_rows: int | None = None,
    ) -> torch.Tensor:
        """(3) `sampler` with classifier-free guidance: ε = ε_u + s·(ε_c − ε_u) (for A1111's `AND`, the sum over
        sub-prompts of `BatchConditions.guide`), all in one batched UNet call (two when the contexts' lengths differ),
        for the last `m` steps of an S-step run (img2img's; txt2img's m is S). `x` is where `start_latents` put it;
        `contexts` gives the prompt's and negative prompt's contexts at each evaluation of ε, counted from 0 (A1111's
        prompt editing counts them; a guided one, of two halves or more, is one).

        Latents stay float32 between steps; the UNet runs in the model's dtype. Images whose scale is 1 (and prompt
        one, of weight 1) take ε_c exactly, and when all do, the unconditional half is not computed at all. An
        inpainting model's UNet also reads `image_condition` (B, C + 1, h, w), concatenated to the latents;
        `after_step` is a text-to-image model's inpainting (`KeptRegion`). A UNet call of more than `max_rows` rows
        (an image of many sub-prompts) runs in slices of that many, the memory bound of a server's batches.
        """
        guided = bool((scales != 1).any()) or contexts.composed
        prompt_condition = None if image_condition is None else contexts.prompt_rows(image_condition)
        calls = itertools.count()

        with self.model.resident(self.model.unet) as unet:
            call = unet if self.fast is None else self.fast.unet

            def unet_eps(
                latents: torch.Tensor, condition: torch.Tensor | None, t: float, context: torch.Tensor
            ) -> torch.Tensor:
                batch = latents if condition is None else torch.cat([latents, condition], dim=1)
                # float: the σ-space samplers ask between whole timesteps (the embedding is of a float anyway).
                timesteps = torch.full((batch.shape[0],), t, device=latents.device, dtype=torch.float32)
                batch = batch.to(self.model.dtype)
                if max_rows is None or batch.shape[0] <= max_rows:
                    return call(batch, timesteps, context).float()
                slices = zip(batch.split(max_rows), timesteps.split(max_rows), context.split(max_rows), strict=True)
                return torch.cat([call(*rows) for rows in slices]).float()

            def eps(latents: torch.Tensor, t: float) -> torch.Tensor:
                cond, uncond = contexts(next(calls))
                rows = contexts.prompt_rows(latents)
                if not guided:
                    return unet_eps(rows, prompt_condition, t, cond)
                # Contexts of one length (77 tokens, but for A1111-syntax prompts of several chunks) share one UNet
                # call; otherwise each runs alone, as A1111 runs them.
                if cond.shape[1] == uncond.shape[1]:
                    both = None if image_condition is None else torch.cat([image_condition, prompt_condition])
                    out = unet_eps(torch.cat([latents, rows]), both, t, torch.cat([uncond, cond]))
                    e_u, e_c = out[: len(latents)], out[len(latents) :]
                else:
                    e_u = unet_eps(latents, image_condition, t, uncond)
                    e_c = unet_eps(rows, prompt_condition, t, cond)
                return contexts.guide(e_u, e_c, scales)

            if sampler == "ddim":
                return ddim.sample(eps, x, schedule.tail(m), etas, generators, callback, after_step)
            if sampler == "plms":
                assert after_step is None, "PLMS runs txt2img only"
                return plms.sample(eps, x, schedule.steps, callback)
            levels = self.k_levels(sampler, len(schedule.steps), m)
            return k_samplers.sample(sampler, eps, x, self.sigma_schedule, levels, generators, callback, after_step)

    def k_levels(self, sampler: str, steps: int, m: int) -> list[float]:
        """The noise levels a k-diffusion sampler walks for the last m steps of an S-step run, then 0."""
        return k_samplers.noise_levels(sampler, self.sigma_schedule, steps)[steps - m :]

    def kept_levels(self, sampler: str, schedule: DDIMSchedule, m: int) -> list[tuple[float, float]]:
        """`KeptRegion.levels` of a run of the last m steps: where each step leaves a clean latent's noise."""
        if sampler in k_samplers.STEPS:
            return [(1.0, sigma) for sigma in self.k_levels(sampler, len(schedule.steps), m)[1:]]
        return [(step.alpha**0.5, (1.0 - step.alpha) ** 0.5) for step in schedule.tail(m)[1:]] + [(1.0, 0.0)]

    def noise(self, request: GenerationRequest, image_index: int) -> tuple[torch.Generator, torch.Tensor]:
        """(2) An image's generator, seeded with its seed, and the starting noise it draws first at the request's
        latent size (with variation seeds, bent toward its variation seed's noise; with a seed resize, the seeds'
        noise at the old size pasted into it): on the CPU, so that a seed gives the same image on every device."""
        shape = self.latent_shape(request)
        seed = request.seeds[image_index]
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator)
        if not request.variation and not request.seed_resize:
            return generator, noise.to(self.model.device)
        drawn = shape
        if request.seed_resize:
            drawn = (*shape[:2], request.seed_resize_from_h // self.factor, request.seed_resize_from_w // self.factor)
        seeded = noise if drawn == shape else torch.randn(drawn, generator=torch.Generator("cpu").manual_seed(seed))
        if request.variation:
            other = torch.randn(drawn, generator=torch.Generator("cpu").manual_seed(request.subseeds[image_index]))
            seeded = variation.slerp(request.subseed_strength, seeded[0], other[0])[None]
        if drawn != shape:
            seeded = seed_resize.paste_centred(seeded, noise)
        return generator, seeded.to(self.model.device)

    def start_latents(
        self, sampler: str, schedule: DDIMSchedule, m: int, noise: torch.Tensor, init_latent: torch.Tensor | None
    ) -> torch.Tensor:
        """(2) Where an image's run of the last m steps of `schedule` starts: its noise (`init_latent` None: txt2img,
        inpainting at strength 1), or z₀ noised to the first of its m steps, in the terms of `sampler`."""
        if sampler in k_samplers.STEPS:
            return k_samplers.start(noise, self.k_levels(sampler, len(schedule.steps), m)[0], init_latent)
        return noise if init_latent is None else add_noise(init_latent, noise, schedule.tail(m)[0].alpha)

    def repaint_mask(self, request: GenerationRequest) -> torch.Tensor | None:
        """The request's pixel mask (1, 1, H, W), 1 where repainted: all 1 without a mask on an inpainting model
        (which always reads one), None on a text-to-image model (which needs none)."""
        if request.mask_image is not None:
            return inpainting.repaint_pixels(request, request.width, request.height)
        if self.model.config.inpainting:
            return torch.ones(1, 1, request.height, request.width)
        return None

    def kept_region(self, chunk: Sequence[_Image], sampler: str, schedule: DDIMSchedule, m: int) -> KeptRegion | None:
        """A text-to-image model's inpainting hook for a UNet batch that holds a masked image (rows of the others
        repaint everywhere); None for an inpainting model, which is shown the mask instead, and for other batches."""
        if self.model.config.inpainting or all(image.request.mask_image is None for image in chunk):
            return None
        rows = [
            (
                torch.ones_like(image.noise[:, :1], dtype=torch.bool)
                if image.mask is None
                else inpainting.latent_mask(image.mask, self.factor).to(image.noise.device) > 0.5,
                torch.zeros_like(image.noise) if image.z0 is None else image.z0,
            )
            for image in chunk
        ]
        return KeptRegion(
            torch.cat([repaint for repaint, _ in rows]),
            torch.cat([z0 for _, z0 in rows]),
            torch.cat([image.noise for image in chunk]),
            self.kept_levels(sampler, schedule, m),
        )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(4) Pixels (B, H, W, 3) float32 in [0, 255] before rounding, one image at a time to bound memory."""
        out = []
        with self.model.resident(self.model.vae) as vae:
            decode = vae.decode if self.fast is None else self.fast.decode
            for latent in latents.split(1):
                image = decode((latent / self.model.config.scale_factor).to(self.model.dtype)).float()
                out.append(((image + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).permute(0, 2, 3, 1).cpu())
        return torch.cat(out)

    def generate(self, request: GenerationRequest, callback: ProgressCallback | None = None) -> Generation:
        """Run one request: n_iter batches of n_samples images; returns every image and its seed."""
        return self.generate_many([request], max_batch_images=request.n_samples, callback=callback)[0]

    @contextmanager
    def tiled(self, on: bool) -> Iterator[None]:
        """With `on`, the UNet and the VAE pad circularly for the block (ldm/tiling.py), and run eagerly: the fast
        path's graphs were compiled and captured with zero padding. The padding is the model's own state, so one
        generation runs on a model at a time (a TorchServe worker's, a command line's)."""
        if not on:
            yield
            return
        fast, self.fast = self.fast, None
        try:
            with tiling.circular_padding(self.model.unet, self.model.vae):
                yield
        finally:
            self.fast = fast

    def check(self, request: GenerationRequest) -> None:
        """What only the loaded model can tell of a request: its CLIP has the layer `clip_skip` reads, its hires fix's
        run fits its timesteps, and the LoRAs its prompt names fit (`lora_files`). A server checks this before batching
        the request with others."""
        check_clip_skip(request, self.model.text_encoder.layers)
        check_hires(request, self.model.config.timesteps, self.factor)
        self.lora_files(request)

    def lora_files(self, request: GenerationRequest) -> tuple[tuple[LoraFile, LoraUse], ...]:
        """The LoRAs the request's prompt names, each read and checked against the model (a file missing, unreadable
        or for another model is the prompt's error)."""
        uses = request_loras(request)
        try:
            return tuple((self.loras.load(use.name), use) for use in uses)
        except LoraError as error:
            raise GenerationError("prompt", f"prompt: {error}") from None

    def generate_many(
        self,
        requests: Sequence[GenerationRequest],
        max_batch_images: int = 8,
        callback: ProgressCallback | None = None,
    ) -> list[Generation]:
        """Run several requests, sharing UNet calls between images of the same size, schedule and LoRAs.

        Every image keeps its own generator, so each result is what its request would get alone, but for the
        float rounding of other batch sizes (CPU kernels sum in another order: a level at most, here and there).
        """
        config = self.model.config
        requests = [resolve(r, config.default_image_size, self.factor, config.timesteps) for r in requests]
        for request in requests:
            check_clip_skip(request, self.model.text_encoder.layers)
        # Every LoRA file is read and checked before any work, so a bad one fails its request at once.
        loras_of = [self.lora_files(request) for request in requests]
        # Requests run together only with requests of the same LoRAs and the same padding (tiling).
        runs: dict[tuple[tuple[tuple[LoraFile, LoraUse], ...], bool], list[int]] = {}
        for index, loras in enumerate(loras_of):
            runs.setdefault((loras, requests[index].tiling), []).append(index)
        vocabulary = self.embeddings.vocabulary()  # one reading of the embeddings folder for the whole call
        pixels: dict[int, list[torch.Tensor]] = {}
        # The LoRAs merged already go first (a batch of their requests alone merges nothing), and each set's runs follow
        # one another, so each set is merged once.
        first = {loras: index for index, loras in reversed(list(enumerate(loras_of)))}
        for loras, tiled in sorted(runs, key=lambda run: (run[0] != self.lora_weights.applied, first[run[0]])):
            self.lora_weights.apply(loras)  # (0)
            batch = {i: requests[i] for i in runs[loras, tiled]}
            with self.tiled(tiled):
                pixels.update(self._run(batch, max_batch_images, callback, vocabulary))

        results = []
        tokenizer = self.model.text_encoder.tokenizer
        for index, request in enumerate(requests):
            floats = torch.stack(pixels[index]).numpy()
            # (5) Round, not truncate.
            warnings = unread_warnings(tokenizer, request, vocabulary)
            hashes = tuple((use.name, file.short_hash) for file, use in loras_of[index])
            named = embeddings_read(tokenizer, request, vocabulary)
            embedded = tuple((embedding.name, embedding.short_hash) for embedding in named)
            images = np.rint(floats).astype(np.uint8)
            results.append(Generation(request, images, floats, warnings, hashes, embedded))
        return results

    def _run(
        self,
        requests: dict[int, GenerationRequest],
        max_batch_images: int,
        callback: ProgressCallback | None,
        vocabulary: Vocabulary,
    ) -> dict[int, list[torch.Tensor]]:
        """(1)–(4) for resolved requests on the weights as they are, by their index in the caller's list: each one's
        images' pixels, float32 (H, W, 3) in [0, 255]."""
        conditions = self.prompts.conditions(list(requests.values()), vocabulary)
        images = [
            image
            for (index, request), conditioning in zip(requests.items(), conditions, strict=True)
            for image in self._first_pass(index, request, conditioning)
        ]
        self._sample(images, max_batch_images, callback)
        upscaled = [index for index, request in requests.items() if request.hires]
        if upscaled:
            conditions = self.prompts.conditions([requests[i] for i in upscaled], vocabulary, hires_pass=True)
            second = [
                image
                for index, conditioning in zip(upscaled, conditions, strict=True)
                for image in self._second_pass(
                    requests[index],
                    conditioning,
                    [image for image in images if image.request_index == index],
                )
            ]
            self._sample(second, max_batch_images, _hires_progress(callback))
            images = [image for image in images if image.request_index not in upscaled] + second
        by_size: dict[tuple[int, ...], list[_Image]] = {}
        for image in images:
            assert image.latents is not None, "every image was sampled"
            by_size.setdefault(tuple(image.latents.shape), []).append(image)
        for group in by_size.values():
            decoded = self.decode(torch.cat([image.latents for image in group if image.latents is not None]))
            for image, pixels in zip(group, decoded, strict=True):
                image.pixels = pixels if image.overlay is None else image.overlay(pixels)
        return {index: [image.pixels for image in images if image.request_index == index] for index in requests}

    def _first_pass(self, index: int, asked: GenerationRequest, conditioning: ImageConditioning) -> list[_Image]:
        """(2) The images of request `index`, each at the start of its run (an only-masked inpainting's: its box's,
        ldm/only_masked.py)."""
        crop = only_masked.Crop.of(asked) if asked.inpaint_area == "only_masked" else None
        request = asked if crop is None else crop.run
        mask = self.repaint_mask(request)
        # Made once: img2img encodes it, an inpainting model is shown it too (its fill is not cheap).
        picture = None if request.init_image is None else self.init_picture(request, mask)
        z0 = None if picture is None else self.init_latent(picture)
        condition = None if mask is None or not self.model.config.inpainting else self.image_condition(mask, picture)
        overlay: inpainting.Overlay | only_masked.Crop | None = crop
        if crop is None and request.mask_image is not None and mask is not None and request.init_image is not None:
            overlay = inpainting.Overlay.of(request.init_image, mask, request.mask_blur)
        repaint = None
        if z0 is not None and mask is not None and request.masked_content in ("latent_noise", "latent_nothing"):
            repaint = inpainting.latent_mask(mask, self.factor).to(z0.device) > 0.5
        schedule, m = DDIMSchedule(self.model.alphas_cumprod, request.steps), request.denoising_steps
        images = []
        for image_index in range(request.n_images):
            generator, noise = self.noise(request, image_index)
            start_z0 = z0
            if repaint is not None:
                # A1111's latent noise and latent nothing: the repainted cells the image's starting noise, or 0 (A1111
                # draws its seed's plain noise, the same but with variation seeds or a seed resize).
                fill = noise if request.masked_content == "latent_noise" else torch.zeros_like(noise)
                start_z0 = torch.where(repaint, fill, z0)
            start = self.start_latents(
                request.sampler, schedule, m, noise, None if request.starts_from_noise else start_z0
            )
            images.append(
                _Image(
                    request_index=index, image_index=image_index, request=request, conditioning=conditioning,
                    steps=request.steps, m=m, generator=generator, start=start, noise=noise, z0=start_z0, mask=mask,
                    condition=condition, overlay=overlay,
                )
            )  # fmt: skip
        return images

    def _second_pass(
        self, asked: GenerationRequest, conditioning: ImageConditioning, firsts: Sequence[_Image]
    ) -> list[_Image]:
        """(2) The hires fix's images of request `asked`, from its first pass's: each latent upscaled (or its image,
        then encoded again) and cut to size, noised to the first of the pass's steps by noise drawn anew from its
        seed, as A1111 draws it."""
        plan, request = asked.hires_plan(self.factor), hires_pass(asked, self.factor)
        big_h, big_w = plan.upscaled
        mask = self.repaint_mask(request)  # an inpainting model's, which reads one however it is sampled
        condition = None if mask is None else self.image_condition(mask, None)  # txt2img's second pass
        steps = hires.run_length(request.steps, request.strength)
        schedule = DDIMSchedule(self.model.alphas_cumprod, steps)
        latents = torch.cat([first.latents for first in firsts if first.latents is not None])
        if hires.is_latent(request.hr_upscaler):
            upscaled = hires.upscale_latents(latents, big_h // self.factor, big_w // self.factor, request.hr_upscaler)
        else:
            # The first images in 8 bits as A1111 makes them (truncated: an answer's are rounded), resized to the
            # unrounded size, as A1111's: the VAE's latent of it is the rounded size's.
            firsts_8_bit = self.decode(latents).numpy().astype(np.uint8)
            to_h, to_w = plan.target
            pictures = [hires.upscale_image(i, to_h, to_w, request.hr_upscaler) for i in firsts_8_bit]
            upscaled = torch.cat([self.encode_pixels(encode_image(i, to_w, to_h)) for i in pictures])
        starts = plan.crop(upscaled, self.factor).split(1)
        images = []
        for first, z0 in zip(firsts, starts, strict=True):
            generator, noise = self.noise(request, first.image_index)
            images.append(
                _Image(
                    request_index=first.request_index, image_index=first.image_index, request=request,
                    conditioning=conditioning, steps=steps, m=request.steps, generator=generator,
                    start=self.start_latents(request.sampler, schedule, request.steps, noise, z0), noise=noise, z0=z0,
                    mask=mask, condition=condition, overlay=None,
                )
            )  # fmt: skip
        return images

    def _sample(self, images: Sequence[_Image], max_batch_images: int, callback: ProgressCallback | None) -> None:
        """(3) Denoise every image, in UNet batches of images of the same size, schedule, sampler and context
        lengths (A1111's syntax) at every call, of as many UNet rows as `max_batch_images` guided images of one
        prompt make (`_chunks`); each image's `latents` set."""
        groups: dict[tuple[int, int, int, int, str, tuple], list[_Image]] = {}
        for image in images:
            r = image.request
            shape = lengths(image.conditioning, run_steps(r) + 1)
            groups.setdefault((r.height, r.width, image.steps, image.m, r.sampler, shape), []).append(image)
        for (_, _, steps, m, sampler, _), group in groups.items():
            schedule = DDIMSchedule(self.model.alphas_cumprod, steps)
            for chunk in _chunks(group, 2 * max_batch_images):
                names = tuple((image.request_index, image.image_index) for image in chunk)
                latents = self.denoise(
                    torch.cat([image.start for image in chunk]),
                    BatchConditions([image.conditioning for image in chunk]),
                    torch.tensor([float(image.request.scale) for image in chunk]),
                    sampler,
                    schedule,
                    m,
                    [image.request.eta for image in chunk],
                    [image.generator for image in chunk],
                    _batch_progress(callback, names),
                    None if not self.model.config.inpainting else torch.cat([image.condition for image in chunk]),
                    self.kept_region(chunk, sampler, schedule, m),
                    2 * max_batch_images,
                )
                for image, latent in zip(chunk, latents.split(1), strict=True):
                    image.latents = latent


def _chunks(images: Sequence[_Image], max_rows: int) -> Iterator[list[_Image]]:
    """`images` in order, in runs of at most `max_rows` UNet rows: an image's unconditional row and one per
    sub-prompt (A1111's `AND`: the batch's memory grows with them); an image of more rows runs alone, its UNet calls
    in slices (`denoise`)."""
    chunk: list[_Image] = []
    rows = 0
    for image in images:
        need = 1 + len(image.conditioning.prompts)
        if chunk and rows + need > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(image)
        rows += need
    if chunk:
        yield chunk


def _hires_progress(callback: ProgressCallback | None) -> ProgressCallback | None:
    """`callback` told that the steps it hears of are the hires fix's second pass."""
    if callback is None:
        return None
    return lambda progress: callback(replace(progress, hires=True))


def _batch_progress(callback: ProgressCallback | None, images: tuple[tuple[int, int], ...]) -> StepCallback | None:
    """The sampler's per-step callback for one UNet batch: the sampler knows rows, the caller wants images."""
    if callback is None:
        return None
    return lambda step, total, latents: callback(Progress(step, total, latents, images))


@dataclass
class _Image:
    """One image in flight through one run, the last `m` of `steps` steps: its request as run (a hires fix's second
    pass is its own), its texts' conditioning, its generator (which also draws η noise), its latents at the start
    and then at the end; for inpainting its noise, z₀, pixel mask (`Pipeline.repaint_mask`), an inpainting model's
    `image_condition`, and what lays the init image back over its pixels (4): a whole picture's `Overlay`, an
    only-masked inpainting's `Crop`, which also puts them back in the init image's size."""

    request_index: int
    image_index: int
    request: GenerationRequest
    conditioning: ImageConditioning
    steps: int
    m: int
    generator: torch.Generator
    start: torch.Tensor
    noise: torch.Tensor
    z0: torch.Tensor | None
    mask: torch.Tensor | None
    condition: torch.Tensor | None
    overlay: inpainting.Overlay | only_masked.Crop | None
    latents: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
