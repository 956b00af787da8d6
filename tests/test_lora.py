"""LoRA (ldm/lora.py): kohya files merged into the UNet and CLIP, against diffusers' own LoRA loading (peft) on the
same weights; the tags that name them; weights put back bit for bit; files for other models refused, by name."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ldm.checkpoint import read_state_dict
from ldm.config import TEXT_TO_IMAGE_CONFIG, load_config
from ldm.generation_request import GenerationError, GenerationRequest
from ldm.lora import (
    Delta,
    LoraError,
    LoraUse,
    LoraWeights,
    diffusers_names,
    find,
    kohya_targets,
    names_in,
    parse,
    prompt_loras,
    short_hash,
    strip_tags,
)
from ldm.model import StableDiffusion, build_parts
from ldm.parts import load_checkpoint
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from tests.hostile_pickles import write_malformed_torch_file
from tests.loras import kohya_lora, text_kohya_layers, unet_kohya_layers, write_lora
from tests.reference import FLOAT_TOLERANCE, TINY_CONFIG, TINY_SAFETENSORS

REQUEST = GenerationRequest("a castle on a hill", negative_prompt="blurry", steps=6, seed=3, height=64, width=64)
# What diffusers and peft warn of on this torch and numpy, which is theirs to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute"),
]


@pytest.fixture(scope="module")
def peer() -> Any:
    """diffusers' pipeline on the tiny weights, with a CLIP of its own: peft rewrites the layers it adapts."""
    from scripts.peers import diffusers_pipeline

    model = load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)
    return diffusers_pipeline(model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))


@pytest.fixture(scope="module")
def lora_states(peer: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Two LoRAs keyed by diffusers' and transformers' module names, as kohya's scripts key them: `style` changes
    every attention layer, the ResBlocks' 3×3 first convolutions (LoCon) and CLIP; `detail` the attention layers."""
    style_layers = {
        **unet_kohya_layers(peer.unet, "attentions"),
        **{k: v for k, v in unet_kohya_layers(peer.unet, "resnets").items() if k.endswith("conv1")},
        **text_kohya_layers(peer.text_encoder),
    }
    return {
        "style": kohya_lora(style_layers, rank=4, alpha=2.0, seed=0),
        "detail": kohya_lora(unet_kohya_layers(peer.unet, "attentions"), rank=2, alpha=1.0, seed=1),
    }


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, lora_states: dict[str, dict[str, torch.Tensor]]) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "style.safetensors", lora_states["style"])
    write_lora(folder / "more" / "detail.safetensors", lora_states["detail"])
    return folder


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    """A model of this module's own: LoRAs stay merged into its weights between requests."""
    return load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)


@pytest.fixture(scope="module")
def lora_pipeline(model: StableDiffusion, lora_dir: Path) -> Pipeline:
    return Pipeline(model, lora_dir=lora_dir)


