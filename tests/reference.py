"""The reference set (a copy of the team's shared/reference) and how tests compare against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from ldm.generation_request import GenerationRequest

if TYPE_CHECKING:
    from ldm.pipeline import Generation, Pipeline

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
TINY_CONFIG = REFERENCE / "tiny-dev.yaml"
TINY_SAFETENSORS = REFERENCE / "tiny-dev.safetensors"
CASES: list[dict[str, Any]] = json.loads((REFERENCE / "cases.json").read_text())["cases"]
# Tolerances of the reference README: float images within 0.01 levels; rounded within 1 level, ≤ 0.1% off by one.
FLOAT_TOLERANCE = 0.01
OFF_BY_ONE_FRACTION = 0.001
# bf16 keeps 8 significant bits to float32's 24: its images sit 38-49 dB from the original's float32 ones.
BF16_MIN_PSNR_DB = 30.0


def load_image(path: Path | BinaryIO) -> Image.Image:
    """A fully read image whose file is already closed (no ResourceWarning under filterwarnings=error)."""
    with Image.open(path) as image:
        return image.copy()


def case(case_id: str) -> dict[str, Any]:
    return next(c for c in CASES if c["id"] == case_id)


def request_for(case_data: dict[str, Any]) -> GenerationRequest:
    """The GenerationRequest of a reference case (`null` fields left at their defaults)."""
    r = case_data["request"]
    init = load_image(REFERENCE / r["init_image"]) if r["init_image"] else None
    return GenerationRequest(
        prompt=r["prompt"],
        negative_prompt=r["negative_prompt"] or "",
        height=r["H"],
        width=r["W"],
        steps=r["ddim_steps"],
        scale=r["scale"],
        eta=r["eta"],
        seed=r["seed"],
        n_samples=r["n_samples"],
        n_iter=r["n_iter"],
        init_image=init,
        strength=r["strength"] if r["strength"] is not None else 0.75,
    )


def request_from_body(body: dict[str, Any]) -> GenerationRequest:
    """The GenerationRequest of a txt2img request body of the inference API (prompt, seed, H, W, ddim_steps and
    n_samples; the rest at their defaults), to make in-process the images a server must answer with."""
    return GenerationRequest(body["prompt"], height=body["H"], width=body["W"], steps=body["ddim_steps"],
                             seed=body["seed"], n_samples=body.get("n_samples", 1))  # fmt: skip


def reference_png(image_entry: dict[str, Any]) -> np.ndarray:
    return np.asarray(load_image(REFERENCE / image_entry["png"]).convert("RGB"))


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of float images on the 0–255 scale."""
    mse = float(np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def assert_matches_png(actual: np.ndarray, expected: np.ndarray) -> None:
    """Rounded images: every value within 1 level, at most 0.1% of values off by one."""
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert actual.shape == expected.shape
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    assert (diff > 0).mean() <= OFF_BY_ONE_FRACTION, f"{(diff > 0).mean():.4%} of values differ"


def assert_reproduces(case_data: dict[str, Any], generation: Generation) -> None:
    """`generation` gives the case's reference images: the float ones within FLOAT_TOLERANCE, the rounded ones as
    `assert_matches_png` allows."""
    for image, pixels, rounded in zip(case_data["images"], generation.pixels, generation.images, strict=True):
        assert np.abs(pixels - np.load(REFERENCE / image["npy"])).max() < FLOAT_TOLERANCE
        assert_matches_png(rounded, reference_png(image))


def embed_each(pipeline: Pipeline, texts: list[str]) -> list[torch.Tensor]:
    """Texts in A1111's syntax each encoded alone (a batch of one: a prompt without prompt editing)."""
    batches = pipeline.prompts.embed_batches([(text,) for text in texts])
    return [batch[text] for batch, text in zip(batches, texts, strict=True)]
