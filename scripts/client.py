"""Command-line client of our TorchServe inference API: a prompt and options in, PNG files and their seeds out.

    python scripts/client.py "a cottage garden full of tulips" --seed 42 --n-samples 2
    python scripts/client.py "the same garden in winter" --init-image garden.png --strength 0.6

Why a client of its own: the API wants a JSON body with a base64 init image and answers with base64 PNGs; this does
that encoding both ways, so nobody has to write curl and jq lines. Only the options given are sent, so the server's
defaults and limits (model-config.yaml) stay the single source of truth, and every check stays on the server, which
names the field at fault. The PNGs are written byte for byte as the server sent them: they already carry the
`parameters` chunk, which re-encoding could drop.

Exit codes: 0 images written; 1 the server refused the request, could not be reached or gave no usable answer, or
its images could not be written (a full disk: the request was made, and running it again makes it again); 2 a bad
command line or an init or mask image that cannot be read. Errors are one `client: ...` line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3

from ldm.arguments import seconds
from ldm.output_names import next_index, outdir_problem, write_new

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MODEL = "sd"
DEFAULT_OUTDIR = "outputs/client"
# Seconds without a word from the server: the answer is asked for as a progress stream, so this is a request's wait in
# TorchServe's queue and its first step, then each next step (TorchServe's responseTimeout as shipped).
DEFAULT_TIMEOUT = 900.0
NDJSON = "application/x-ndjson"
# Request fields that are options of the same name (dest); one left out is not sent, so the server's default applies.
OPTIONAL_FIELDS = ("negative_prompt", "H", "W", "ddim_steps", "scale", "eta", "seed", "n_samples", "n_iter",
                   "sampler", "strength", "resize_mode", "weighted_subprompts", "emphasis", "clip_skip", "mask_blur",
                   "invert_mask", "masked_content", "inpaint_area", "masked_area_padding", "hr_scale", "hr_upscaler",
                   "hr_steps", "hr_resize_x", "hr_resize_y", "hr_prompt", "hr_negative_prompt", "hr_sampler",
                   "subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w", "tiling")  # fmt: skip


class ClientError(Exception):
    """Why no images came back, as one line a user can act on."""


class HttpError(ClientError):
    """The server refused the request: its status, its message and the request field it names ("" for none)."""

    def __init__(self, status: int, error: str, field: str = "") -> None:
        super().__init__(f"HTTP {status}: {error}" + (f" (field: {field})" if field else ""))
        self.status = status
        self.error = error
        self.field = field


def _error_of(status: int, body: Any, text: str = "") -> HttpError:
    """The error an answer (or a stream's last line) says: our handler's `{"error", "field"}`, else TorchServe's own
    `{"message"}` (unknown model, no worker, queue full, a worker that died), else the start of its text."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        field = body.get("field")
        return HttpError(status, body["error"], field if isinstance(field, str) else "")
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return HttpError(status, body["message"])
    return HttpError(status, " ".join(text.split())[:200] or "no reason given")


def _http_error(response: requests.Response) -> HttpError:
    """The error of a 4xx/5xx answer."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return _error_of(response.status_code, body, response.text or response.reason)


def _line_error(line: dict[str, Any]) -> HttpError:
    """The error a stream ends with once its 200 is out: the handler's line carries the status the answer would have
    had; TorchServe's own (a worker that died) its `code`."""
    status = line.get("status", line.get("code"))
    return _error_of(status if isinstance(status, int) else 502, line, str(line))


def _lines(response: requests.Response) -> Iterator[bytes]:
    """The stream's lines as they arrive. Why not `iter_lines`: it copies the line so far again for each 512 bytes
    read, and the last line holds every image (a 10.7 MB line took 74 s of CPU; tests/test_client.py)."""
    pieces: list[bytes] = []
    for chunk in response.iter_content(chunk_size=1 << 16):
        *done, rest = chunk.split(b"\n")
        for line in done:
            yield b"".join([*pieces, line])
            pieces = []
        pieces.append(rest)
    yield b"".join(pieces)


def _answer_line(response: requests.Response, progress: Callable[[dict[str, Any]], None] | None) -> Any:
    """The line of a progress stream with the images, read to the stream's end; each step line goes to `progress`.
    A server that answers plain JSON (one line) is read the same way."""
    answer = None
    for raw in _lines(response):
        if not raw.strip():
            continue
        line = json.loads(raw)
        if isinstance(line, dict) and "step" in line:
            if progress is not None:
                progress(line)
        elif isinstance(line, dict) and "images" not in line and ("error" in line or "message" in line):
            raise _line_error(line)
        else:
            answer = line
    if answer is None:
        raise ClientError(f"the answer from {response.url} ended without the images: the server's log says why")
    return answer


class StepLine:
    """The steps as one self-overwriting line on a terminal's stderr, ended before anything else is printed."""

    def __init__(self) -> None:
        self.shown = False

    def show(self, line: dict[str, Any]) -> None:
        print(f"\rclient: step {line.get('step')}/{line.get('total')}", end="", file=sys.stderr, flush=True)
        self.shown = True

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr)
            self.shown = False