def test_every_unet_layer_has_the_diffusers_name_kohya_keys_it_by() -> None:
    """On the full SD v1 architecture: each of our 282 linear and convolution layers maps to a distinct layer of
    diffusers' UNet (built by diffusers from the same config) of the same shape, and no layer of theirs is left."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    from omegaconf import OmegaConf

    ours = build_parts(load_config(TEXT_TO_IMAGE_CONFIG))["unet"]
    original = OmegaConf.to_container(OmegaConf.load(TEXT_TO_IMAGE_CONFIG), resolve=True)
    keys = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(original, keys))
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    their_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    names = {o: t for o, t in diffusers_names(ours) if o in our_layers}
    assert len(our_layers) == 282 and set(names) == set(our_layers)
    assert sorted(names.values()) == sorted(their_layers)
    for our_name, their_name in names.items():
        assert our_layers[our_name].weight.shape == their_layers[their_name].weight.shape, our_name


def test_clip_layers_are_keyed_as_kohya_keys_them(model: StableDiffusion) -> None:
    targets = kohya_targets(model)
    clip = text_kohya_layers(model.text_encoder.transformer)
    layers = model.config.text["num_hidden_layers"]
    assert len(clip) == 6 * layers and all(targets[key] is layer for key, layer in clip.items())
    assert sum(key.startswith("lora_te_") for key in targets) == len(clip)


@pytest.mark.parametrize(
    ("prompt", "uses", "text"),
    [
        ("a castle <lora:style:0.7>", (LoraUse("style", 0.7, 0.7),), "a castle "),
        ("<lora:style> a castle", (LoraUse("style"),), " a castle"),
        ("a <lora:my style v2:1.2:-0.5> castle", (LoraUse("my style v2", 1.2, -0.5),), "a  castle"),
        ("<lora:a:0.5> and <lora:a:0.25:1>", (LoraUse("a", 0.75, 1.5),), " and "),
        # A1111's alias and named weights (which win over positions; the UNet's is the text encoder's by default).
        ("a <lyco:oil:0.7> castle", (LoraUse("oil", 0.7, 0.7),), "a  castle"),
        ("<lora:oil:te=0.5:unet=1>", (LoraUse("oil", 0.5, 1.0),), ""),
        ("<lora:oil:te=0.5>", (LoraUse("oil", 0.5, 0.5),), ""),
        ("<lora:oil:0.8:unet=0.2>", (LoraUse("oil", 0.8, 0.2),), ""),
        ("<lora:oil:0.8:0.4:te=0.1>", (LoraUse("oil", 0.1, 0.4),), ""),
        # The limit itself is a weight, tags of one name adding up to it too; a name's spaces around it are not its.
        ("<lora: oil :10> <lora:oil:-10>", (LoraUse("oil", 0.0, 0.0),), " "),
        ("<lora:a:5> <lora:a:5:-10>", (LoraUse("a", 10.0, -5.0),), " "),
        ("a castle, 3 < 4 > 2", (), "a castle, 3 < 4 > 2"),
    ],
)
def test_tags_name_loras_and_are_not_text(prompt: str, uses: tuple[LoraUse, ...], text: str) -> None:
    assert prompt_loras(prompt) == uses and strip_tags(prompt) == text


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora::1>", "names no LoRA"),
        ("<lora:style:heavy>", "'heavy' is not a number"),
        ("<lora:style:11>", r"must be in \[-10, 10\], got 11"),
        ("<lora:style:-10.5>", r"must be in \[-10, 10\], got -10.5"),
        ("<lora:style:1:nan>", r"must be in \[-10, 10\], got nan"),
        ("<lora:style:1:1:1>", "at most two weights"),
        ("<lora:style:1:dyn=8>", "at most two weights"),
        ("a castle, <hypernet:anime:1>", "'<hypernet:anime:1>': hypernet is not available here, only <lora:…>"),
        ("<LORA:style:1>", "LORA is not available here"),
        ("<lora:style:6> <lora:style:6>", r"the tags of LoRA 'style' add up to more than ±10: 12"),
    ],
)
def test_tags_that_cannot_be_read(prompt: str, message: str) -> None:
    with pytest.raises(GenerationError, match=message) as error:
        resolve(dataclasses.replace(REQUEST, prompt=prompt))
    assert error.value.field == "prompt"


def test_a1111s_other_names_for_the_same_layers_read_alike(
    model: StableDiffusion, lora_states: dict[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """A1111 also reads a UNet layer by its original (CompVis) path, which is our module's, and SD v1's text encoder
    under `lora_te1_`: a file keyed so makes the same changes to the same layers as one keyed by kohya's names."""
    targets = kohya_targets(model)
    compvis = {layer: path for path, layer in model.unet.named_modules()}

    def renamed(key: str) -> str:
        name, suffix = key.split(".", 1)
        if name.startswith("lora_te_"):
            return f"lora_te1_{name.removeprefix('lora_te_')}.{suffix}"
        return f"lora_unet_{compvis[targets[name]].replace('.', '_')}.{suffix}"

    style = lora_states["style"]
    aliased = {renamed(key): value for key, value in style.items()}
    assert not set(aliased) & set(style)  # every key in its other form
    changes = [
        {id(delta.layer): delta for delta in parse(tmp_path / "x.safetensors", (0, 0), state, targets).deltas}
        for state in (style, aliased)
    ]
    assert changes[0].keys() == changes[1].keys() and len(changes[0]) == len(style) // 3
    for layer, delta in changes[0].items():
        other = changes[1][layer]
        assert (delta.scale, delta.in_unet) == (other.scale, other.in_unet)
        assert torch.equal(delta.down, other.down) and torch.equal(delta.up, other.up)


