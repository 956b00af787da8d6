"""A1111's `POST /sdapi/v1/png-info` (front/png_info.py): a PNG's text chunks as PIL reads them, and infotexts read
into fields as A1111 1.9 reads them, checked against fields written out by hand."""

from __future__ import annotations

import base64
import io
import itertools
import json
import random
import re
import signal
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from front import a1111
from front.app import create_app
from front.png_info import ABSENT, MAX_TEXT, PARAMETER, SIGNATURE, parameters, parse_infotext, png_texts
from front.settings import FrontSettings
from ldm.generation_request import (
    A1111_AUTOMATIC_NOT_UNIFORM,
    MASKED_CONTENTS,
    SAMPLERS,
    GenerationError,
    GenerationRequest,
)
from ldm.png_info import encode_with_parameters, parameters_text
from ldm.request_checks import resolve
from tests.test_front_offline import FakeInference

PNG_INFO = "/sdapi/v1/png-info"
# A1111's own example infotext (its parse_generation_parameters' docstring), a Lora hashes value quoted as A1111
# quotes one holding commas, and a Hires resize size.
EXAMPLE = (
    "girl with an artist's beret, determined, ((eyeshadow)), (coquettish)\n"
    "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b, "
    'Lora hashes: "tiny-style: 0123abcd, other: 4567ef01", Hires resize: 1024x0, Clip skip: 2'
)
EXAMPLE_FIELDS = {
    "Prompt": "girl with an artist's beret, determined, ((eyeshadow)), (coquettish)",
    "Negative prompt": "ugly, fat, (((deformed))), [blurry]",
    "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512", "Size-2": "768",
    "Model hash": "45dee52b", "Lora hashes": "tiny-style: 0123abcd, other: 4567ef01", "Hires resize-1": "1024",
    "Hires resize-2": "0", "Clip skip": "2",
}  # fmt: skip


def png_with(texts: PngImagePlugin.PngInfo) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(out, "PNG", pnginfo=texts)
    return out.getvalue()


def chunk(kind: bytes, content: bytes) -> bytes:
    """A PNG chunk as written by hand: its length, type, content and CRC."""
    return len(content).to_bytes(4, "big") + kind + content + zlib.crc32(kind + content).to_bytes(4, "big")


def before_iend(png: bytes, *chunks: bytes) -> bytes:
    """`png` with `chunks` inserted before its IEND chunk (its last 12 bytes)."""
    return png[:-12] + b"".join(chunks) + png[-12:]


def pil_texts(png: bytes) -> dict[str, str]:
    """The text chunks PIL reads (after the pixels, so the chunks that follow them are read too)."""
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return dict(image.text)  # type: ignore[attr-defined]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(FakeInference()))) as test_client:
        yield test_client


def test_every_kind_of_text_chunk_is_read_as_pil_reads_it() -> None:
    """Latin-1 beyond ASCII in tEXt and zTXt (its bytes read as UTF-8 would be other text, or none), UTF-8 in iTXt."""
    texts = PngImagePlugin.PngInfo()
    texts.add_text("parameters", "un café\nSteps: 20, Sampler: Euler, Seed: 1")  # tEXt
    texts.add_text("Comment", "fait à la main, " * 40, zip=True)  # zTXt
    texts.add_itxt("Title", "un renard ✓", lang="fr", tkey="Titre")  # iTXt
    texts.add_itxt("Description", "ça " * 300, zip=True)  # compressed iTXt
    png = png_with(texts)
    expected = pil_texts(png)
    assert len(expected) == 4 and expected["parameters"].startswith("un café") and png_texts(png) == expected


