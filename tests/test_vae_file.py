"""A VAE from its own file (A1111's "SD VAE"): read as A1111 reads one, it paints what the checkpoint would paint with
those VAE weights baked in (txt2img and img2img, single file and split folder, command line), and its images say
which file it was, as A1111's do."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from handler.sd_handler import StableDiffusionHandler
from ldm import cli, parts
from ldm.checkpoint import PREFIXES, CheckpointError, read_state_dict
from ldm.cli import main
from ldm.model_hash import file_sha256
from ldm.parts import MANIFEST, load_checkpoint, load_split, read_manifest, write_split
from ldm.pipeline import Generation, Pipeline
from ldm.png_info import parameters_text, read_parameters
from ldm.vae_file import VaeChoice, VaeError, VaeFile, choose, near_checkpoint, read_vae
from scripts import build_mar, split_checkpoint
from tests.hostile_pickles import RunsCode
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS, case, request_for
from tests.test_handler import FakeContext

IMAGE_PNG = {"Accept": "image/png"}

VAE_PREFIX = PREFIXES["vae"]


def vae_weights(seed: int = 7) -> dict[str, torch.Tensor]:
    """The tiny checkpoint's VAE moved by a few per cent, so that it decodes (and encodes) visibly otherwise."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, value in read_state_dict(TINY_SAFETENSORS).items():
        if key.startswith(VAE_PREFIX):
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            weights[key[len(VAE_PREFIX) :]] = value + 0.05 * value.abs().mean() * noise
    return weights


def with_training_leftovers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What vae-ft-mse-840000-ema-pruned.ckpt holds beside the weights: its loss's tensors and the EMA's counters."""
    return {
        **weights,
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.ones(4, 3, 4, 4),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32),
    }


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE file as Stability released theirs: a `.ckpt` whose `state_dict` holds the leftovers too."""
    path = tmp_path_factory.mktemp("vae") / "tiny-ft.vae.ckpt"
    torch.save({"state_dict": with_training_leftovers(vae_weights())}, path)
    return path


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint with the same VAE weights written into it: what the file must be equivalent to."""
    state = read_state_dict(TINY_SAFETENSORS)
    state.update({VAE_PREFIX + k: v for k, v in vae_weights().items()})
    path = tmp_path_factory.mktemp("baked") / "tiny-baked.safetensors"
    save_file(state, str(path))
    return path


def generations(pipeline: Pipeline) -> list[Generation]:
    """A txt2img and an img2img reference case: the VAE decodes both and encodes the second's init image."""
    return [pipeline.generate(request_for(case(case_id))) for case_id in ("basic", "img2img")]


def assert_same_images(ours: list[Generation], theirs: list[Generation]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)


@pytest.fixture(scope="module")
def baked_images(baked: Path) -> list[Generation]:
    return generations(Pipeline(load_checkpoint(baked, TINY_CONFIG)))


def test_a_vae_file_paints_as_the_checkpoint_with_its_weights_baked_in(
    vae_ckpt: Path, baked_images: list[Generation]
) -> None:
    model = load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, vae=vae_ckpt)
    swapped = generations(Pipeline(model))
    assert_same_images(swapped, baked_images)
    # The swap shows: both the decoded txt2img image and the img2img one (encoded and decoded by it) differ.
    plain = generations(Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)))
    for a, b in zip(swapped, plain, strict=True):
        assert np.abs(a.pixels - b.pixels).mean() > 1.0
    assert model.vae_file == VaeFile(vae_ckpt.name, file_sha256(vae_ckpt))
    assert model.model_hash == load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG).model_hash  # the checkpoint's


