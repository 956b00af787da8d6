"""scripts/serve.sh's model store: rebuilt exactly when what it copies changed, never over a store built by hand,
never served half-built. The build itself (scripts/build_mar.py) is tests/test_server.py's; here a stand-in records
the calls."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from scripts import build_mar, model_store
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS

INPAINTING = Path(__file__).parent / "fixtures" / "tiny-inpainting.yaml"


class Builds:
    """Stands in for build_mar.main: makes the store folder, counts the builds, can be made to fail once."""

    def __init__(self) -> None:
        self.argv: list[list[str]] = []
        self.interrupt = False

    def __call__(self, argv: list[str]) -> int:
        self.argv.append(argv)
        store = Path(argv[argv.index("--export-path") + 1]) / argv[argv.index("--model-name") + 1]
        store.mkdir(parents=True, exist_ok=True)
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        return 0


@pytest.fixture
def builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Builds:
    """The module's paths moved into `tmp_path`: a demo checkpoint, a handler file, a store and a stamp."""
    demo = tmp_path / "demo.safetensors"
    shutil.copy(TINY_SAFETENSORS, demo)
    handler = tmp_path / "handler.py"
    handler.write_text("version = 1\n")
    monkeypatch.setattr(model_store, "USER_CKPT", tmp_path / "absent" / "model.ckpt")
    monkeypatch.setattr(model_store, "DEMO_CKPT", demo)
    monkeypatch.setattr(model_store, "PACKAGED", (handler,))
    monkeypatch.setattr(model_store, "MODEL_STORE", tmp_path / "model-store")
    monkeypatch.setattr(model_store, "STAMP", tmp_path / "run" / "model-store.json")
    monkeypatch.setattr(model_store, "USER_LORAS", tmp_path / "models" / "Lora")
    monkeypatch.setattr(model_store, "USER_EMBEDDINGS", tmp_path / "models" / "embeddings")
    recorder = Builds()
    monkeypatch.setattr(build_mar, "main", recorder)
    return recorder


