"""Textual-inversion embeddings (ldm/embeddings.py): the files A1111 and diffusers write, found in prompts as A1111
finds them, and whole images against diffusers' own `load_textual_inversion` on the same weights."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm import embeddings, emphasis
from ldm.checkpoint import read_state_dict
from ldm.embeddings import EmbeddingError, EmbeddingLibrary, Vocabulary, read_vectors
from ldm.generation_request import GenerationRequest
from ldm.parts import load_checkpoint
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_texts import unread_warnings
from ldm.text_encoder import weigh_batch
from ldm.tokenizer import READ_TOKENS, CLIPTokenizer
from tests.hostile_pickles import write_malformed_torch_file
from tests.reference import FLOAT_TOLERANCE, TINY_CONFIG, TINY_SAFETENSORS

HIDDEN = 32  # the tiny model's CLIP width
REQUEST = GenerationRequest(
    "a castle on a hill, tinystyle", negative_prompt="tinyneg, blurry", steps=6, seed=3, height=64, width=64
)
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def vectors(count: int, seed: int, hidden: int = HIDDEN) -> torch.Tensor:
    return torch.randn(count, hidden, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path: Path, tensor: torch.Tensor) -> Path:
    """What A1111's training tab saves: the vectors (a Parameter) under `string_to_param`, with its bookkeeping."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(tensor.clone())},
            "name": path.stem,
            "step": 3000,
            "sd_checkpoint": "8e79c1729f",
            "sd_checkpoint_name": "tiny",
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tinystyle`: 3 vectors in A1111's `.pt`; `tinyneg`: 2 in A1111's `.safetensors`."""
    folder = tmp_path_factory.mktemp("embeddings")
    write_a1111_pt(folder / "tinystyle.pt", vectors(3, 1))
    (folder / "negative").mkdir()
    save_file({"emb_params": vectors(2, 2)}, str(folder / "negative" / "tinyneg.safetensors"))
    return folder


@pytest.fixture(scope="module")
def with_embeddings(embeddings_dir: Path) -> Pipeline:
    return Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG), embeddings_dir=embeddings_dir)


@pytest.mark.parametrize(
    "kind",
    [
        "a1111 pt", "a1111 safetensors", "diffusers bin", "diffusers one vector", "original pt",
        "original pt, torch before 1.12", "torch's older format", "a method's name as an attribute",
    ],
)  # fmt: skip
def test_every_format_gives_its_vectors(tmp_path: Path, kind: str) -> None:
    """A1111's and diffusers' files; the original textual-inversion code's, whose vectors are in a ParameterDict
    (read as data: one pickled by an old torch lacks what today's methods look for); a file in torch's pre-zip
    format (some 2022 files), which torch cannot memory-map; and vectors pickled with an attribute named like a
    tensor method, which must not stand in for it."""
    expected = vectors(4, 5)
    path = tmp_path / "style.bin"
    if kind == "a1111 pt":
        write_a1111_pt(path, expected)
    elif kind == "original pt":
        torch.save({"string_to_token": {"*": torch.tensor(265)},
                    "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(expected)})}, path)  # fmt: skip
    elif kind == "original pt, torch before 1.12":
        old = torch.nn.ParameterDict({"*": torch.nn.Parameter(expected)})
        del old._keys  # what today's ParameterDict methods iterate
        torch.save({"string_to_param": old}, path)
    elif kind == "a method's name as an attribute":
        parameter = torch.nn.Parameter(expected)
        parameter.detach = 5  # type: ignore[method-assign]
        torch.save({"string_to_param": {"*": parameter}}, path)
    elif kind == "torch's older format":
        torch.save({"string_to_param": {"*": expected}}, path, _use_new_zipfile_serialization=False)
    elif kind == "a1111 safetensors":
        save_file({"emb_params": expected}, str(path))
    elif kind == "diffusers bin":
        torch.save({"<style>": expected}, path)
    else:
        expected = expected[:1]
        torch.save({"<style>": expected[0]}, path)
    assert torch.equal(read_vectors(path, HIDDEN), expected)


def write_tar_torch_file(path: Path) -> Path:
    """A file in torch's oldest format, a tar of `storages`, `tensors` and `pickle` (torch 0.3 and before)."""
    with tarfile.open(path, "w") as archive:
        for name in ("storages", "tensors", "pickle"):
            archive.addfile(tarfile.TarInfo(name))
    return path


def torch_file(data: bytes) -> Callable[[Path], Path]:
    """A writer of `data` as a `.pt` file (a damaged download)."""

    def write(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return write


def renamed_storage(path: Path) -> Path:
    """An embedding in torch's older format whose storage type is misspelt: a global refused, where torch wants one."""
    torch.save({"string_to_param": {"*": vectors(1, 0)}}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes().replace(b"FloatStorage", b"FloatStoragX"))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # Damaged downloads that once escaped as other errors, failing every request of the worker: a string of
        # 6.5 exabytes, one past any size, and a refused global where torch wants a storage type.
        (torch_file(b"\x8d" + struct.pack("<Q", 0x59DDD75ECCE44E39)), "cannot be read: MemoryError"),
        (torch_file(b"\x80\x02\x8e" + struct.pack("<Q", 2**63 + 5)), "cannot be read: OverflowError"),
        (renamed_storage, "cannot be read: AttributeError"),
        ({"emb_params": vectors(2, 0, 1024)}, r"shape \(2, 1024\); this model's CLIP reads 32 .* another model"),
        ({"a": vectors(1, 0), "b": vectors(1, 1)}, "holds 2 tensors where an embedding file holds one"),
        ({"emb_params": torch.full((1, HIDDEN), float("nan"))}, "1 to 75 finite vectors"),
        (b"\x00 not a file of tensors", "cannot be read"),
        (write_malformed_torch_file, "cannot be read: ValueError"),
        (write_tar_torch_file, "cannot be read: torch's oldest \\(tar\\) format"),
        # A number type torch loads that is no vector's.
        ({"emb_params": torch.zeros(1, HIDDEN, dtype=torch.int16)}, "numbers of type torch.int16"),
    ],
)
def test_files_it_cannot_use_are_named(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "odd.safetensors"
    if callable(content):
        path = content(tmp_path / "odd.pt")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, str(path))
    with pytest.raises(EmbeddingError, match=f"embedding 'odd'.*{message}"):
        read_vectors(path, HIDDEN)


def test_an_embedding_holds_at_most_the_75_vectors_clip_reads(tmp_path: Path) -> None:
    """75 vectors fill every position CLIP reads (a prompt of the word alone reads them all); one more could never
    be read whole, and is refused."""
    widest = vectors(READ_TOKENS, 4)
    save_file({"emb_params": widest}, str(tmp_path / "widest.safetensors"))
    save_file({"emb_params": vectors(READ_TOKENS + 1, 4)}, str(tmp_path / "wider.safetensors"))
    assert torch.equal(read_vectors(tmp_path / "widest.safetensors", HIDDEN), widest)
    [embedding] = EmbeddingLibrary(tmp_path, CLIPTokenizer(), HIDDEN).vocabulary().embeddings
    assert Vocabulary([embedding]).read(CLIPTokenizer(), "widest") == ([embedding], [])
    with pytest.raises(EmbeddingError, match=f"embedding 'wider' must hold 1 to {READ_TOKENS} .*, got 76"):
        read_vectors(tmp_path / "wider.safetensors", HIDDEN)


def test_a_name_is_found_as_a_word_and_the_longest_wins(with_embeddings: Pipeline, tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer()
    vocabulary = with_embeddings.embeddings.vocabulary()
    assert sorted(e.name for e in vocabulary.embeddings) == ["tinyneg", "tinystyle"]
    [style] = [e for e in vocabulary.embeddings if e.name == "tinystyle"]
    assert len(style.tokens) > 1  # a name of several tokens: the test is of runs, not of single ids
    slots = vocabulary.expand(tokenizer.tokenize("a TinyStyle castle"))
    assert slots == [*tokenizer.tokenize("a"), style, *tokenizer.tokenize("castle")]
    assert vocabulary.expand(tokenizer.tokenize("tinystyles")) == tokenizer.tokenize("tinystyles")
    longer = dataclasses.replace(style, name="tinystyle castle", tokens=tuple(tokenizer.tokenize("tinystyle castle")))
    both = Vocabulary([style, longer])
    assert both.expand(tokenizer.tokenize("a tinystyle castle")) == [*tokenizer.tokenize("a"), longer]


@pytest.fixture(scope="module")
def peer(embeddings_dir: Path) -> Any:
    """diffusers on the tiny weights with the same two files, loaded by its own `load_textual_inversion` (which adds
    tokens to its tokenizer and rows to its CLIP: a model of its own)."""
    from scripts.peers import diffusers_pipeline

    model = load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)
    pipe = diffusers_pipeline(model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    pipe.load_textual_inversion(str(embeddings_dir / "tinystyle.pt"), token="tinystyle")
    pipe.load_textual_inversion(str(embeddings_dir / "negative" / "tinyneg.safetensors"), token="tinyneg")
    return pipe


def test_images_match_diffusers_loading_the_same_files(with_embeddings: Pipeline, peer: Any) -> None:
    """An embedding in the prompt and another in the negative prompt: the same image as diffusers', within the
    reference tolerance; and not the image without them."""
    from scripts.peers import call_arguments

    ours = with_embeddings.generate(REQUEST).pixels[0]
    theirs = peer(**call_arguments(REQUEST)).images[0]
    assert np.abs(ours - theirs * 255.0).max() < FLOAT_TOLERANCE
    without = Pipeline(with_embeddings.model).generate(REQUEST).pixels[0]
    assert np.abs(ours - without).mean() > 1


def test_pngs_name_the_embeddings_read_with_their_hashes(with_embeddings: Pipeline, embeddings_dir: Path) -> None:
    """A1111's `TI hashes`: each embedding the prompt or the negative prompt named, with its file's SHA-256."""
    generation = with_embeddings.generate(REQUEST)
    style, neg = (
        hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for path in (embeddings_dir / "tinystyle.pt", embeddings_dir / "negative" / "tinyneg.safetensors")
    )
    assert generation.embedding_hashes == (("tinystyle", style), ("tinyneg", neg))
    text = parameters_text(generation.request, 3, "", generation.lora_hashes, generation.embedding_hashes)
    assert text.endswith(f'Size: 64x64, RNG: CPU, Emphasis: None, TI hashes: "tinystyle: {style}, tinyneg: {neg}"')
    plain = with_embeddings.generate(dataclasses.replace(REQUEST, prompt="a castle", negative_prompt=""))
    assert plain.embedding_hashes == ()
    # Read at a negative weight (A1111's syntax), an embedding is still read, and named as A1111 names it.
    weighted = dataclasses.replace(REQUEST, prompt="a castle BREAK (tinystyle:-1)", negative_prompt="", emphasis=True)
    assert [name for name, _ in with_embeddings.generate(weighted).embedding_hashes] == ["tinystyle"]
    # In A1111's syntax, every text its prompt editing reads (here one the run's later steps alone read), and the
    # negative prompt's.
    edited = dataclasses.replace(REQUEST, prompt="a [castle:tinystyle:0.5]", negative_prompt="tinyneg", emphasis=True)
    assert with_embeddings.generate(edited).embedding_hashes == (("tinystyle", style), ("tinyneg", neg))


def test_a1111_syntax_keeps_an_embedding_in_one_chunk(with_embeddings: Pipeline) -> None:
    """With 74 tokens before it, a 3-vector embedding does not fit the first chunk: it opens the second, as in
    A1111, with the weight of its brackets."""
    tokenizer = CLIPTokenizer()
    vocabulary = with_embeddings.embeddings.vocabulary()
    [style] = [e for e in vocabulary.embeddings if e.name == "tinystyle"]
    words = "wave " * 74
    first, second = emphasis.chunks(tokenizer, f"{words}(tinystyle:1.2) castle", vocabulary)
    assert first.ids[1:75] == tuple(tokenizer.tokenize(words)) and first.ids[75:] == (tokenizer.eos_id,) * 2
    assert all(torch.equal(a, b) for a, b in zip(second.ids[1:4], style.vectors, strict=True))
    assert second.weights[1:4] == (1.2, 1.2, 1.2) and second.ids[4] == tokenizer.tokenize("castle")[0]
    # The pipeline conditions on exactly these two chunks, the embedding's vectors among them.
    [conditioning] = with_embeddings.prompts.conditions(
        [dataclasses.replace(REQUEST, prompt=f"{words}(tinystyle:1.2) castle", emphasis=True)]
    )
    (((_, condition),),) = conditioning.prompts
    with torch.inference_mode():
        hidden = with_embeddings.model.text_encoder.encode([first.ids, second.ids])
        weighed = [
            weigh_batch([(h, torch.tensor(c.weights), 1)])[0] for h, c in zip(hidden, (first, second), strict=True)
        ]
    assert torch.equal(condition, torch.cat(weighed)[None].to(condition.dtype))


def test_words_past_75_count_an_embedding_per_vector(with_embeddings: Pipeline) -> None:
    """Plain prompts are cut at 75 positions, an embedding's vectors among them, and an embedding that does not fit
    whole is left out whole: the warning counts what is left out, the embedding by its word; the PNG's TI hashes
    name only what CLIP read."""
    request = dataclasses.replace(REQUEST, prompt="wave " * 73 + "tinystyle castle", negative_prompt="")
    vocabulary = with_embeddings.embeddings.vocabulary()
    [line] = unread_warnings(CLIPTokenizer(), request, vocabulary)
    assert line == f"prompt: CLIP reads {READ_TOKENS} tokens; the 4 after them were left out: tinystyle castle"
    cut = with_embeddings.generate(request)
    assert cut.embedding_hashes == () and cut.warnings == (line,)
    alone = with_embeddings.generate(dataclasses.replace(request, prompt="wave " * 73))
    assert np.array_equal(cut.pixels, alone.pixels)  # what CLIP read is the 73 waves alone
    fits = dataclasses.replace(request, prompt="wave " * 72 + "tinystyle")
    assert unread_warnings(CLIPTokenizer(), fits, vocabulary) == ()
    assert [name for name, _ in with_embeddings.generate(fits).embedding_hashes] == ["tinystyle"]


def test_a_name_two_files_share_reads_the_first_and_a_name_no_prompt_spells_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two files of one name (in two subfolders) make one word, the first file in path order, as for LoRAs: the
    same vectors and hash whatever was added since. A file whose name has no tokens (a blank one) is no word at all:
    left out and said in the log, while the others are read."""
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        save_file({"emb_params": vectors(1, seed)}, str(tmp_path / folder / "glow.safetensors"))
    save_file({"emb_params": vectors(1, 3)}, str(tmp_path / " .safetensors"))
    with caplog.at_level("WARNING", logger="ldm.embeddings"):
        [glow] = EmbeddingLibrary(tmp_path, CLIPTokenizer(), HIDDEN).vocabulary().embeddings
    assert glow.name == "glow" and torch.equal(glow.vectors, vectors(1, 1))
    assert glow.short_hash == hashlib.sha256((tmp_path / "a" / "glow.safetensors").read_bytes()).hexdigest()[:12]
    [record] = caplog.records
    assert record.getMessage().startswith("embedding ' ': its name has no tokens to find in a prompt")


def test_the_folder_is_read_again_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file added is found on the next reading, without a restart; one that cannot be read is left out (its name
    stays a word) and said once in the log, so one bad download never fails every request."""
    library = EmbeddingLibrary(tmp_path, CLIPTokenizer(), HIDDEN)
    assert library.vocabulary().embeddings == ()
    save_file({"emb_params": vectors(1, 3)}, str(tmp_path / "glow.safetensors"))
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    with caplog.at_level("WARNING", logger="ldm.embeddings"):
        assert [e.name for e in library.vocabulary().embeddings] == ["glow"]
        assert [e.name for e in library.vocabulary().embeddings] == ["glow"]  # unchanged: not read, nor said, again
    [record] = caplog.records
    assert record.getMessage().startswith("embedding 'broken' cannot be read")
    (tmp_path / "broken.pt").unlink()
    library.vocabulary()
    assert set(library.files) == {tmp_path / "glow.safetensors"}
    # Whatever else reading a file raises is still that file's (nothing else reads it).
    (tmp_path / "odd.pt").write_bytes(b"odd")
    with monkeypatch.context() as patch:
        patch.setattr(embeddings, "read_vectors", lambda *_: 1 / 0)
        assert [e.name for e in library.vocabulary().embeddings] == ["glow"]
    assert "embedding 'odd' cannot be read: ZeroDivisionError" in str(library.files[tmp_path / "odd.pt"][1])
    # A file changed in place (retrained, with more vectors) is read again: its new vectors are the word's.
    save_file({"emb_params": vectors(2, 4)}, str(tmp_path / "glow.safetensors"))
    [glow] = library.vocabulary().embeddings
    assert torch.equal(glow.vectors, vectors(2, 4))
    # A path that cannot be opened (as a file the worker may not read) is the file's error too, not a crash.
    locked = tmp_path / "locked.pt"
    locked.mkdir()
    with pytest.raises(EmbeddingError, match=r"embedding 'locked' cannot be read: .*Is a directory"):
        read_vectors(locked, HIDDEN)