@pytest.mark.parametrize(
    ("chunks", "after_iend", "expected"),
    [
        # An iTXt compressed under a flag other than 1: any flag but 0 is compressed, for PIL.
        ([chunk(b"iTXt", b"k\0\2\0fr\0\0" + zlib.compress("ça".encode()))], [], {"k": "ça"}),
        # An iTXt whose translated keyword has no zero byte ending it: dropped.
        ([chunk(b"iTXt", b"k\0\0\0fr\0" + "ça".encode())], [], {}),
        # A text chunk after IEND: the image has ended, and PIL reads no further.
        ([], [chunk(b"tEXt", b"late\0after the end")], {}),
        # No zero byte: a keyword with empty text for tEXt and zTXt, nothing for iTXt.
        (
            [chunk(b"tEXt", b"lonely"), chunk(b"zTXt", b"alone"), chunk(b"iTXt", b"solo")],
            [],
            {"lonely": "", "alone": ""},
        ),
        # A zTXt whose data is no zlib stream is empty text; an empty keyword is dropped, but in an iTXt.
        (
            [chunk(b"zTXt", b"k\0\0not zlib"), chunk(b"tEXt", b"\0v"), chunk(b"iTXt", b"\0\0\0\0\0v")],
            [],
            {"k": "", "": "v"},
        ),
        # An iTXt compressed by a method other than zlib's, one whose data is no zlib stream, one whose language
        # tag is not UTF-8: dropped.
        (
            [
                chunk(b"iTXt", b"a\0\1\1\0\0" + zlib.compress(b"x")),
                chunk(b"iTXt", b"b\0\1\0\0\0not zlib"),
                chunk(b"iTXt", b"c\0\0\0\xff\0\0x"),
            ],
            [],
            {},
        ),
    ],
    ids=[
        "itxt-flag-2", "itxt-without-translated-keyword", "text-after-iend", "without-zero-byte", "empty-keyword",
        "itxt-unreadable",
    ],
)  # fmt: skip
def test_odd_text_chunks_are_read_as_pil_reads_them(
    chunks: list[bytes], after_iend: list[bytes], expected: dict[str, str]
) -> None:
    png = before_iend(png_with(PngImagePlugin.PngInfo()), *chunks) + b"".join(after_iend)
    assert png_texts(png) == pil_texts(png) == expected


def test_a_chunk_inflating_past_the_limit_is_dropped_and_what_is_no_png_has_none() -> None:
    """A zTXt of MAX_TEXT + 1 bytes once inflated (a few kB as sent) is dropped; one of MAX_TEXT bytes, PIL's limit
    itself, is read, as PIL reads it."""
    texts = PngImagePlugin.PngInfo()
    texts.add_text("parameters", "a fox\nSteps: 20, Sampler: Euler, Seed: 1")
    png = png_with(texts)
    bombed = before_iend(png, chunk(b"zTXt", b"bomb\0\0" + zlib.compress(b"x" * (MAX_TEXT + 1))))
    assert png_texts(bombed) == {"parameters": "a fox\nSteps: 20, Sampler: Euler, Seed: 1"}
    full = before_iend(png, chunk(b"zTXt", b"full\0\0" + zlib.compress(b"x" * MAX_TEXT)))
    assert png_texts(full) == pil_texts(full) and png_texts(full)["full"] == "x" * MAX_TEXT
    assert png_texts(b"GIF89a" + png[len(SIGNATURE) :]) == {} and png_texts(b"") == {}


def test_a_chunk_is_inflated_no_further_than_the_limit() -> None:
    """A zTXt that would inflate to 64 MiB (a 64 kB upload) is dropped having inflated little past MAX_TEXT: the
    front's memory grows by a few MiB for it, not by what the upload would have become."""
    compressor = zlib.compressobj(9)
    bomb = b"".join(compressor.compress(bytes(2**20)) for _ in range(64)) + compressor.flush()
    png = before_iend(png_with(PngImagePlugin.PngInfo()), chunk(b"zTXt", b"bomb\0\0" + bomb))
    tracemalloc.start()
    try:
        texts = png_texts(png)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert texts == {} and peak < 4 * MAX_TEXT, peak


