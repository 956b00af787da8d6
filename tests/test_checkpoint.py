"""Loading original checkpoints: strict key checks with clear errors, and pickles that cannot run code."""

from __future__ import annotations

import contextlib
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, read_state_dict, split_state_dict
from ldm.config import load_config, parse_config
from ldm.generation_request import GenerationRequest
from ldm.parts import load_checkpoint
from ldm.pipeline import Pipeline
from ldm.safe_pickle import UnsafeCheckpointError
from tests.hostile_pickles import (
    REFUSED_ARGUMENT,
    SHORT_STORAGE,
    ClaimsMemory,
    RunsCode,
    torch_save_call,
    write_torch_file_with_pickle,
    write_torchscript_archive,
)
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return read_state_dict(TINY_SAFETENSORS)


def error_of(state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(CheckpointError) as info:
        split_state_dict(state, load_config(TINY_CONFIG))
    return str(info.value)


def test_missing_key_is_named(state: dict) -> None:
    del state[UNET_KEY]
    message = error_of(state)
    assert "1 missing" in message and UNET_KEY in message and str(TINY_CONFIG) in message


def test_unexpected_keys_are_named(state: dict) -> None:
    state["model.diffusion_model.extra.weight"] = torch.ones(1)
    state["some_other_model.weight"] = torch.ones(1)
    message = error_of(state)
    assert "2 unexpected" in message
    assert "model.diffusion_model.extra.weight" in message and "some_other_model.weight" in message


def test_misshaped_key_names_both_shapes(state: dict) -> None:
    state[UNET_KEY] = torch.ones(5, 4, 3, 3)
    assert f"{UNET_KEY}: checkpoint [5, 4, 3, 3], config [32, 4, 3, 3]" in error_of(state)


def test_wrong_schedule_is_refused(state: dict) -> None:
    raw = OmegaConf.load(TINY_CONFIG)
    raw.model.params.linear_end = 0.02
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        split_state_dict(state, parse_config(raw, "other.yaml"))


def test_ignored_keys_are_ignored_by_name_only(state: dict) -> None:
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.ones(3)
    parts = split_state_dict(state, load_config(TINY_CONFIG))
    assert "embeddings.position_ids" not in parts["text_encoder"]
    assert parts["unet"]["input_blocks.0.0.weight"] is state[UNET_KEY]


def test_checkpoint_without_state_dict_wrapper_loads(state: dict, tmp_path: Path) -> None:
    path = tmp_path / "flat.ckpt"
    torch.save(state, path)
    assert torch.equal(read_state_dict(path)[UNET_KEY], state[UNET_KEY])


def test_the_format_is_read_from_the_file_not_its_name(state: dict, tmp_path: Path) -> None:
    """A safetensors download saved as model.ckpt (the path serve.sh looks at) loads; a folder in a checkpoint's
    place is one clear error."""
    renamed = tmp_path / "model.ckpt"
    shutil.copy(TINY_SAFETENSORS, renamed)
    loaded = read_state_dict(renamed)
    assert loaded.keys() == state.keys() and torch.equal(loaded[UNET_KEY], state[UNET_KEY])
    (tmp_path / "folder.ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"folder\.ckpt: cannot read it: Is a directory"):
        read_state_dict(tmp_path / "folder.ckpt")


class _PlainObject:
    """Any object of a custom class: unpickling it would import and instantiate that class."""


@pytest.mark.parametrize("where", ["top level", "inside state_dict"])
def test_pickle_that_runs_code_is_refused_and_code_does_not_run(state: dict, tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    payload = RunsCode(marker)
    checkpoint = (
        {"state_dict": {**state, "evil": payload}}
        if where == "inside state_dict"
        else {"state_dict": state, "evil": payload}
    )
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError, match=r"would call (posix|os)\.system"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")  # making the archive
def test_a_torchscript_archive_is_refused_before_its_code_runs(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """torch.load hands a TorchScript zip to torch.jit.load, whatever the pickle module, and that runs the archive's
    own compiled code (here a print; it could write files): refused by its records, before torch opens it."""
    path = write_torchscript_archive(tmp_path / "model.ckpt", "the archive's code ran")
    with pytest.raises(UnsafeCheckpointError, match="a TorchScript archive"):
        read_state_dict(path)
    assert "the archive's code ran" not in capfd.readouterr().out


def test_pickle_that_builds_an_object_is_refused(state: dict, tmp_path: Path) -> None:
    path = tmp_path / "object.ckpt"
    torch.save({"state_dict": state, "thing": _PlainObject()}, path)
    with pytest.raises(UnsafeCheckpointError) as error:
        read_state_dict(path)
    assert str(error.value).startswith(f"{path}: refusing to load: the checkpoint would build an object of ")
    assert "_PlainObject, which is not a tensor or plain data" in str(error.value)


def test_lightning_metadata_loads_without_importing_lightning(state: dict, tmp_path: Path) -> None:
    """SD v1 .ckpt files key their callback state by the ModelCheckpoint class; that reference must not import it."""
    module_name = "pytorch_lightning_stand_in_model_checkpoint"
    fake = types.ModuleType(module_name)

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module_name, "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    sys.modules[module_name] = fake
    try:
        path = tmp_path / "lightning.ckpt"
        torch.save(
            {
                "epoch": 6,
                "global_step": 470000,
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {
                    ModelCheckpoint: {
                        "monitor": None,
                        "best_model_score": np.float64(0.12),
                        "current_score": torch.tensor(0.5),
                    }
                },
                "state_dict": state,
            },
            path,
        )
    finally:
        del sys.modules[module_name]
    loaded = read_state_dict(path)
    assert module_name not in sys.modules
    assert torch.equal(loaded[UNET_KEY], state[UNET_KEY])


def test_fp16_checkpoint_loads_as_fp32_and_matches(state: dict, tmp_path: Path) -> None:
    path = tmp_path / "half.ckpt"
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in state.items()}}, path)
    request = GenerationRequest("a red bicycle", height=64, width=64, steps=4, seed=3)
    half = Pipeline(load_checkpoint(path, TINY_CONFIG)).generate(request)
    full = Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)).generate(request)
    assert half.pixels.dtype == np.float32
    # Weights rounded to fp16 move pixels a little, but nowhere near a different image.
    assert np.abs(half.pixels - full.pixels).mean() < 2.0