def test_a_merged_weight_is_the_original_plus_the_scaled_product(model: StableDiffusion, tmp_path: Path) -> None:
    """Checked in float64 for a linear layer and a 3×3 convolution, then put back bit for bit."""
    targets = kohya_targets(model)
    keys = [k for k in targets if k.endswith("attn2_to_k")][:1] + [k for k in targets if k.endswith("resnets_0_conv1")][
        :1
    ]
    state = kohya_lora({k: targets[k] for k in keys}, rank=3, alpha=1.5, seed=7)
    lora = parse(tmp_path / "x.safetensors", (0, 0), state, targets)
    originals = {k: targets[k].weight.detach().clone() for k in keys}
    weights = LoraWeights()
    weights.apply([(lora, LoraUse("x", 0.8, -0.6))])
    for key in keys:
        down, up = state[f"{key}.lora_down.weight"].double(), state[f"{key}.lora_up.weight"].double()
        weight = -0.6 * 1.5 / 3  # both are UNet layers: the UNet's weight
        product = torch.einsum("or,ri...->oi...", up.flatten(1), down)
        expected = originals[key].double() + weight * product
        assert torch.allclose(targets[key].weight.double(), expected, atol=1e-6), key
        assert not torch.equal(targets[key].weight, originals[key])
    weights.apply([])
    assert all(torch.equal(targets[key].weight, originals[key]) for key in keys)


