"""What a worker serves, for TorchServe's management API (`GET /models/NAME?customized=true` answers it as the
model's `customizedMetadata`) and for clients of the inference API, which ask with the body `{"describe": true}`.

Why: a client (or an operator, or the web page) cannot otherwise tell which checkpoint and VAE a server paints with,
which LoRAs and textual-inversion embeddings its prompts may name, or what its defaults and limits are, short of
sending requests and reading the 400s. Everything here is read when asked: LoRA and embedding files added while the
server runs are listed on the next call, as requests find them. Nothing here is secret from a client of the
inference API: its answers and 400s tell the model, the names and the limits (PNG parameters, a LoRA that is not in
the folder), and where and how the worker runs (device, precision, fast path) is the speed any client measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from handler.errors import RequestError
from handler.request import parse_body
from handler.settings import HandlerSettings
from ldm import hires, lora
from ldm.generation_request import SAMPLERS
from ldm.pipeline import Pipeline

ASKING = {"describe": True}


@dataclass(frozen=True)
class DescribeRequest:
    """An inference request for the description, answered beside the generations of its batch. Why on the inference
    API too: the management API is the operator's, on loopback, and the web front (another Deployment on
    Kubernetes) and A1111's clients need the names of the samplers, LoRAs and embeddings a request may use."""


def asks_description(body: Any) -> bool:
    """Whether a request body is `{"describe": true}`, `true` itself (a short one is read twice, a long one never)."""
    if isinstance(body, (str, bytes, bytearray)) and len(body) > 64:
        return False
    try:
        parsed = parse_body(body)
    except RequestError:
        return False
    return parsed.keys() == ASKING.keys() and parsed["describe"] is True


def describe(pipeline: Pipeline, settings: HandlerSettings) -> dict[str, Any]:
    """The model, where and how it runs, what a prompt may name, and what a request gets and may ask for; `vae` and
    `fast_path` left out when there is none (as TorchServe would drop them if null)."""
    model = pipeline.model
    vae = model.vae_file
    embeddings = pipeline.embeddings.vocabulary().embeddings
    described = {
        "model_hash": model.model_hash,
        "vae": None if vae is None else {"name": vae.name, "hash": vae.short_hash},
        "inpainting": model.config.inpainting,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "low_memory": model.low_memory,
        "fast_path": list(pipeline.fast_shapes) or None,
        "samplers": list(SAMPLERS),
        "sampler_names": SAMPLERS,
        "upscalers": hires.UPSCALERS,
        "loras": lora.names_in(pipeline.loras.folder),
        "embeddings": sorted(embedding.name for embedding in embeddings),
        "embedding_shapes": {embedding.name: list(embedding.vectors.shape) for embedding in embeddings},
        "defaults": asdict(settings.defaults),
        "limits": asdict(settings.limits),
    }
    return {key: value for key, value in described.items() if value is not None}