@dataclass(frozen=True)
class Answer:
    """What the server made: each image's PNG bytes and seed, the words of the prompts CLIP never read, and each
    image's variation seed (none without variation seeds)."""

    images: list[bytes]
    seeds: list[int]
    warnings: list[str]
    subseeds: list[int]


def generate(
    url: str,
    model: str,
    fields: dict[str, Any],
    timeout: float,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Answer:
    """POST `fields` (request fields, init_image already base64) to `{url}/predictions/{model}`; the PNG bytes as the
    server made them, the seed of each, and the server's warnings (none from a server that sends none).

    The answer is asked for as a progress stream (its last line is the JSON answer), each step line passed to
    `progress`: TorchServe fails a worker, with every request of its batch, that sends it nothing for its
    responseTimeout, and a step line is something; `timeout` then bounds the wait for each next line, not for the
    whole. JSON, not a PNG, even for one image: a PNG answer holds a single image and its seeds only in headers.
    Raises `HttpError` when the server refuses, `ClientError` when it cannot be reached or answers with something
    that is not the API's JSON.
    """
    problem = check_url(url)
    if problem:
        raise ClientError(f"the URL: {problem}")
    endpoint = f"{url.rstrip('/')}/predictions/{model}"
    try:
        with requests.post(endpoint, json=fields, headers={"Accept": NDJSON}, timeout=timeout, stream=True) as response:
            if not response.ok:
                raise _http_error(response)
            try:
                body = _answer_line(response, progress)
                images = [base64.b64decode(image, validate=True) for image in body["images"]]
                seeds = [int(seed) for seed in body["seeds"]]
                subseeds = [int(subseed) for subseed in body.get("subseeds", [])]
                warnings = [str(line) for line in body.get("warnings", [])]
            except (ValueError, KeyError, TypeError) as error:
                raise ClientError(
                    f"{endpoint} answered {response.status_code} but not with the inference API's JSON ({error!r}); "
                    "is --url our TorchServe?"
                ) from None
    except (requests.Timeout, requests.ConnectionError) as error:
        if isinstance(error, requests.Timeout) or _timed_out(error):
            raise ClientError(
                f"no answer from {url} within {timeout:g} s; many or large images take longer: raise --timeout"
            ) from None
        if _never_connected(error):
            raise ClientError(
                f"cannot reach {url}: the server may not be running (scripts/serve.sh starts it)"
            ) from None
        raise ClientError(
            f"the connection to {url} broke off before its answer ({error}): the server's log says why"
        ) from None
    except requests.exceptions.ChunkedEncodingError as error:
        raise ClientError(f"the answer from {url} broke off ({error}): the server's log says why") from None
    except requests.RequestException as error:
        raise ClientError(f"cannot send the request to {endpoint}: {error}") from None
    if not images or len(images) != len(seeds) or (subseeds and len(subseeds) != len(images)):
        counts = f"{len(images)} images, {len(seeds)} seeds" + (f" and {len(subseeds)} subseeds" if subseeds else "")
        raise ClientError(f"{endpoint} answered with {counts}")
    return Answer(images, seeds, warnings, subseeds)


def _timed_out(error: requests.ConnectionError) -> bool:
    """Whether a stream's next bytes did not come in time (requests says so as a ConnectionError)."""
    return any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in error.args)


def _never_connected(error: requests.ConnectionError) -> bool:
    """Whether the connection was never made (refused, no such host), not lost once the request was on its way."""
    attempt = error.args[0] if error.args else None
    return isinstance(getattr(attempt, "reason", None), urllib3.exceptions.NewConnectionError)


