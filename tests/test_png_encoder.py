"""The parallel PNG encoder: files any decoder reads back to the same pixels and text, as small as one pass makes.

PIL decodes (an independent implementation); the chunk walk below checks every CRC and lets zlib itself verify the
pieced stream, Adler-32 included.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm.png_encoder import PIECE_BYTES, encode_pngs
from scripts.bench_png import noise, photograph_like, pil_pngs


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, after checking the signature and each CRC."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    found, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + data), f"bad CRC in {kind!r}"
        found.append((kind, data))
        at += 12 + length
    return found


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 64), (300, 401), (512, 512)])
def test_decoders_read_back_the_same_pixels(shape: tuple[int, int]) -> None:
    images = [noise(*shape, seed=1), photograph_like(*shape)]
    for image, png in zip(images, encode_pngs(images, [{}, {}]), strict=True):
        kinds = [kind for kind, _ in chunks(png)]
        assert kinds == [b"IHDR", b"IDAT", b"IEND"]
        with Image.open(io.BytesIO(png)) as decoded:
            assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
            assert np.array_equal(np.asarray(decoded), image)


def test_a_multi_piece_stream_is_one_valid_zlib_stream() -> None:
    image = photograph_like(512, 512)
    assert image.nbytes > 4 * PIECE_BYTES, "the image must span several pieces"
    (idat,) = [data for kind, data in chunks(encode_pngs([image], [{}])[0]) if kind == b"IDAT"]
    scanlines = zlib.decompress(idat)  # raises on a broken stream or a wrong Adler-32
    rows = np.frombuffer(scanlines, np.uint8).reshape(512, 1 + 512 * 3)
    assert (rows[:, 0] == 2).all(), "every row uses the Up filter"
    assert np.array_equal(np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8), image.reshape(512, -1))


def test_pieces_keep_the_previous_window_as_their_dictionary() -> None:
    """A 16 KiB random block repeated: one pass compresses it to about one block; pieces that started from an empty
    window would each pay the block again as literals."""
    block = np.random.default_rng(2).integers(0, 256, 16384, dtype=np.uint8)
    rows = np.tile(block, 48).reshape(256, -1)  # 3072 bytes per row: 1024 RGB pixels, rows unlike their neighbours
    image = rows.reshape(256, 1024, 3)
    (idat,) = [data for kind, data in chunks(encode_pngs([image], [{}])[0]) if kind == b"IDAT"]
    assert image.nbytes > 5 * PIECE_BYTES
    single_pass = len(zlib.compress(zlib.decompress(idat), 6))
    assert len(idat) < single_pass + 1024, (len(idat), single_pass)


def test_files_are_near_pil_size_on_photograph_like_images() -> None:
    """The Up filter against PIL's per-row choice of five: a few per cent, not a regression in kind."""
    image = photograph_like(512, 512)
    ours, pil = encode_pngs([image], [{}])[0], pil_pngs([image], [""])[0]
    assert len(ours) < 1.08 * len(pil), (len(ours), len(pil))
    assert len(ours) < 0.8 * image.nbytes, "it compresses"


@pytest.mark.parametrize("text", ["a lighthouse at dawn\nSteps: 50, Seed: 1", "café", "灯台 🌅 ü"])
def test_text_chunks_read_back(text: str) -> None:
    png = encode_pngs([np.zeros((2, 2, 3), np.uint8)], [{"parameters": text, "Software": "sd"}])[0]
    kinds = [kind for kind, _ in chunks(png)]
    latin1 = all(ord(c) < 256 for c in text)
    assert kinds == [b"IHDR", b"tEXt" if latin1 else b"iTXt", b"tEXt", b"IDAT", b"IEND"]
    with Image.open(io.BytesIO(png)) as decoded:
        decoded.load()
        assert decoded.text == {"parameters": text, "Software": "sd"}  # type: ignore[attr-defined]


def test_no_images_no_files() -> None:
    assert encode_pngs([], []) == []
