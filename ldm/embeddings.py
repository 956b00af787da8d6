"""Textual-inversion embeddings: a word in a prompt that stands for vectors learned for it, as AUTOMATIC1111 reads them.

A file `name.pt` (or `.bin`, `.safetensors`) in the embeddings folder makes the word `name` in any prompt or negative
prompt stand for its n vectors: CLIP reads them where the word's tokens were, in place of those tokens' own
embeddings. Shared SD v1 embeddings are mostly of this kind, and many are meant for the negative prompt
("bad-hands", "easynegative").

Where the word is found, as A1111 finds it: the name is tokenized like any text, and a run of a prompt's tokens equal
to a name's tokens is that embedding (the longest name wins where two start alike). So `name` is found as a word,
whatever its case, but not inside another word, whose tokens differ.

Formats read: A1111's `.pt` (`string_to_param` holding one tensor), its `.safetensors` (`emb_params`), and diffusers'
`learned_embeds` files (one tensor under the token's name). Each holds (n, 768) vectors for SD v1's CLIP, or one
(768,) vector.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldm.checkpoint import FLOAT_DTYPES, CheckpointError, files_in, is_safetensors
from ldm.safe_pickle import UnsafeCheckpointError, torch_load
from ldm.tokenizer import READ_TOKENS, CLIPTokenizer

logger = logging.getLogger(__name__)
SUFFIXES = (".pt", ".bin", ".safetensors")
# A1111's key for the vectors in its `.safetensors` files; its `.pt` files keep them under `string_to_param`.
A1111_SAFETENSORS_KEY = "emb_params"
A1111_PT_KEY = "string_to_param"


class EmbeddingError(ValueError):
    """An embedding file this model cannot use; the message says which and why."""


def read_vectors(path: Path, hidden_size: int) -> torch.Tensor:
    """The (n, hidden_size) float32 vectors of an embedding file, copied out of it."""
    try:
        if is_safetensors(path):
            loaded: object = load_file(str(path))
        else:
            loaded = torch_load(str(path))
    except (
        SafetensorError, CheckpointError, UnsafeCheckpointError, pickle.UnpicklingError, RuntimeError, EOFError, OSError
    ) as error:  # fmt: skip
        raise EmbeddingError(f"embedding '{path.stem}' cannot be read: {error}") from None
    except (MemoryError, AttributeError) as error:
        # torch's reader on a damaged file of a few kB: a length past any memory, a refused global where it wants a
        # storage type (its stand-in has no `dtype`).
        raise EmbeddingError(f"embedding '{path.stem}' cannot be read: {type(error).__name__}: {error}") from None
    tensors = list(_tensors(loaded))
    if len(tensors) != 1:
        raise EmbeddingError(
            f"embedding '{path.stem}' holds {len(tensors)} tensors where an embedding file holds one (A1111's "
            f"{A1111_PT_KEY} or {A1111_SAFETENSORS_KEY}, or diffusers' learned_embeds)"
        )
    # A fresh tensor on its storage, without the attributes a pickle may have given it (one named like a method).
    tensor = torch.Tensor.detach(tensors[0])
    if tensor.dtype not in FLOAT_DTYPES:
        raise EmbeddingError(f"embedding '{path.stem}' holds numbers of type {tensor.dtype}, which it cannot read")
    vectors = tensor.float().clone()
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or vectors.shape[1] != hidden_size:
        raise EmbeddingError(
            f"embedding '{path.stem}' has vectors of shape {tuple(tensor.shape)}; this model's CLIP reads "
            f"{hidden_size} numbers a token: it is an embedding for another model (SD 2: 1024, SDXL: two CLIPs)"
        )
    if not 1 <= vectors.shape[0] <= READ_TOKENS or not bool(vectors.isfinite().all()):
        raise EmbeddingError(
            f"embedding '{path.stem}' must hold 1 to {READ_TOKENS} finite vectors, got {vectors.shape[0]}"
        )
    return vectors


def _tensors(loaded: object) -> Iterator[torch.Tensor]:
    """The tensors an embedding file holds where its format keeps them: A1111's `.pt` under `string_to_param`,
    anything else at the top level."""
    if isinstance(loaded, dict):
        held = loaded.get(A1111_PT_KEY)
        if isinstance(held, torch.nn.ParameterDict):
            # The original textual-inversion code's, read as data: none of its methods run (and a ParameterDict
            # pickled by a torch before 1.12 has none of the attributes today's methods look for).
            held = vars(held).get("_parameters")
        if isinstance(held, dict):
            loaded = held
    if isinstance(loaded, dict):
        yield from (value for value in loaded.values() if isinstance(value, torch.Tensor))


@dataclass(frozen=True)
class Embedding:
    """One embedding: its name, the name's tokens (how a prompt spells it), its vectors, and the short hash A1111
    writes in a PNG's `TI hashes` (the first 12 hex digits of its file's SHA-256)."""

    name: str
    tokens: tuple[int, ...]
    vectors: torch.Tensor
    short_hash: str


# A prompt's tokens after embeddings are found: a token id, or an embedding's vectors, which stay together.
Slot = int | Embedding


class Vocabulary:
    """The embeddings a prompt may name, found in its tokens (`expand`)."""

    def __init__(self, embeddings: Sequence[Embedding] = ()) -> None:
        self.embeddings = tuple(embeddings)
        self.starting: dict[int, list[Embedding]] = {}
        for embedding in sorted(self.embeddings, key=lambda e: -len(e.tokens)):
            self.starting.setdefault(embedding.tokens[0], []).append(embedding)

    def expand(self, tokens: Sequence[int]) -> list[Slot]:
        """`tokens` with every run that spells an embedding's name replaced by that embedding."""
        slots: list[Slot] = []
        position = 0
        while position < len(tokens):
            found = next(
                (
                    embedding
                    for embedding in self.starting.get(tokens[position], ())
                    if tuple(tokens[position : position + len(embedding.tokens)]) == embedding.tokens
                ),
                None,
            )
            if found is None:
                slots.append(tokens[position])
                position += 1
            else:
                slots.append(found)
                position += len(found.tokens)
        return slots

    def read(self, tokenizer: CLIPTokenizer, text: str) -> tuple[list[Slot], list[Slot]]:
        """A plain text's slots as CLIP reads them: those that fit its 75 positions whole, then those left out (an
        embedding that would not fit whole is left out whole, as A1111 moves it to its next chunk)."""
        slots = self.expand(tokenizer.tokenize(text))
        used = 0
        for index, slot in enumerate(slots):
            if used + width(slot) > READ_TOKENS:
                return slots[:index], slots[index:]
            used += width(slot)
        return slots, []

    def unread(self, tokenizer: CLIPTokenizer, text: str) -> tuple[int, str]:
        """How many of a plain text's positions CLIP never sees (past the 75 it reads: an embedding takes one per
        vector), and their text, an embedding's by its word."""
        _, left_out = self.read(tokenizer, text)
        words = [token for slot in left_out for token in ([slot] if isinstance(slot, int) else slot.tokens)]
        return sum(width(slot) for slot in left_out), tokenizer.decode(words) if words else ""