def check_url(url: str) -> str | None:
    """Why `url` cannot be TorchServe's inference address, or None when it can be."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading it checks it: ValueError for a port that is not a number in range)
    except ValueError as error:
        return f"{url!r} is not a URL ({error})"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"expected http://HOST[:PORT] or https://..., got {url!r}"
    return None


def build_parser() -> argparse.ArgumentParser:
    """Options named after the request fields (ddim_steps: --steps); none of them has a default of its own."""
    parser = argparse.ArgumentParser(
        prog="client.py",
        description="txt2img or img2img through our TorchServe inference API; writes the PNGs the server sends.",
        epilog="Options left out are not sent: the server's defaults apply (model-config.yaml).",
    )
    parser.add_argument("prompt", help="what the images should show")
    parser.add_argument("--negative-prompt", help="what the images should not show")
    parser.add_argument("--H", type=int, help="image height in pixels, a multiple of 8")
    parser.add_argument("--W", type=int, help="image width in pixels, a multiple of 8")
    parser.add_argument(
        "--steps", dest="ddim_steps", metavar="STEPS", type=int, help="denoising steps (request field ddim_steps)"
    )
    parser.add_argument("--scale", type=float, help="classifier-free guidance scale")
    parser.add_argument("--eta", type=float, help="DDIM η; 0 is deterministic")
    parser.add_argument("--seed", type=int, help="seed of the first image; image i gets seed + i (default: random)")
    parser.add_argument(
        "--subseed",
        type=int,
        help="AUTOMATIC1111's variation seed: with --subseed-strength, every image keeps --seed and image i's noise is "
        "bent toward that of subseed + i (default: random)",
    )
    parser.add_argument(
        "--subseed-strength", type=float, help="how far toward the variation seed's noise, in [0, 1] (0: none)"
    )
    for side, name in (("h", "height"), ("w", "width")):
        parser.add_argument(
            f"--seed-resize-from-{side}",
            type=int,
            help=f"AUTOMATIC1111's 'Resize seed from {name}': the seeds' noise drawn at this {name} (with the other "
            "side), pasted centred into the image's own",
        )
    parser.add_argument("--n-samples", type=int, help="images per batch")
    parser.add_argument("--n-iter", type=int, help="batches")
    parser.add_argument(
        "--sampler",
        help="ddim, plms, euler, euler_a, heun, dpm2, dpm2_a, lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_a, dpmpp_sde, "
        "euler_karras, euler_a_karras, heun_karras, lms_karras, dpm2_karras, dpm2_a_karras, dpmpp_2m_karras, "
        "dpmpp_2m_sde_karras, dpmpp_2s_a_karras or "
        "dpmpp_sde_karras; all but ddim: eta 0; "
        "plms: txt2img only",
    )
    parser.add_argument(
        "--weighted-subprompts",
        action=argparse.BooleanOptionalAction,
        help="read 'a castle:0.7 a forest:0.3' as sub-prompts blended by weight, as optimizedSD did (or not: "
        "--no-weighted-subprompts)",
    )
    parser.add_argument(
        "--emphasis",
        action=argparse.BooleanOptionalAction,
        help="read AUTOMATIC1111's '(word:1.3)', '[word]', BREAK, prompt editing, AND, and prompts past 75 tokens "
        "whole (or not: --no-emphasis)",
    )
    parser.add_argument(
        "--tiling",
        action=argparse.BooleanOptionalAction,
        help="AUTOMATIC1111's 'Tiling': images that wrap around their edges, to tile without a seam",
    )
    parser.add_argument(
        "--clip-skip", type=int, help="AUTOMATIC1111's 'Clip skip': read the prompt from CLIP's k-th layer from the end"
    )
    parser.add_argument("--init-image", type=Path, help="PNG, JPEG or WebP to start from: img2img instead of txt2img")
    parser.add_argument(
        "--resize-mode",
        help="img2img: how an init image of another shape than --W x --H is brought to it: just_resize, "
        "crop_and_resize or resize_and_fill (AUTOMATIC1111's 'Resize mode')",
    )
    parser.add_argument(
        "--mask-image",
        type=Path,
        help="inpainting: PNG, JPEG or WebP the size of --init-image, white where it is repainted, black where kept",
    )
    parser.add_argument(
        "--mask-blur",
        type=int,
        help="inpainting: σ in pixels of the seam where the kept pixels are pasted back (AUTOMATIC1111's 'Mask blur')",
    )
    parser.add_argument(
        "--invert-mask",
        action=argparse.BooleanOptionalAction,
        help="inpainting: repaint the mask's black part, keep its white (AUTOMATIC1111's 'Inpaint not masked')",
    )
    parser.add_argument(
        "--masked-content",
        help="inpainting: what the repainted part starts from: original, fill, latent_noise or latent_nothing "
        "(AUTOMATIC1111's 'Masked content')",
    )
    parser.add_argument(
        "--inpaint-area",
        help="inpainting: only_masked paints a box around the mask at --W x --H and puts it back into the init "
        "image (AUTOMATIC1111's 'Only masked'), or whole_picture",
    )
    parser.add_argument(
        "--masked-area-padding", type=int, help="inpainting, only_masked: pixels added around the mask's box"
    )
    parser.add_argument(
        "--strength",
        type=float,
        help="img2img: how much of the init image is replaced, in (0, 1]; with --hr-scale: how much of the upscaled "
        "image the hires fix's second pass may change",
    )
    parser.add_argument(
        "--hr-scale",
        type=float,
        help="AUTOMATIC1111's hires fix (txt2img): make the image at --H x --W, upscale it this many times and "
        "sample it again at that size",
    )
    parser.add_argument(
        "--hr-upscaler",
        help="the hires fix's upscaler: latent, latent_antialiased, latent_bicubic, latent_bicubic_antialiased, "
        "latent_nearest, latent_nearest_exact, lanczos or nearest",
    )
    parser.add_argument("--hr-steps", type=int, help="the hires fix's second pass's steps (0: as many as --steps)")
    for flag, side in (("--hr-resize-x", "width"), ("--hr-resize-y", "height")):
        parser.add_argument(
            flag,
            type=int,
            help=f"the hires fix to this {side} instead of --hr-scale (AUTOMATIC1111's 'Resize {side} to'; with both, "
            "the image is upscaled to cover them and cut to them)",
        )
    for flag, what in (
        ("--hr-prompt", "prompt"),
        ("--hr-negative-prompt", "negative prompt"),
        ("--hr-sampler", "sampler"),
    ):
        parser.add_argument(flag, help=f"the hires fix's second pass's own {what} (default: the first pass's)")
    parser.add_argument("--url", default=DEFAULT_URL, help="TorchServe's inference address (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name on the server (default: %(default)s)")
    parser.add_argument(
        "--outdir",
        type=Path,
        default=Path(DEFAULT_OUTDIR),
        help="folder the images are written to, as seed_{seed}_{n:05}.png with n counting on after the highest n "
        "already there, as txt2img.py does (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the server's next word: its first step, then each next (default: %(default)g)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when the images are written, 1 when the server gave none, 2 on a bad input (see the top)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    hires = args.hr_scale not in (None, 1) or bool(args.hr_resize_x or args.hr_resize_y)
    if args.strength is not None and args.init_image is None and not hires:
        parser.error("--strength needs --init-image, or the hires fix's --hr-scale or --hr-resize-x/-y (txt2img has "
                     "nothing to keep)")  # fmt: skip
    for name in ("mask_image", "resize_mode"):
        if getattr(args, name) is not None and args.init_image is None:
            parser.error(f"--{name.replace('_', '-')} needs --init-image (txt2img has nothing to keep)")
    for name in ("hr_upscaler", "hr_steps", "hr_prompt", "hr_negative_prompt", "hr_sampler"):
        if getattr(args, name) is not None and not hires:
            parser.error(f"--{name.replace('_', '-')} needs an --hr-scale above 1 or --hr-resize-x/-y (it is the hires "
                         "fix's)")  # fmt: skip
    for name in ("mask_blur", "invert_mask", "masked_content", "inpaint_area", "masked_area_padding"):
        # --no-invert-mask asks for nothing.
        if getattr(args, name) not in (None, False) and args.mask_image is None:
            parser.error(f"--{name.replace('_', '-')} needs --mask-image (it says how to inpaint through it)")
    problem = check_url(args.url)
    if problem:
        parser.error(f"--url: {problem}")
    problem = outdir_problem(args.outdir)  # now, not after minutes of GPU time
    if problem:
        parser.error(f"--outdir {problem}")
    fields: dict[str, Any] = {"prompt": args.prompt}
    fields.update({name: getattr(args, name) for name in OPTIONAL_FIELDS if getattr(args, name) is not None})
    for name, path in (("init_image", args.init_image), ("mask_image", args.mask_image)):
        if path is None:
            continue
        try:
            fields[name] = base64.b64encode(path.read_bytes()).decode("ascii")
        except OSError as error:
            option = "--" + name.replace("_", "-")
            print(f"client: cannot read {option} {path}: {error.strerror or error}", file=sys.stderr)
            return 2
    steps = StepLine()
    try:
        try:
            answer = generate(args.url, args.model, fields, args.timeout, steps.show if sys.stderr.isatty() else None)
        finally:
            steps.end()
        for line in answer.warnings:
            print(f"client: warning: {line}", file=sys.stderr)
        # Numbered once the images are here, so files another run wrote while this one waited keep their numbers.
        index = next_index(args.outdir)
        for i, (png, seed) in enumerate(zip(answer.images, answer.seeds, strict=True)):
            path, index = write_new(args.outdir, seed, index, "png", png)
            print(f"{path}  {seed}" + (f"  {answer.subseeds[i]}" if answer.subseeds else ""))
    except ClientError as error:
        print(f"client: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"client: cannot write to {args.outdir}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