def test_a_merge_that_fails_midway_puts_back_what_it_changed(
    model: StableDiffusion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory at the second layer, say: the first layer is put back too, so that no later request runs on
    half a LoRA, and the merge is tried whole again."""
    targets = kohya_targets(model)
    keys = [k for k in targets if k.endswith("attn2_to_k")][:2]
    lora = parse(tmp_path / "x.safetensors", (0, 0), kohya_lora({k: targets[k] for k in keys}, 3, 1.5, 7), targets)
    originals = {k: targets[k].weight.detach().clone() for k in keys}
    value = Delta.value

    def second_fails(delta: Delta, weight: float) -> torch.Tensor:
        if delta is lora.deltas[1]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return value(delta, weight)

    monkeypatch.setattr(Delta, "value", second_fails)
    weights = LoraWeights()
    with pytest.raises(torch.OutOfMemoryError):
        weights.apply([(lora, LoraUse("x"))])
    assert weights.applied == () and all(torch.equal(targets[k].weight, originals[k]) for k in keys)


def test_a_lora_stored_in_float8_merges_its_values(model: StableDiffusion, tmp_path: Path) -> None:
    """float8 weights and alpha (files stored small): read as the float32 values they hold."""
    targets = kohya_targets(model)
    key = next(k for k in targets if k.endswith("attn2_to_k"))
    state = {name: value.to(torch.float8_e4m3fn) for name, value in kohya_lora({key: targets[key]}, 3, 2.0, 7).items()}
    widened = parse(tmp_path / "w.safetensors", (0, 0), {k: v.float() for k, v in state.items()}, targets)
    small = parse(tmp_path / "s.safetensors", (0, 0), state, targets)
    [delta], [expected] = small.deltas, widened.deltas
    assert delta.scale == expected.scale == 2.0 / 3
    assert torch.equal(delta.value(0.8), expected.value(0.8))


def _diffusers_image(peer: Any, request: GenerationRequest, adapters: dict[str, Any]) -> np.ndarray:
    """diffusers' image in [0, 255] with its LoRAs at `adapters`' weights (name → weight, or per network)."""
    from scripts.peers import call_arguments

    peer.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    return peer(**call_arguments(request)).images[0] * 255.0


@pytest.fixture(scope="module")
def peer_with_loras(peer: Any, lora_states: dict[str, dict[str, torch.Tensor]]) -> Any:
    for name, state in lora_states.items():
        peer.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name=name)
    return peer


@pytest.mark.parametrize(
    ("tags", "adapters"),
    [
        ("<lora:style:0.7>", {"style": 0.7}),
        ("<lora:style:0.7> <lora:detail:-1.5>", {"style": 0.7, "detail": -1.5}),
        ("<lora:style:1:0.3>", {"style": {"text_encoder": 1.0, "unet": 0.3}}),
    ],
)
def test_images_match_diffusers_loading_the_same_files(
    lora_pipeline: Pipeline, peer_with_loras: Any, tags: str, adapters: dict[str, Any]
) -> None:
    """The same kohya files through diffusers' converter and peft's adapter layers (which add up·down·x beside the
    layer instead of merging it) give our image, within the reference tolerance; and the LoRAs change it."""
    request = dataclasses.replace(REQUEST, prompt=f"{REQUEST.prompt} {tags}")
    ours = lora_pipeline.generate(request).pixels[0]
    theirs = _diffusers_image(peer_with_loras, request, adapters)
    assert np.abs(ours - theirs).max() < FLOAT_TOLERANCE
    plain = lora_pipeline.generate(REQUEST).pixels[0]
    assert np.abs(ours - plain).mean() > 1


def test_requests_with_other_loras_in_one_batch_each_get_their_own_image(lora_pipeline: Pipeline) -> None:
    """A batch mixing LoRAs runs each set on its own weights; the weights go back bit for bit, so a plain request
    after them is the one before them."""
    plain = dataclasses.replace(REQUEST, n_samples=2)
    style = dataclasses.replace(REQUEST, prompt=f"{REQUEST.prompt} <lora:style:0.7>", seed=4)
    both = dataclasses.replace(REQUEST, prompt=f"<lora:detail:1> {REQUEST.prompt} <lora:style:0.7>", seed=5)
    first = lora_pipeline.generate(plain).pixels
    alone = [lora_pipeline.generate(r).pixels for r in (style, both)]
    together = lora_pipeline.generate_many([plain, style, both, dataclasses.replace(style, seed=6)])
    assert np.array_equal(together[0].pixels, first)
    # Batched with another image, as a UNet call of another size: equal within float rounding.
    assert np.abs(together[1].pixels - alone[0]).max() < FLOAT_TOLERANCE
    assert np.array_equal(together[2].pixels, alone[1])
    assert np.abs(together[1].pixels - together[2].pixels).mean() > 1
    assert lora_pipeline.lora_weights.applied != ()
    assert np.array_equal(lora_pipeline.generate(plain).pixels, first)
    assert lora_pipeline.lora_weights.applied == ()


def test_pipelines_sharing_a_model_share_what_is_merged_into_it(lora_pipeline: Pipeline, tmp_path: Path) -> None:
    """A second pipeline on the same model knows the first merged a LoRA, and takes it out for a plain request."""
    plain = lora_pipeline.generate(REQUEST).pixels
    lora_pipeline.generate(dataclasses.replace(REQUEST, prompt=f"{REQUEST.prompt} <lora:style:1>"))
    other = Pipeline(lora_pipeline.model, lora_dir=tmp_path)
    assert np.array_equal(other.generate(REQUEST).pixels, plain)


def test_a_lora_file_changed_on_disk_is_read_again(lora_pipeline: Pipeline, tmp_path: Path) -> None:
    source = lora_pipeline.loras.find("detail")
    pipeline = Pipeline(lora_pipeline.model, lora_dir=tmp_path)
    path = tmp_path / "swap.safetensors"
    path.write_bytes(source.read_bytes())
    first = pipeline.loras.load("swap")
    assert pipeline.loras.load("swap") is first
    state = {k: -v if k.endswith("lora_up.weight") else v for k, v in read_state_dict(path).items()}
    write_lora(path, state)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    second = pipeline.loras.load("swap")
    assert second is not first and torch.equal(second.deltas[0].up, -first.deltas[0].up)


def _bad_files(lora_states: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[Any, str]]:
    style = lora_states["style"]
    key = next(k for k in style if "attn2_to_k.lora_down" in k)
    wide = {**style, key: torch.zeros(4, 1024)}
    # SDXL's two text encoders (its first is SD v1's CLIP, which A1111 reads under `lora_te1_` for SD v1 too).
    sdxl = {k.replace("lora_te_", prefix): v.clone() for k, v in style.items() for prefix in ("lora_te1_", "lora_te2_")}
    loha = {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)}
    alphas = {**style, key.replace("lora_down.weight", "alpha"): torch.ones(2)}
    up = key.replace("lora_down", "lora_up")
    rank0 = {**style, key: torch.zeros(0, style[key].shape[1]), up: torch.zeros(style[up].shape[0], 0)}
    peft = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 4)}
    # Number types torch loads that are no weights or scale: refused as the file is read, not when merged.
    integers = {**style, key: style[key].to(torch.int16)}
    complex_alpha = {**style, key.replace("lora_down.weight", "alpha"): torch.ones((), dtype=torch.complex64)}
    infinite_alpha = {**style, key.replace("lora_down.weight", "alpha"): torch.tensor(float("inf"))}
    # The right first two sides for a linear layer, and a 3×3 kernel after them.
    kernel_up = {**style, up: torch.zeros(*style[up].shape, 3, 3)}
    return {
        "wide": (wide, "attn2_to_k does not fit this model's layer of shape"),
        "sdxl": (sdxl, "changes layers this model does not have .*lora_te2_"),
        "loha": (loha, "of a kind this server does not read"),
        "alphas": (alphas, "attn2_to_k.alpha must be one finite number"),
        "rank0": (rank0, "attn2_to_k does not fit"),
        "peft": (peft, "not in kohya's format"),
        "integers": (integers, "attn2_to_k holds numbers of type torch.int16, which it cannot read"),
        "complex_alpha": (complex_alpha, "attn2_to_k.alpha must be one finite number"),
        "infinite_alpha": (infinite_alpha, "attn2_to_k.alpha must be one finite number"),
        "kernel_up": (kernel_up, "attn2_to_k does not fit"),
        "empty": ({}, "not in kohya's format"),
        "garbage": (b"\x00not a tensor file", "cannot be read"),
        "malformed": (write_malformed_torch_file, "cannot be read"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "wide", "sdxl", "loha", "alphas", "rank0", "peft", "integers", "complex_alpha", "infinite_alpha", "kernel_up",
        "empty", "garbage", "malformed",
    ],
)  # fmt: skip
def test_files_it_cannot_use_are_the_prompts_error_naming_why(
    model: StableDiffusion, lora_states: dict[str, dict[str, torch.Tensor]], tmp_path: Path, name: str
) -> None:
    content, message = _bad_files(lora_states)[name]
    path = tmp_path / f"{name}.safetensors"
    if callable(content):
        content(tmp_path / f"{name}.pt")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_lora(path, content)
    pipeline = Pipeline(model, lora_dir=tmp_path)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with pytest.raises(GenerationError, match=f"LoRA '{name}'.*{message}") as error:
        pipeline.generate(dataclasses.replace(REQUEST, prompt=f"a castle <lora:{name}:1>"))
    assert error.value.field == "prompt"
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())


def test_a_lora_that_is_not_there_lists_those_that_are(lora_pipeline: Pipeline) -> None:
    with pytest.raises(GenerationError, match="no LoRA named 'stlye'; the LoRA folder holds: detail, style"):
        lora_pipeline.generate(dataclasses.replace(REQUEST, prompt="a castle <lora:stlye:1>"))
    empty = Pipeline(lora_pipeline.model, lora_dir=None)
    with pytest.raises(GenerationError, match="holds: none"):
        empty.generate(dataclasses.replace(REQUEST, prompt="a castle <lora:style:1>"))


def test_a_lora_is_found_by_its_training_name_too(lora_pipeline: Pipeline, tmp_path: Path) -> None:
    """A1111's alias: the `ss_output_name` kohya's scripts write, which A1111's UI puts in prompts, so a renamed
    download is found by it; a file's own name comes first."""
    from safetensors.torch import load_file, save_file

    style = load_file(str(lora_pipeline.loras.find("style")))
    renamed = tmp_path / "sub" / "inkStyle_v2-000010.safetensors"
    renamed.parent.mkdir()
    save_file(style, str(renamed), metadata={"ss_output_name": "ink_style"})
    save_file(style, str(tmp_path / "detail.safetensors"))
    save_file(style, str(tmp_path / "other.safetensors"), metadata={"ss_output_name": "detail"})
    assert find(tmp_path, "ink_style") == renamed
    assert find(tmp_path, "detail").name == "detail.safetensors"
    aliased = Pipeline(lora_pipeline.model, lora_dir=tmp_path)
    request = dataclasses.replace(REQUEST, prompt="a castle <lora:ink_style:1>")
    plain = lora_pipeline.generate(dataclasses.replace(request, prompt="a castle <lora:style:1>")).pixels
    assert np.array_equal(aliased.generate(request).pixels, plain)


def test_the_short_hash_is_kohyas_of_the_tensor_bytes(tmp_path: Path) -> None:
    """A1111's `Lora hashes` digest: SHA-256 of a safetensors file past its header, so metadata does not change it;
    of the whole file for a `.pt`. Cut to 12 hex digits."""
    from safetensors.torch import save_file

    tensors = {"lora_unet_conv_in.lora_down.weight": torch.arange(8.0).view(2, 4)}
    plain, tagged = tmp_path / "plain.safetensors", tmp_path / "tagged.safetensors"
    save_file(tensors, str(plain))
    save_file(tensors, str(tagged), metadata={"ss_output_name": "tagged", "ss_network_dim": "2"})
    data = plain.read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little") :]
    assert len(body) == 8 * 4 and short_hash(plain) == hashlib.sha256(body).hexdigest()[:12]
    assert short_hash(tagged) == short_hash(plain) and tagged.read_bytes() != data
    pickled = tmp_path / "old.pt"
    torch.save(tensors, pickled)
    assert short_hash(pickled) == hashlib.sha256(pickled.read_bytes()).hexdigest()[:12]


def test_pngs_name_the_loras_with_their_hashes_as_a1111_writes_them(lora_pipeline: Pipeline) -> None:
    request = dataclasses.replace(REQUEST, prompt=f"{REQUEST.prompt} <lora:style:0.5> <lora:detail>")
    generation = lora_pipeline.generate(request)
    style, detail = (short_hash(lora_pipeline.loras.find(name)) for name in ("style", "detail"))
    assert generation.lora_hashes == (("detail", detail), ("style", style))
    text = parameters_text(generation.request, 3, "", generation.lora_hashes)
    assert text.startswith(f"{request.prompt}\nNegative prompt: blurry\n")
    assert text.endswith(f', Lora hashes: "detail: {detail}, style: {style}"')
    odd = parameters_text(generation.request, 3, "", (("a:b,c", "0123456789ab"),))
    assert odd.endswith(', Lora hashes: "abc: 0123456789ab"')
    assert "Lora hashes" not in parameters_text(REQUEST, 3, "", lora_pipeline.generate(REQUEST).lora_hashes)


def test_a_big_folder_is_not_listed_whole(tmp_path: Path) -> None:
    for index in range(25):
        (tmp_path / f"style{index:02}.safetensors").write_bytes(b"")
    with pytest.raises(LoraError) as error:
        find(tmp_path, "missing")
    assert str(error.value).endswith("holds: style00, style01, style02, style03, style04, style05, style06, style07, "
                                     "style08, style09, style10, style11, style12, style13, style14, style15, style16, "
                                     "style17, style18, style19, … (25 in all)")  # fmt: skip
    assert find(tmp_path, "style24") == tmp_path / "style24.safetensors"
    # A suffix in capitals is found too (as A1111 finds it), and only a LoRA file's.
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "Ink.SAFETENSORS").write_bytes(b"")
    (tmp_path / "deep" / "notes.txt").write_bytes(b"")
    assert find(tmp_path, "Ink") == tmp_path / "deep" / "Ink.SAFETENSORS"
    assert "notes" not in names_in(tmp_path)


def test_a_tag_in_the_negative_prompt_is_an_error() -> None:
    with pytest.raises(GenerationError, match="read from the prompt only") as error:
        resolve(dataclasses.replace(REQUEST, negative_prompt="blurry <lora:style:1>"))
    assert error.value.field == "negative_prompt"


def test_the_kohya_fixture_is_what_kohya_writes(lora_states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Keys as sd-scripts writes them for SD v1 (spot-checked against its naming: `lora_unet_` + diffusers' path,
    `lora_te_text_model_encoder_layers_…`), so the tests above read the real format, not one of our making."""
    keys = set(lora_states["style"])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_resnets_2_conv1.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert {key.split(".", 1)[1] for key in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