def test_float8_checkpoint_loads_as_its_values_in_fp32(state: dict, tmp_path: Path) -> None:
    """Stored in float8 (torch saves it with an untyped storage and a dtype of its own): read, and every weight the
    float8 value it holds, as float32."""
    small = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "fp8.ckpt"
    torch.save({"state_dict": small}, path)
    model = load_checkpoint(path, TINY_CONFIG)
    weight = model.unet.input_blocks[0][0].weight
    assert weight.dtype == torch.float32 and torch.equal(weight, small[UNET_KEY].float())


def test_a_pickle_that_calls_the_untyped_storage_it_may_name_is_refused(state: dict, tmp_path: Path) -> None:
    """Float8 files name torch.UntypedStorage, so it resolves; to a stand-in, which a call does not allocate with."""
    path = tmp_path / "terabyte.ckpt"
    torch.save({"state_dict": state, "x": ClaimsMemory()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"would call torch\.storage\.UntypedStorage"):
        read_state_dict(path)


def test_a_pickle_naming_a_torch_function_as_torch_exports_it_is_refused(tmp_path: Path) -> None:
    """By the name torch exports them under (`torch.float16`), only dtypes resolve, as torch saves a tensor's type;
    any other global there (`torch.save`, which writes a file where the pickle says) stays an inert reference, whose
    call is refused before it writes anything."""
    marker = tmp_path / "pwned"
    path = write_torch_file_with_pickle(tmp_path / "evil.ckpt", torch_save_call(marker))
    with pytest.raises(UnsafeCheckpointError, match=r"would call torch\.save,"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("pickled", "error"), [(SHORT_STORAGE, "ValueError"), (REFUSED_ARGUMENT, "TypeError")], ids=["storage", "argument"]
)
def test_a_damaged_torch_file_is_an_unreadable_checkpoint(tmp_path: Path, pickled: bytes, error: str) -> None:
    """What torch's reader trips on in a damaged file, whatever error it raises, is the file's: a CheckpointError
    naming it, which a server reports as a bad checkpoint, not a crash of its own."""
    path = write_torch_file_with_pickle(tmp_path / "damaged.ckpt", pickled)
    with pytest.raises(CheckpointError, match=rf"damaged\.ckpt: not a readable torch checkpoint \({error}: "):
        read_state_dict(path)


@pytest.mark.parametrize(
    "poison",
    [
        b"ctorch.storage\nUntypedStorage\n}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00xsb.",  # the stand-in's dtype
        b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x07\x85s\x86b.",  # a function's
    ],
    ids=["stand-in", "function"],
)
def test_what_one_pickle_sets_on_what_it_names_does_not_reach_the_next(
    state: dict, tmp_path: Path, poison: bytes
) -> None:
    """BUILD sets attributes on the object before it: on an allowed function or stand-in shared by the process, one
    hostile file would change how every later one is read. Each load gets its own."""
    import io

    from ldm import safe_pickle

    with contextlib.suppress(AttributeError):  # a stand-in without such an attribute: refused at once
        safe_pickle.load(io.BytesIO(poison))
    path = tmp_path / "fp8.ckpt"
    torch.save({"state_dict": {UNET_KEY: state[UNET_KEY].to(torch.float8_e4m3fn)}}, path)
    assert read_state_dict(path)[UNET_KEY].dtype == torch.float8_e4m3fn


def test_a_file_garbled_after_it_named_a_class_is_damaged_not_hostile() -> None:
    """A pickle garbled after naming Lightning's ModelCheckpoint never asked to build one: it is unreadable."""
    import io

    from ldm import safe_pickle

    with pytest.raises(safe_pickle.MalformedCheckpointError, match="invalid load key"):
        safe_pickle.load(io.BytesIO(b"\x80\x02cpytorch_lightning.callbacks\nModelCheckpoint\n\xff"))


def test_text_encoder_keys_of_old_transformers_are_read(state: dict) -> None:
    """Before transformers 4.17 a CLIPTextModel had no `text_model.` level; A1111 reads such checkpoints too."""
    new = "cond_stage_model.transformer.text_model."
    old = {k.replace(new, "cond_stage_model.transformer.", 1): v for k, v in state.items()}
    assert not any(k.startswith(new) for k in old)
    parts = split_state_dict(old, load_config(TINY_CONFIG))
    assert parts == split_state_dict(state, load_config(TINY_CONFIG))


def test_a_state_dict_entry_among_the_weights_is_dropped(state: dict, tmp_path: Path) -> None:
    path = tmp_path / "merged.ckpt"
    torch.save({"state_dict": {**state, "state_dict": {}}}, path)
    assert read_state_dict(path).keys() == state.keys()


def test_a_weight_that_is_not_floating_point_is_named(state: dict) -> None:
    """An integer weight would pass the split and fail in the server that loads the parts: named here."""
    state[UNET_KEY] = state[UNET_KEY].long()
    assert f"1 not floating-point: {UNET_KEY}: torch.int64" in error_of(state)