def test_a_split_folder_keeps_the_vae_file_and_names_it(
    vae_ckpt: Path, baked_images: list[Generation], tmp_path: Path
) -> None:
    manifest = write_split(TINY_SAFETENSORS, TINY_CONFIG, tmp_path / "split", "fp32", vae_ckpt)
    assert (manifest.vae, manifest.vae_sha256) == (vae_ckpt.name, file_sha256(vae_ckpt))
    assert read_manifest(tmp_path / "split") == manifest
    model = load_split(tmp_path / "split")
    assert model.vae_file == VaeFile(vae_ckpt.name, file_sha256(vae_ckpt))
    assert_same_images(generations(Pipeline(model)), baked_images)
    # A plain folder's VAE replaced at load (the command lines' --vae with a split folder) paints the same.
    write_split(TINY_SAFETENSORS, TINY_CONFIG, tmp_path / "plain", "fp32")
    assert read_manifest(tmp_path / "plain").vae_file is None and load_split(tmp_path / "plain").vae_file is None
    assert_same_images(generations(Pipeline(load_split(tmp_path / "plain", vae=vae_ckpt))), baked_images)


def test_the_handler_serves_a_folder_split_with_a_vae_file_and_its_pngs_name_it(
    vae_ckpt: Path, baked_images: list[Generation], tmp_path: Path
) -> None:
    write_split(TINY_SAFETENSORS, TINY_CONFIG, tmp_path / "model", "fp32", vae_ckpt)
    handler = StableDiffusionHandler()
    handler.initialize(FakeContext(tmp_path / "model"))
    r = case("basic")["request"]
    body = {key: r[key] for key in ("prompt", "seed", "H", "W", "ddim_steps")}
    (png,) = handler.handle([{"body": json.dumps(body).encode()}], FakeContext(tmp_path / "model", [IMAGE_PNG]))
    pixels, text = read_png_bytes(png)
    np.testing.assert_array_equal(pixels, baked_images[0].images[0])
    assert f"VAE hash: {file_sha256(vae_ckpt)[:10]}, VAE: {vae_ckpt.name}" in text


def test_a_safetensors_vae_file_reads_like_the_ckpt(vae_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny-ft.safetensors"
    save_file(with_training_leftovers(vae_weights()), str(path))
    config = load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG).config
    (from_ckpt, _), (from_safetensors, vae_file) = read_vae(vae_ckpt, config), read_vae(path, config)
    assert sorted(from_ckpt) == sorted(from_safetensors) == sorted(vae_weights())
    for key, value in from_ckpt.items():
        assert torch.equal(value, from_safetensors[key]), key
    assert vae_file.short_hash == file_sha256(path)[:10]


def test_images_name_the_vae_file_after_the_model_hash_as_a1111_does() -> None:
    request = request_for(case("basic"))
    vae = VaeFile("vae-ft-mse-840000-ema-pruned.safetensors", "abcdef0123" + "4" * 54)
    text = parameters_text(request, 42, "0123456789", vae_file=vae)
    fields = "Model hash: 0123456789, VAE hash: abcdef0123, VAE: vae-ft-mse-840000-ema-pruned.safetensors"
    assert f", Size: 64x64, {fields}" in text
    assert "VAE" not in parameters_text(request, 42, "0123456789")
    # A name holding what ends a field is quoted, as A1111 quotes any value.
    odd = parameters_text(request, 42, "0123456789", vae_file=VaeFile("my, vae: v2.pt", "0" * 64))
    assert ', VAE hash: 0000000000, VAE: "my, vae: v2.pt", ' in odd


def broken(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    save_file(weights, str(path))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: {k: v for k, v in w.items() if k != "decoder.conv_out.bias"}, r"1 missing: decoder\.conv_out\.bias"),
        (lambda w: {**w, "decoder.extra.weight": torch.ones(2)}, r"1 unexpected: decoder\.extra\.weight"),
        (
            lambda w: {**w, "quant_conv.bias": torch.ones(3)},
            r"1 wrong shape: quant_conv\.bias: file \[3\], config \[\d+\]",
        ),
        (lambda w: {VAE_PREFIX + k: v for k, v in w.items()}, r"\d+ unexpected: first_stage_model\."),
        (lambda w: {**w, "model.diffusion_model.out.2.bias": torch.ones(4)}, "a whole checkpoint, not a VAE file"),
        (lambda w: {"decoder.up_blocks.0.resnets.0.conv1.weight": torch.ones(1)}, "in diffusers' layout"),
    ],
    ids=["missing", "unexpected", "wrong-shape", "prefixed", "checkpoint", "diffusers"],
)
def test_a_file_that_cannot_be_the_vae_is_refused_naming_it(change, message: str, tmp_path: Path) -> None:
    path = broken(tmp_path / "bad.safetensors", change(vae_weights()))
    with pytest.raises(VaeError, match=message) as error:
        load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, vae=path)
    assert str(path) in str(error.value)