def test_an_infotext_is_read_into_a1111s_fields() -> None:
    assert parse_infotext(EXAMPLE) == EXAMPLE_FIELDS | {k: v for k, v in ABSENT.items() if k not in EXAMPLE_FIELDS}


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        # Fewer than three fields on the last line: it is prompt too.
        ("a fox\nin the snow\nSteps: 20, Seed: 1", {"Prompt": "a fox\nin the snow\nSteps: 20, Seed: 1"}),
        # A prompt of several lines, a negative prompt of several lines, an empty value skipped.
        ("a fox\nin snow\nNegative prompt: blur\ngrain\nSteps: 2, Seed: , CFG scale: 7.5, Size: 64x64",
         {"Prompt": "a fox\nin snow", "Negative prompt": "blur\ngrain", "Steps": "2", "CFG scale": "7.5",
          "Size-1": "64", "Size-2": "64"}),
        # An empty negative prompt: the next line joins it with no newline before it, as A1111 joins them.
        ("a fox\nNegative prompt:\nmore\nSteps: 2, Seed: 3, Sampler: DDIM",
         {"Prompt": "a fox", "Negative prompt": "more", "Steps": "2", "Seed": "3", "Sampler": "DDIM"}),
        # A quoted value that is not JSON stays as written.
        ('x\nSteps: 2, Seed: 3, Note: "a \\q b"', {"Prompt": "x", "Steps": "2", "Seed": "3", "Note": '"a \\q b"'}),
        # A value that begins with a quote but does not end with one (a space follows it) is not unquoted, though
        # JSON would read it.
        ('x\nNote: "a" , Steps: 2, Seed: 3', {"Prompt": "x", "Note": '"a" ', "Steps": "2", "Seed": "3"}),
        ("", {"Prompt": ""}),
    ],
)  # fmt: skip
def test_infotext_edge_cases_as_a1111_reads_them(text: str, fields: dict[str, str]) -> None:
    parsed = parse_infotext(text)
    assert {key: parsed[key] for key in parsed if key not in ABSENT} == {"Negative prompt": "", **fields}


def test_the_endpoint_reads_a_png_made_here(client: TestClient) -> None:
    """Our encoder's PNG (iTXt for a prompt beyond Latin-1), sent as A1111's clients send it, behind a data: URL."""
    text = "un renard ✓\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 14, Size: 64x64, Hires resize: 96x0"
    [png] = encode_with_parameters([np.zeros((8, 8, 3), np.uint8)], [text])
    sent = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    answer = client.post(PNG_INFO, json={"image": sent}).json()
    assert answer["info"] == text and answer["items"] == {"parameters": text}
    parameters = answer["parameters"]
    assert (parameters["Prompt"], parameters["Seed"], parameters["Size-1"], parameters["Hires resize-1"]) == (
        "un renard ✓", "14", "64", "96",
    )  # fmt: skip
    assert parameters["Clip skip"] == "1" and parameters["Hires sampler"] == "Use same sampler"  # A1111's defaults