def width(slot: Slot) -> int:
    """How many of CLIP's 75 positions a slot takes: a token one, an embedding one per vector."""
    return 1 if isinstance(slot, int) else slot.vectors.shape[0]


def flatten(slots: Sequence[Slot]) -> list[int | torch.Tensor]:
    """One entry per CLIP position: a token id, or one vector of an embedding."""
    return [part for slot in slots for part in ([slot] if isinstance(slot, int) else list(slot.vectors))]


class EmbeddingLibrary:
    """The embeddings folder, read again whenever its files change: files added while a server runs are found on its
    next request. Each file is read once while it is unchanged on disk."""

    def __init__(self, folder: Path | None, tokenizer: CLIPTokenizer, hidden_size: int) -> None:
        self.folder = folder
        self.tokenizer = tokenizer
        self.hidden_size = hidden_size
        self.files: dict[Path, tuple[tuple[int, int], Embedding | EmbeddingError]] = {}

    def vocabulary(self) -> Vocabulary:
        """Every embedding of the folder that can be read. A file that cannot is left out of the vocabulary (its
        name stays a word) and said once in the log, so one bad download never fails every request."""
        embeddings: dict[str, Embedding] = {}
        seen = set()
        for path in files_in(self.folder, SUFFIXES):
            seen.add(path)
            entry = self._entry(path)
            if isinstance(entry, Embedding):
                embeddings.setdefault(entry.name, entry)  # the first in path order, as for LoRAs
        for gone in set(self.files) - seen:
            del self.files[gone]
        return Vocabulary(list(embeddings.values()))

    def _entry(self, path: Path) -> Embedding | EmbeddingError:
        """The embedding of one file, or why it cannot be one: read again only when the file changed."""
        try:
            stat = path.stat()
        except OSError as error:
            return EmbeddingError(f"embedding '{path.stem}' cannot be read: {error}")
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self.files.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            tokens = tuple(self.tokenizer.tokenize(path.stem))
            if not tokens:
                raise EmbeddingError(f"embedding '{path.stem}': its name has no tokens to find in a prompt")
            vectors = read_vectors(path, self.hidden_size)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # an embedding file is a few kB
            entry: Embedding | EmbeddingError = Embedding(path.stem, tokens, vectors, digest)
        except EmbeddingError as error:
            entry = error
        except Exception as error:  # anything else a damaged file makes a reader raise: still this file's alone
            entry = EmbeddingError(f"embedding '{path.stem}' cannot be read: {type(error).__name__}: {error}")
        if isinstance(entry, EmbeddingError):
            logger.warning("%s: left out of the embeddings, its name stays a word", entry)
        self.files[path] = (stamp, entry)
        return entry