def test_a_file_that_is_no_checkpoint_at_all_is_refused_as_a_vae(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(b"not a pickle")
    with pytest.raises(VaeError, match=r"^VAE .*notes\.pt: not a readable torch checkpoint"):
        load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, vae=path)
    with pytest.raises(VaeError, match=r"^VAE .*absent\.pt: no such file"):
        load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, vae=tmp_path / "absent.pt")
    with pytest.raises(VaeError, match=r"^VAE .*: a folder, not a file"):
        load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, vae=tmp_path)


def test_a_vae_file_that_would_run_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.vae.pt"
    torch.save({"state_dict": vae_weights(), "evil": RunsCode(marker)}, path)
    with pytest.raises(VaeError, match=r"^VAE .*evil\.vae\.pt: refusing to load"):
        load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, vae=path)
    assert not marker.exists()


def test_a_bad_vae_file_fails_before_the_checkpoint_is_read(
    tmp_path: Path, tiny_split: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint is gigabytes, the VAE a few hundred megabytes: the file is checked first."""

    def not_yet(*args: object) -> None:
        pytest.fail("the checkpoint was read before the VAE file was checked")

    monkeypatch.setattr(parts, "read_state_dict", not_yet)
    monkeypatch.setattr(parts, "_read_part", not_yet)
    bad = broken(tmp_path / "bad.safetensors", {"decoder.up_blocks.0.resnets.0.conv1.weight": torch.ones(1)})
    for load in (
        lambda: load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, vae=bad),
        lambda: load_split(tiny_split, vae=bad),
    ):
        with pytest.raises(VaeError, match="in diffusers' layout"):
            load()


def test_a_checkpoint_shipped_without_its_vae_loads_with_a_vae_file(
    vae_ckpt: Path, baked_images: list[Generation], tmp_path: Path
) -> None:
    """As in A1111, which loads checkpoints leniently: a VAE file stands in for a VAE the checkpoint lacks."""
    state = {k: v for k, v in read_state_dict(TINY_SAFETENSORS).items() if not k.startswith(VAE_PREFIX)}
    path = tmp_path / "no-vae.safetensors"
    save_file(state, str(path))
    assert_same_images(generations(Pipeline(load_checkpoint(path, TINY_CONFIG, vae=vae_ckpt))), baked_images)
    with pytest.raises(CheckpointError, match=r"missing: first_stage_model\."):
        load_checkpoint(path, TINY_CONFIG)


def test_a_folder_split_before_vae_files_loads_as_before(tmp_path: Path) -> None:
    """Its manifest has no `vae` keys: its own VAE, and no VAE fields in its PNGs."""
    write_split(TINY_SAFETENSORS, TINY_CONFIG, tmp_path, "fp16")
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["vae"], manifest["vae_sha256"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert load_split(tmp_path).vae_file is None and read_manifest(tmp_path).vae_file is None


def test_a_half_precision_split_stores_the_vae_file_in_that_precision(vae_ckpt: Path, tmp_path: Path) -> None:
    write_split(TINY_SAFETENSORS, TINY_CONFIG, tmp_path, "fp16", vae_ckpt)
    with safe_open(str(tmp_path / "vae.safetensors"), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert sorted(tensors) == sorted(vae_weights())
    for key, value in vae_weights().items():
        assert tensors[key].dtype == torch.float16 and torch.equal(tensors[key], value.half()), key


def test_the_file_beside_a_checkpoint_is_found_as_a1111_finds_it(tmp_path: Path) -> None:
    """A1111 1.6 searches `*.vae.ckpt`, then `*.vae.pt`, then `*.vae.safetensors`, and takes the first found."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.touch()
    assert near_checkpoint(ckpt) is None and choose(ckpt, None) == VaeChoice(None)
    (tmp_path / "model.vae.safetensors").touch()
    (tmp_path / "other.vae.ckpt").touch()
    (tmp_path / "model.vae.bin").touch()
    assert near_checkpoint(ckpt) == tmp_path / "model.vae.safetensors"
    (tmp_path / "model.vae.pt").touch()
    assert near_checkpoint(ckpt) == tmp_path / "model.vae.pt"
    (tmp_path / "model.vae.ckpt").touch()
    assert choose(ckpt, None) == VaeChoice(tmp_path / "model.vae.ckpt", beside=True)
    # Named, or refused with "none", nothing is looked for; a split folder keeps the VAE it was split with.
    assert choose(ckpt, "other.pt") == VaeChoice(Path("other.pt"))
    assert choose(ckpt, "none") == VaeChoice(None)
    (tmp_path / "split").mkdir()
    (tmp_path / "split.vae.ckpt").touch()
    assert choose(tmp_path / "split", None) == VaeChoice(None)


def read_png(path: Path) -> tuple[np.ndarray, str]:
    return read_png_bytes(path.read_bytes())


def read_png_bytes(data: bytes) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    text = read_parameters(data)
    assert text is not None
    return pixels, text


def basic_argv(outdir: Path) -> list[str]:
    r = case("basic")["request"]
    return ["--prompt", r["prompt"], "--seed", str(r["seed"]), "--H", str(r["H"]), "--W", str(r["W"]),
            "--ddim_steps", str(r["ddim_steps"]), "--n_samples", "1", "--device", "cpu",
            "--outdir", str(outdir)]  # fmt: skip


def test_the_command_line_reads_vae_and_the_file_beside_the_checkpoint(
    vae_ckpt: Path, baked_images: list[Generation], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG)]
    assert main([*basic_argv(tmp_path / "flag"), *model, "--vae", str(vae_ckpt)]) == 0
    # Beside a checkpoint `model.safetensors`, `model.vae.ckpt` is taken unasked, as A1111 takes it.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.safetensors").symlink_to(TINY_SAFETENSORS)
    (tmp_path / "models" / "model.vae.ckpt").symlink_to(vae_ckpt)
    beside = ["--ckpt", str(tmp_path / "models" / "model.safetensors"), "--config", str(TINY_CONFIG)]
    assert main([*basic_argv(tmp_path / "beside"), *beside]) == 0
    assert capsys.readouterr().err.count("note: the VAE is ") == 2
    (flag,), (auto,) = (list((tmp_path / name).rglob("*.png")) for name in ("flag", "beside"))
    pixels, text = read_png(flag)
    np.testing.assert_array_equal(pixels, baked_images[0].images[0])
    assert re.search(
        rf"Model hash: \w{{10}}, Model: [\w-]+, VAE hash: {file_sha256(vae_ckpt)[:10]}, VAE: {vae_ckpt.name}", text
    )
    auto_pixels, auto_text = read_png(auto)
    np.testing.assert_array_equal(auto_pixels, pixels)
    assert "VAE: model.vae.ckpt" in auto_text