def test_an_image_without_an_infotext_answers_an_empty_one(client: TestClient) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, "JPEG")
    for image in (base64.b64encode(jpeg.getvalue()).decode(), ""):
        answer = client.post(PNG_INFO, json={"image": image})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"info": "", "items": {"parameters": ""}, "parameters": parse_infotext("")}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "image: send the image as a base64 string"),
        ({"image": 3}, "image: send the image as a base64 string"),
        ({"image": "not base64!"}, "image: is not base64"),
        # A character outside base64's alphabet, which a lenient decoder would skip to read a PNG signature.
        ({"image": "iVBOR*w0KGgo="}, "image: is not base64"),
        ({"image": "https://example.com/a.png"}, "image: send the image itself as base64; URLs are not fetched here"),
        ([1], "body: send the request as a JSON object"),
        ({"image": base64.b64encode(b"%PDF-1.7 not an image").decode()}, "image: is not a PNG, JPEG, WebP, GIF, BMP"),
        # A RIFF file that is no WebP: a WAV sound.
        ({"image": base64.b64encode(b"RIFF\x24\0\0\0WAVEfmt ").decode()}, "image: is not a PNG, JPEG, WebP, GIF"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_field(client: TestClient, body: object, message: str) -> None:
    answer = client.post(PNG_INFO, json=body)
    assert answer.status_code == 400
    said = answer.json()
    assert said["error"].startswith(message) and said["detail"] == said["error"]
    assert said["field"] == message.partition(":")[0]


def test_text_inflating_past_64_mib_in_all_is_refused(client: TestClient) -> None:
    """Each chunk within PIL's 1 MiB, 65 of them together past its 64 MiB: a 70 kB upload refused, not inflated
    to gigabytes; base64 broken over lines, as some encoders write it, is read."""
    png = png_with(PngImagePlugin.PngInfo())
    compressed = zlib.compress(b"x" * (MAX_TEXT - 16))
    chunks = b""
    for index in range(65):
        content = f"key{index}".encode() + b"\0\0" + compressed
        crc = zlib.crc32(b"zTXt" + content).to_bytes(4, "big")
        chunks += len(content).to_bytes(4, "big") + b"zTXt" + content + crc
    bombed = base64.encodebytes(png[:-12] + chunks + png[-12:]).decode()
    assert "\n" in bombed
    answer = client.post(PNG_INFO, json={"image": bombed})
    assert answer.status_code == 400 and "more than 67108864 bytes" in answer.json()["error"]
    fewer = base64.encodebytes(png[:-12] + chunks[: len(chunks) // 65 * 3] + png[-12:]).decode()
    assert set(client.post(PNG_INFO, json={"image": fewer}).json()["items"]) == {"parameters", "key0", "key1", "key2"}


def test_fields_are_found_as_a1111s_regular_expression_finds_them() -> None:
    """`parameters` skips the tries that cannot match, so that a long line takes linear time: on 20,000 random lines
    of the characters that matter (key characters, colons, commas, quotes, escapes, whitespace) it finds what
    `PARAMETER.findall` finds."""
    rng = random.Random(7)
    alphabet = list('ab -/:,"\\\t\n x1_é')
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert parameters(line) == PARAMETER.findall(line), line


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raises TimeoutError in the block once `seconds` have passed (SIGALRM: the block is Python, which the signal
    interrupts between regular-expression calls), so that a test of speed fails rather than hangs."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"not done within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_megabyte_line_of_the_runs_skipped_is_read_at_once() -> None:
    """The runs `parameters` skips, a megabyte of each before the fields: key characters (a long prompt's words) and
    whitespace that is no key character (tabs). Each is read in one try, where trying every start in it, as
    `PARAMETER.findall` does, would take hours."""
    line = "a fox " * 170_000 + "\t" * 1_000_000 + ", Steps: 20, Seed: 1, Size: 64x64"
    with deadline(5):
        assert parameters(line) == [("Steps", "20"), ("Seed", "1"), ("Size", "64x64")]


def a1111_runs(sampler: str, schedule: str) -> str:
    """The sampler and schedule A1111 1.9+ runs for an infotext's sampler and schedule, as the name of ours that runs
    them ("… Karras" on Karras' levels): a " Karras" name is Karras whatever the schedule (its
    `get_sampler_and_scheduler`), Automatic is the sampler's default (Karras for five, exponential for DPM++ 2M SDE,
    the model's levels for the rest), and DDIM and PLMS keep their own timesteps."""
    if sampler.endswith(" Karras") or sampler in ("DDIM", "PLMS"):
        return sampler
    if schedule == "Automatic":
        automatic = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2S a": "Karras", "DPM2": "Karras",
                     "DPM2 a": "Karras", "DPM++ 2M SDE": "Exponential"}  # fmt: skip
        schedule = automatic.get(sampler, "Uniform")
    return {"Uniform": sampler, "Karras": f"{sampler} Karras"}.get(schedule, f"{sampler} ({schedule})")


def test_a_png_made_here_runs_its_samplers_schedules_in_a1111_1_9() -> None:
    """Each sampler (and a hires fix's own) as A1111 1.9+ reads our infotext (its reader, then its rules above; the
    hires fix's sampler runs the first pass's schedule unless it names its own): the sampler and schedule it ran
    here. Without "Schedule type", 1.9 would run DPM++ 2M and five others on another schedule ("Automatic")."""
    seconds = ["", "euler", "dpmpp_2m", "dpm2_a", "dpmpp_2m_karras", "ddim"]
    for first, second in itertools.product(SAMPLERS, seconds):
        try:
            request = resolve(GenerationRequest("a fox", seed=1, steps=10, hr_scale=2, strength=0.5, sampler=first,
                                                hr_sampler=second))  # fmt: skip
        except GenerationError:
            continue  # PLMS runs no second pass of its own
        read = parse_infotext(parameters_text(request, 1, model_name="v1-5, pruned"))
        schedule = "Karras" if read["Sampler"].endswith(" Karras") else read["Schedule type"]
        hires_schedule = read.get("Hires schedule type", "Use same scheduler")
        hires_schedule = schedule if hires_schedule == "Use same scheduler" else hires_schedule
        assert a1111_runs(read["Sampler"], read["Schedule type"]) == SAMPLERS[first], (first, second)
        own = read.get("Hires sampler", "Use same sampler")
        hires_sampler = read["Sampler"] if own == "Use same sampler" else own
        hires = a1111_runs(hires_sampler, hires_schedule)
        assert hires == SAMPLERS[second or first], (first, second)
        # "Hires schedule type" is written only where, without it, 1.9 would run the second pass on another schedule
        # (never for DDIM, which keeps its timesteps): A1111 leaves it out when it is the first pass's.
        needed = a1111_runs(hires_sampler, schedule) != SAMPLERS[second or first]
        assert ("Hires schedule type" in read) == needed, (first, second)
        assert read["Model"] == "v1-5, pruned"


def test_the_lists_of_what_a1111s_automatic_schedule_changes_agree() -> None:
    """The samplers A1111 1.9's Automatic runs off the model's levels, kept three times (the PNG writer's, the A1111
    API's, the page's reader's, in two languages): the same."""
    names = [SAMPLERS[name] for name in A1111_AUTOMATIC_NOT_UNIFORM]
    assert [*a1111.AUTOMATIC_KARRAS, "DPM++ 2M SDE"] == names
    page = (Path(__file__).parents[1] / "front" / "static" / "infotext.js").read_text()
    lists = [
        re.search(rf"const {name} = (\[[^\]]*\]);", page) for name in ("AUTOMATIC_KARRAS", "AUTOMATIC_EXPONENTIAL")
    ]
    assert [item for found in lists if found for item in json.loads(found.group(1))] == names


@pytest.mark.parametrize("content", MASKED_CONTENTS)
def test_masked_content_is_written_as_a1111_writes_it(content: str) -> None:
    """A1111 writes "Masked content" only where it is not "original", which its reader takes a PNG naming none
    for: each content reads back as the one that ran, and "original" adds no field."""
    request = resolve(GenerationRequest("x", seed=1, steps=10, strength=0.5, init_image=Image.new("RGB", (64, 64)),
                                        mask_image=Image.new("L", (64, 64), 255), masked_content=content))  # fmt: skip
    text = parameters_text(request, 1)
    assert parse_infotext(text)["Masked content"] == MASKED_CONTENTS[content]
    if content == "original":
        assert text.endswith("Denoising strength: 0.5, Mask blur: 4, RNG: CPU, Emphasis: None")


def test_every_line_break_of_a_prompt_is_written_as_a_line_feed() -> None:
    """A lone CR (old Mac text) is a line break too: written as LF, as CR LF is, so that a reader splitting at any
    line break (Python's `splitlines`, as many tools read PNG text) sees the lines A1111's, which splits at LF, sees,
    and a CR before "Negative prompt:" forges no negative prompt there either."""
    request = resolve(GenerationRequest("a cat\rat night\rNegative prompt: forged", negative_prompt="fog\rrain"))
    text = parameters_text(request, 5)
    assert text.splitlines() == text.split("\n")
    assert text.split("\n")[:4] == ["a cat", "at night\\nNegative prompt: forged", "Negative prompt: fog", "rain"]
    read = parse_infotext(text)
    assert (read["Prompt"], read["Negative prompt"]) == ("a cat\nat night\\nNegative prompt: forged", "fog\nrain")