def test_built_once_then_rebuilt_only_when_something_it_copies_changes(builds: Builds, tmp_path: Path) -> None:
    store = model_store.prepare("fp32")
    assert (store.source, store.demo, len(builds.argv)) == (model_store.DEMO_CKPT, True, 1)
    assert builds.argv[0][builds.argv[0].index("--dtype") + 1] == "fp32"
    model_store.prepare("fp32")
    assert len(builds.argv) == 1
    # The handler code (a git pull), the parts' dtype (another machine), the checkpoint: each makes the store stale.
    (tmp_path / "handler.py").write_text("version = 2\n")
    model_store.prepare("fp32")
    assert len(builds.argv) == 2
    model_store.prepare("fp16")
    assert len(builds.argv) == 3
    stat = model_store.DEMO_CKPT.stat()
    os.utime(model_store.DEMO_CKPT, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    model_store.prepare("fp16")
    assert len(builds.argv) == 4
    model_store.prepare("fp16")
    assert len(builds.argv) == 4


def test_the_store_finds_loras_in_the_users_lora_folder(builds: Builds, tmp_path: Path) -> None:
    """models/Lora (and models/embeddings) are linked, not copied, into the model's folder: a LoRA added while the
    server runs is found."""
    store = model_store.prepare("fp32")
    (model_store.USER_LORAS / "ink.safetensors").write_bytes(b"x")
    assert (store.path / "loras").resolve() == model_store.USER_LORAS.resolve()
    assert (store.path / "loras" / "ink.safetensors").read_bytes() == b"x"
    assert (store.path / "embeddings").resolve() == model_store.USER_EMBEDDINGS.resolve()
    (tmp_path / "handler.py").write_text("version = 2\n")
    assert model_store.prepare("fp32").path == store.path and len(builds.argv) == 2


def test_an_inpainting_checkpoint_is_built_with_the_inpainting_config(
    builds: Builds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's checkpoint picks its config by its UNet's input channels: 9 (RunwayML's inpainting) or 4."""
    from ldm.config import INPAINTING_CONFIG, TEXT_TO_IMAGE_CONFIG, load_config
    from ldm.random_weights import random_state_dict, save_checkpoint

    user = tmp_path / "user" / "model.ckpt"
    user.parent.mkdir()
    monkeypatch.setattr(model_store, "USER_CKPT", user)
    for yaml, config in ((TINY_CONFIG, TEXT_TO_IMAGE_CONFIG), (INPAINTING, INPAINTING_CONFIG)):
        save_checkpoint(random_state_dict(load_config(yaml)), user)
        model_store.prepare("fp32")
        assert builds.argv[-1][builds.argv[-1].index("--config") + 1] == str(config)


def test_a_vae_file_beside_the_users_checkpoint_is_built_in_and_followed(
    builds: Builds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A1111's automatic VAE: `model.vae.safetensors` beside `model.ckpt` replaces its VAE; adding, changing or
    removing it rebuilds the store. The demo model never takes one (`--vae none`: not the file beside it either)."""
    user = tmp_path / "user" / "model.ckpt"
    user.parent.mkdir()
    shutil.copy(TINY_SAFETENSORS, user)
    vae = user.with_name("model.vae.safetensors")
    vae.write_bytes(b"weights")
    (tmp_path / "demo.vae.safetensors").write_bytes(b"weights")
    model_store.prepare("fp32")
    assert builds.argv[-1][builds.argv[-1].index("--vae") + 1] == "none"  # the demo's, whatever lies beside it
    monkeypatch.setattr(model_store, "USER_CKPT", user)
    assert model_store.prepare("fp32").vae == vae
    assert builds.argv[-1][builds.argv[-1].index("--vae") + 1] == str(vae)
    model_store.prepare("fp32")
    assert len(builds.argv) == 2
    vae.write_bytes(b"other weights")
    model_store.prepare("fp32")
    assert len(builds.argv) == 3
    vae.unlink()
    model_store.prepare("fp32")
    assert len(builds.argv) == 4 and builds.argv[-1][builds.argv[-1].index("--vae") + 1] == "none"


def test_a_store_built_by_hand_is_served_as_it_is(builds: Builds) -> None:
    (model_store.MODEL_STORE / model_store.MODEL_NAME).mkdir(parents=True)
    store = model_store.prepare("fp32")
    assert (store.source, store.demo, builds.argv) == (None, False, [])


def test_a_store_serve_sh_built_is_still_its_own_once_its_stamp_is_gone(builds: Builds) -> None:
    """`.torchserve/` deleted (its logs cleared): the store is rebuilt, not taken for one built by hand."""
    model_store.prepare("fp32")
    model_store.STAMP.unlink()
    assert model_store.prepare("fp32").source == model_store.DEMO_CKPT
    assert len(builds.argv) == 2


def test_a_store_an_older_serve_sh_built_is_rebuilt(builds: Builds) -> None:
    """It stamped only the checkpoint, inside the store: its handler code may be any older one."""
    old = model_store.MODEL_STORE / model_store.MODEL_NAME
    old.mkdir(parents=True)
    (old / model_store.OLD_STAMP).write_text("{}")
    assert model_store.prepare("fp32").source == model_store.DEMO_CKPT
    assert len(builds.argv) == 1


def test_a_build_cut_short_is_redone_not_served(builds: Builds) -> None:
    builds.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        model_store.prepare("fp32")
    assert (model_store.MODEL_STORE / model_store.MODEL_NAME).exists()
    model_store.prepare("fp32")
    assert len(builds.argv) == 2


def test_checkpoints_under_other_names_are_named_for_the_demo_warning_not_served(builds: Builds) -> None:
    """serve.sh serves model.ckpt alone; a download under its own name beside it is named (a VAE file is not)."""
    folder = model_store.USER_CKPT.parent
    folder.mkdir(parents=True)
    for name in ("v1-5-pruned-emaonly.safetensors", "model.vae.safetensors", "vae-ft-mse-840000-ema-pruned.safetensors",
                 "notes.txt", "sd-v1-4.ckpt"):  # fmt: skip
        (folder / name).write_bytes(b"")
    model_store.USER_CKPT.symlink_to(folder / "gone.ckpt")  # a link to a file moved away: not a checkpoint here
    assert model_store.other_checkpoints() == ["sd-v1-4.ckpt", "v1-5-pruned-emaonly.safetensors"]
    assert model_store.prepare("fp32").demo