def test_a_vae_flag_naming_no_file_fails_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        pytest.fail("the model loaded before the --vae flag was refused")

    monkeypatch.setattr(cli, "load_model", fail)
    model = ["--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG)]
    missing = tmp_path / "absent.vae.pt"
    assert main([*basic_argv(tmp_path), *model, "--vae", str(missing)]) == 2
    assert f"--vae {missing}: not found" in capsys.readouterr().err
    assert main([*basic_argv(tmp_path), *model, "--vae", str(tmp_path)]) == 2
    assert f"--vae {tmp_path}: a folder, not a file" in capsys.readouterr().err


def test_a_vae_file_that_does_not_fit_fails_the_command_naming_where_it_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {"decoder.up_blocks.0.resnets.0.conv1.weight": torch.ones(1)}
    path = broken(tmp_path / "bad.safetensors", bad)
    argv = [*basic_argv(tmp_path), "--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG), "--vae", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot load the VAE {path}: in diffusers' layout" in err and err.count(str(path)) == 1
    misfit = broken(tmp_path / "misfit.safetensors", {"decoder.conv_in.weight": torch.ones(1)})
    assert main([*argv[:-1], str(misfit)]) == 2
    err = capsys.readouterr().err
    assert f"cannot load the VAE {misfit}: does not fit config {TINY_CONFIG}:" in err and err.count(str(misfit)) == 1
    # Found beside the checkpoint, unasked: the message says so, and how to do without it.
    (tmp_path / "model.safetensors").symlink_to(TINY_SAFETENSORS)
    broken(tmp_path / "model.vae.safetensors", bad)
    argv = [*basic_argv(tmp_path), "--ckpt", str(tmp_path / "model.safetensors"), "--config", str(TINY_CONFIG)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    beside = tmp_path / "model.vae.safetensors"
    assert f"cannot load the VAE {beside}: in diffusers' layout" in err and err.count(str(beside)) == 1
    assert "(found beside the checkpoint: --vae none keeps the checkpoint's own)" in err
    assert main([*argv, "--vae", "none"]) == 0
    (png,) = tmp_path.rglob("*.png")
    assert "VAE" not in read_png(png)[1]


def test_the_command_line_replaces_a_split_folders_vae(
    vae_ckpt: Path, baked_images: list[Generation], tmp_path: Path
) -> None:
    write_split(TINY_SAFETENSORS, TINY_CONFIG, tmp_path / "split", "fp32")
    argv = [*basic_argv(tmp_path / "out"), "--ckpt", str(tmp_path / "split"), "--vae", str(vae_ckpt)]
    assert main(argv) == 0
    (png,) = (tmp_path / "out").rglob("*.png")
    pixels, text = read_png(png)
    np.testing.assert_array_equal(pixels, baked_images[0].images[0])
    assert f"VAE: {vae_ckpt.name}" in text


def test_a_build_with_a_bad_vae_file_leaves_the_store_it_would_replace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = tmp_path / "store" / "sd" / "MAR-INF" / "MANIFEST.json"
    served.parent.mkdir(parents=True)
    served.write_text("{}")
    bad = broken(tmp_path / "bad.safetensors", {"decoder.up_blocks.0.resnets.0.conv1.weight": torch.ones(1)})
    argv = ["--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG), "--export-path", str(tmp_path / "store"),
            "--archive-format", "no-archive", "--dtype", "fp32", "--vae", str(bad)]  # fmt: skip
    assert build_mar.main(argv) == 2
    assert f"build_mar: VAE {bad}: in diffusers' layout" in capsys.readouterr().err
    assert served.read_text() == "{}"


def test_split_checkpoint_takes_the_file_beside_the_checkpoint_and_says_so(
    vae_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.safetensors").symlink_to(TINY_SAFETENSORS)
    (tmp_path / "model.vae.ckpt").symlink_to(vae_ckpt)
    argv = ["--ckpt", str(tmp_path / "model.safetensors"), "--config", str(TINY_CONFIG), "--dtype", "fp32"]
    assert split_checkpoint.main([*argv, "--out", str(tmp_path / "beside")]) == 0
    out = capsys.readouterr().out
    assert "taking the VAE file beside the checkpoint" in out and out.rstrip().endswith("VAE model.vae.ckpt")
    assert read_manifest(tmp_path / "beside").vae == "model.vae.ckpt"
    assert split_checkpoint.main([*argv, "--out", str(tmp_path / "own"), "--vae", "none"]) == 0
    assert read_manifest(tmp_path / "own").vae_file is None
