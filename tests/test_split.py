"""Splitting a checkpoint into per-part files and loading them back: same model, same images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.model_hash import file_sha256
from ldm.parts import load_split, read_manifest
from ldm.pipeline import Pipeline
from scripts import build_mar
from scripts.split_checkpoint import main as split_main
from tests.reference import FLOAT_TOLERANCE, REFERENCE, TINY_CONFIG, TINY_SAFETENSORS, case, request_for


@pytest.fixture(scope="module")
def split_fp32(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("split") / "fp32"
    assert (
        split_main(["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--out", str(out), "--dtype", "fp32"]) == 0
    )
    return out


def test_split_folder_holds_parts_config_tokenizer_and_manifest(split_fp32: Path, tiny_ckpt: Path) -> None:
    names = {p.name for p in split_fp32.iterdir()}
    assert names == {
        "unet.safetensors",
        "vae.safetensors",
        "text_encoder.safetensors",
        "config.yaml",
        "tokenizer",
        "manifest.json",
    }
    manifest = read_manifest(split_fp32)
    assert manifest.source_sha256 == file_sha256(tiny_ckpt)
    assert manifest.dtype == "fp32"
    # Parameter counts of the reference checkpoint (4.18 M in all), part by part.
    assert manifest.parameters == {"unet": 1543012, "vae": 1028935, "text_encoder": 1606096}
    assert json.loads((split_fp32 / "manifest.json").read_text())["source"] == "tiny-dev.ckpt"
    with safe_open(str(split_fp32 / "unet.safetensors"), "pt") as f:
        assert "input_blocks.0.0.weight" in f.keys()  # noqa: SIM118 (safe_open is not a dict)


def test_split_parts_give_the_reference_image(split_fp32: Path) -> None:
    model = load_split(split_fp32)
    assert model.model_hash == read_manifest(split_fp32).source_sha256[:10]
    data = case("steps8")
    generation = Pipeline(model).generate(request_for(data))
    assert np.abs(generation.pixels[0] - np.load(REFERENCE / data["images"][0]["npy"])).max() < FLOAT_TOLERANCE


def test_fp16_parts_are_half_size_and_load_in_any_dtype(tmp_path: Path, tiny_ckpt: Path, split_fp32: Path) -> None:
    out = tmp_path / "fp16"
    assert split_main(["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--out", str(out)]) == 0
    assert read_manifest(out).dtype == "fp16"
    for part in ("unet", "vae", "text_encoder"):
        half, full = (out / f"{part}.safetensors").stat().st_size, (split_fp32 / f"{part}.safetensors").stat().st_size
        assert half < 0.55 * full
    model = load_split(out, dtype=torch.float32)
    reference = load_split(split_fp32)
    weight = model.unet.input_blocks[0][0].weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, reference.unet.input_blocks[0][0].weight.half().float())


def test_split_refuses_a_wrong_checkpoint_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.safetensors"
    save_file({"model.diffusion_model.nonsense": torch.ones(2)}, str(bogus))
    assert split_main(["--ckpt", str(bogus), "--config", str(TINY_CONFIG), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["truncated download", "out is a file", "config is a folder"])
def test_split_refuses_unusable_inputs_in_one_line_and_makes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    """Each is one `split_checkpoint:` line and exit 2, never a traceback; the output folder is made only once the
    inputs have been read."""
    ckpt, config, out = TINY_SAFETENSORS, TINY_CONFIG, tmp_path / "out"
    if bad == "truncated download":
        ckpt = tmp_path / "model.safetensors"
        ckpt.write_bytes(TINY_SAFETENSORS.read_bytes()[:1000])
    elif bad == "out is a file":
        out.write_text("not a folder")
    else:
        config = tmp_path / "config.yaml"
        config.mkdir()
    assert split_main(["--ckpt", str(ckpt), "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("split_checkpoint: ") and err.count("\n") == 1, err
    assert out.is_file() if bad == "out is a file" else not out.exists()


def test_build_mar_copies_the_weights_beside_the_store_not_into_the_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parts are staged, and the archiver copies them again into its `$TMPDIR/<model name>`: both beside the
    store, on its disk (the system temp folder is a RAM-backed tmpfs on many machines, where two copies of 4 GB may
    not fit). A store whose path the archiver would read as a list and a glob, a model named as a staging folder, a
    folder a killed build left: none upsets it, and nothing is left behind."""
    seen: list[tuple[str, list[str]]] = []
    run = build_mar.subprocess.run

    def archiver(command: list[str], **kwargs: Any) -> Any:
        scratch = kwargs["env"]["TMPDIR"]
        staged = Path(kwargs["cwd"]) / command[command.index("--extra-files") + 1]
        seen.append((scratch, sorted(p.name for p in Path(staged).iterdir())))
        return run(command, **kwargs)

    monkeypatch.setattr(build_mar.subprocess, "run", archiver)
    store = tmp_path / "a,b[1]" / "store"
    (store / f"{build_mar.BUILDING}killed").mkdir(parents=True)
    for name in ("model", "staged", "archiver-tmp"):
        argv = ["--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG), "--model-name", name,
                "--export-path", str(store), "--dtype", "fp32", "--archive-format", "no-archive"]  # fmt: skip
        assert build_mar.main(argv) == 0
        assert (store / name / "unet.safetensors").is_file()
    assert all(Path(scratch).parent.parent == store and "unet.safetensors" in staged for scratch, staged in seen)
    assert sorted(p.name for p in store.iterdir()) == ["archiver-tmp", "model", "staged"]
