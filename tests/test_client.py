"""scripts/client.py against a small HTTP server that answers as our TorchServe does: what the client sends, the files
it writes (the server's bytes, named and numbered as txt2img.py names them) and each way a request can fail."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ldm.output_names import write_new
from ldm.png_info import encode_with_parameters, read_parameters
from scripts.client import ClientError, HttpError, StepLine, check_url, generate, main
from tests.servers import http_server, send_json

MODEL = "sd"
# What the server answers to a request with this prompt, instead of images: (status, JSON body).
REFUSALS: dict[str, tuple[int, dict[str, Any]]] = {
    "refused": (400, {"error": "H must be a multiple of 8, got 100", "field": "H"}),
    "out of memory": (507, {"error": "out of GPU memory; retry, or ask for fewer or smaller images", "field": ""}),
}
# What a stream's last line is for a request with this prompt, after one step line and its 200.
ERROR_LINES: dict[str, dict[str, Any]] = {
    "fails mid-way": {
        "error": "out of GPU memory; retry, or ask for fewer or smaller images",
        "field": "",
        "status": 507,
    },
    "worker dies": {"code": 500, "type": "InternalServerException", "message": "Worker died."},
}
# TorchServe's own answer for a model it does not serve: no `error`, a `message`.
UNKNOWN_MODEL = (404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: nope"})


def parameters(seed: int) -> str:
    return f"a prompt\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: {seed}, Size: 8x8"


def png(seed: int) -> bytes:
    """A distinct 8×8 PNG carrying a parameters chunk, as the handler makes them."""
    pixels = np.full((8, 8, 3), seed % 256, dtype=np.uint8)
    return encode_with_parameters([pixels], [parameters(seed)])[0]


@dataclass
class FakeTorchServe:
    """Records every request; answers `/predictions/sd` with two PNGs (seeds from the request's, else 1000)."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path != f"/predictions/{MODEL}":
            return UNKNOWN_MODEL
        if body["prompt"] in REFUSALS:
            return REFUSALS[body["prompt"]]
        seed, variation = body.get("seed", 1000), "subseed_strength" in body
        seeds = [seed, seed] if variation else [seed, seed + 1]
        self.sent = [png(seed + i) for i in range(2)]
        images = [base64.b64encode(data).decode("ascii") for data in self.sent]
        warnings = [f"prompt: {len(body['prompt'])} characters"] if body["prompt"].startswith("a long") else []
        answer = {"images": images, "seeds": seeds, "parameters": {"prompt": body["prompt"]}, "warnings": warnings}
        return 200, answer | ({"subseeds": [body["subseed"], body["subseed"] + 1]} if variation else {})


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read the client's stderr."""


@pytest.fixture
def server() -> Iterator[FakeTorchServe]:
    fake = FakeTorchServe(url="")

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            body = json.loads(raw)
            fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            status, answer = fake.answer(self.path, body)
            if status != 200 or self.headers["Accept"] != "application/x-ndjson":
                send_json(self, status, answer)
                return
            # As our handler streams: a line per step, then the answer (or an error) as the last line.
            steps = [{"step": k, "total": 2, "image_index": 0, "image_count": 2} for k in (1, 2)]
            last = ERROR_LINES.get(body["prompt"], answer)
            lines = [*steps[: 1 if body["prompt"] in ERROR_LINES else 2], last]
            data = "".join(json.dumps(line) + "\n" for line in lines).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with http_server(Handler) as url:
        fake.url = url
        yield fake


def run(server_url: str, outdir: Path, *argv: str) -> int:
    return main([*argv, "--url", server_url, "--outdir", str(outdir)])


def test_txt2img_sends_only_the_given_fields_and_writes_the_servers_bytes(
    server: FakeTorchServe, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["a lighthouse", "--negative-prompt", "fog", "--H", "64", "--W", "128", "--steps", "3", "--scale", "5",
            "--eta", "0.5", "--seed", "7", "--n-samples", "2", "--n-iter", "1", "--sampler", "ddim",
            "--weighted-subprompts"]  # fmt: skip
    assert run(server.url, tmp_path / "out", *argv) == 0

    (request,) = server.requests
    assert request["path"] == f"/predictions/{MODEL}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["Accept"] == "application/x-ndjson"
    assert request["body"] == {
        "prompt": "a lighthouse", "negative_prompt": "fog", "H": 64, "W": 128, "ddim_steps": 3, "scale": 5.0,
        "eta": 0.5, "seed": 7, "n_samples": 2, "n_iter": 1, "sampler": "ddim", "weighted_subprompts": True,
    }  # fmt: skip
    paths = [tmp_path / "out" / "seed_7_00000.png", tmp_path / "out" / "seed_8_00001.png"]
    assert sorted((tmp_path / "out").iterdir()) == paths
    assert [p.read_bytes() for p in paths] == server.sent
    assert read_parameters(paths[1].read_bytes()) == parameters(8)
    assert capsys.readouterr() == (f"{paths[0]}  7\n{paths[1]}  8\n", "")


def test_prompt_alone_leaves_every_default_to_the_server(server: FakeTorchServe, tmp_path: Path) -> None:
    assert run(server.url, tmp_path, "a lighthouse") == 0
    assert server.requests[0]["body"] == {"prompt": "a lighthouse"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_1000_00000.png", "seed_1001_00001.png"]


def test_no_weighted_subprompts_sends_false_over_a_servers_default(server: FakeTorchServe, tmp_path: Path) -> None:
    assert run(server.url, tmp_path, "a:1 b:2", "--no-weighted-subprompts") == 0
    assert server.requests[0]["body"] == {"prompt": "a:1 b:2", "weighted_subprompts": False}


@pytest.mark.parametrize(("flag", "value"), [("--emphasis", True), ("--no-emphasis", False)])
def test_emphasis_is_sent_either_way(server: FakeTorchServe, tmp_path: Path, flag: str, value: bool) -> None:
    assert run(server.url, tmp_path, "a (red:1.3) door", flag) == 0
    assert server.requests[0]["body"] == {"prompt": "a (red:1.3) door", "emphasis": value}


def test_the_servers_warnings_go_to_stderr(
    server: FakeTorchServe, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(server.url, tmp_path, "a long prompt") == 0
    assert capsys.readouterr().err == "client: warning: prompt: 13 characters\n"


def test_img2img_sends_the_init_image_file_as_base64(server: FakeTorchServe, tmp_path: Path) -> None:
    init = tmp_path / "init.jpg"
    init.write_bytes(png(3))  # sent as it is: the server, not the client, checks the format
    assert run(server.url, tmp_path / "out", "a lighthouse", "--init-image", str(init), "--strength", "0.6") == 0
    body = server.requests[0]["body"]
    assert set(body) == {"prompt", "init_image", "strength"}
    assert base64.b64decode(body["init_image"], validate=True) == init.read_bytes()
    assert body["strength"] == 0.6


def test_hires_fix_sends_its_fields_and_strength(server: FakeTorchServe, tmp_path: Path) -> None:
    argv = ["a lighthouse", "--hr-scale", "2", "--hr-upscaler", "lanczos", "--hr-steps", "10", "--strength", "0.6"]
    assert run(server.url, tmp_path, *argv) == 0
    assert server.requests[0]["body"] == {
        "prompt": "a lighthouse", "hr_scale": 2.0, "hr_upscaler": "lanczos", "hr_steps": 10, "strength": 0.6,
    }  # fmt: skip
    assert run(server.url, tmp_path, "a lighthouse", "--hr-resize-x", "1024", "--strength", "0.5") == 0
    assert server.requests[1]["body"] == {"prompt": "a lighthouse", "hr_resize_x": 1024, "strength": 0.5}
    own = ["--hr-prompt", "a stormy sea", "--hr-negative-prompt", "sunny", "--hr-sampler", "Euler a"]
    assert run(server.url, tmp_path, "a lighthouse", "--hr-scale", "2", *own) == 0
    assert server.requests[2]["body"] == {"prompt": "a lighthouse", "hr_scale": 2.0, "hr_prompt": "a stormy sea",
                                          "hr_negative_prompt": "sunny", "hr_sampler": "Euler a"}  # fmt: skip


def test_variation_seeds_are_sent_and_each_files_printed(
    server: FakeTorchServe, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(server.url, tmp_path, "a lighthouse", "--subseed", "9", "--subseed-strength", "0.3") == 0
    assert server.requests[0]["body"] == {"prompt": "a lighthouse", "subseed": 9, "subseed_strength": 0.3}
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{tmp_path / 'seed_1000_00000.png'}  1000  9", f"{tmp_path / 'seed_1000_00001.png'}  1000  10"]


def test_a_seed_resize_is_sent(server: FakeTorchServe, tmp_path: Path) -> None:
    assert run(server.url, tmp_path, "a lighthouse", "--seed-resize-from-h", "512", "--seed-resize-from-w", "768") == 0
    assert server.requests[0]["body"] == {
        "prompt": "a lighthouse",
        "seed_resize_from_h": 512,
        "seed_resize_from_w": 768,
    }


def test_tiling_is_sent(server: FakeTorchServe, tmp_path: Path) -> None:
    assert run(server.url, tmp_path, "bricks", "--tiling") == 0
    assert server.requests[0]["body"] == {"prompt": "bricks", "tiling": True}


def test_numbering_continues_after_the_highest_existing_index(server: FakeTorchServe, tmp_path: Path) -> None:
    existing = {"seed_3_00004.png": b"a", "seed_1_00009.jpg": b"b", "grid.png": b"c", "seed_x_00100.png": b"d"}
    for name, data in existing.items():
        (tmp_path / name).write_bytes(data)
    assert run(server.url, tmp_path, "a lighthouse", "--seed", "3") == 0
    assert (tmp_path / "seed_3_00010.png").read_bytes() == server.sent[0]
    assert (tmp_path / "seed_4_00011.png").read_bytes() == server.sent[1]
    assert all((tmp_path / name).read_bytes() == data for name, data in existing.items())
    assert len(list(tmp_path.iterdir())) == len(existing) + 2


@pytest.mark.parametrize(
    ("prompt", "model", "line"),
    [
        ("refused", MODEL, "client: HTTP 400: H must be a multiple of 8, got 100 (field: H)"),
        ("out of memory", MODEL, "client: HTTP 507: out of GPU memory; retry, or ask for fewer or smaller images"),
        ("a lighthouse", "nope", "client: HTTP 404: Model not found: nope"),
    ],
)
def test_a_refusal_prints_the_servers_error_and_exits_1(
    server: FakeTorchServe, tmp_path: Path, capsys: pytest.CaptureFixture[str], prompt: str, model: str, line: str
) -> None:
    assert run(server.url, tmp_path, prompt, "--model", model) == 1
    assert capsys.readouterr() == ("", line + "\n")
    assert list(tmp_path.iterdir()) == []


def test_generate_returns_the_png_bytes_and_seeds_or_raises_the_servers_error(server: FakeTorchServe) -> None:
    """The answer is followed as a stream: its step lines go to `progress`, its last line is the answer, or the error
    it would have been (the handler's with its status, TorchServe's own with its code)."""
    steps: list[dict[str, Any]] = []
    answer = generate(server.url + "/", MODEL, {"prompt": "a lighthouse", "seed": 11}, timeout=5, progress=steps.append)
    assert (answer.images, answer.seeds, answer.warnings) == (server.sent, [11, 12], [])
    assert [(line["step"], line["total"]) for line in steps] == [(1, 2), (2, 2)]
    with pytest.raises(HttpError) as refused:
        generate(server.url, MODEL, {"prompt": "refused"}, timeout=5)
    assert (refused.value.status, refused.value.field) == (400, "H")
    for prompt, status, error in (
        ("fails mid-way", 507, "out of GPU memory; retry"),
        ("worker dies", 500, "Worker died."),
    ):
        with pytest.raises(HttpError) as failed:
            generate(server.url, MODEL, {"prompt": prompt}, timeout=5)
        assert failed.value.status == status and failed.value.error.startswith(error)


def test_a_stream_that_ends_without_its_images_is_a_client_error() -> None:
    class CutShort(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            data = b'{"step": 1, "total": 2, "image_index": 0}\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with http_server(CutShort) as url, pytest.raises(ClientError, match="ended without the images: the server's log"):
        generate(url, MODEL, {"prompt": "a lighthouse"}, timeout=5)


def test_a_last_line_of_megabytes_is_read_in_linear_time() -> None:
    """The line with the images holds them all (8 images of 1024x1024 are about 17 MB of base64): requests'
    `iter_lines` took 74 s of CPU over this 10.7 MB line (2026-11-30); split as it arrives, a tenth of a second."""
    images = [base64.b64encode(bytes(range(256)) * (4096 * 8)).decode()] * 1
    answer = json.dumps({"images": images, "seeds": [1], "parameters": {}}).encode() + b"\n"
    assert len(answer) > 10 << 20

    class Big(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            data = b'{"step": 1, "total": 1, "image_index": 0}\n\n' + answer
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with http_server(Big) as url:
        started = time.process_time()
        assert generate(url, MODEL, {"prompt": "a lighthouse"}, timeout=5).images[0] == bytes(range(256)) * (4096 * 8)
        assert time.process_time() - started < 5


def test_the_steps_are_one_line_ended_before_anything_else(capsys: pytest.CaptureFixture[str]) -> None:
    steps = StepLine()
    steps.end()
    for k in (1, 2):
        steps.show({"step": k, "total": 2})
    steps.end()
    steps.end()
    assert capsys.readouterr().err == "\rclient: step 1/2\rclient: step 2/2\n"


def test_the_timeout_bounds_each_next_line_not_the_whole_answer() -> None:
    """Steps that come every 0.15 s answer within a 0.5 s timeout though the whole takes 0.9 s; a pause of 1 s
    between two lines is the timeout's error."""

    def slow(pause_after: int) -> type[QuietHandler]:
        class Slow(QuietHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                image = base64.b64encode(png(3)).decode()
                last = json.dumps({"images": [image], "seeds": [3], "parameters": {}}).encode() + b"\n"
                lines = [json.dumps({"step": k, "total": 6, "image_index": 0}).encode() + b"\n" for k in range(1, 7)]
                self.close_connection = True
                for k, line in enumerate([*lines, last], start=1):
                    time.sleep(1.0 if k == pause_after else 0.15)
                    try:
                        self.wfile.write(line)
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client has given up

        return Slow

    with http_server(slow(pause_after=0)) as url:
        assert generate(url, MODEL, {"prompt": "a lighthouse"}, timeout=0.5).seeds == [3]
    with http_server(slow(pause_after=4)) as url, pytest.raises(ClientError, match=r"no answer from .* within 0.5 s"):
        generate(url, MODEL, {"prompt": "a lighthouse"}, timeout=0.5)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused, and no other process can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_an_unreachable_server_is_one_clear_line_and_exit_1(
    closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    assert run(url, tmp_path, "a lighthouse") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"client: cannot reach {url}: the server may not be running (scripts/serve.sh starts it)\n"


def test_a_server_that_never_answers_times_out_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # the kernel accepts the connection; nobody ever reads or answers
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        assert run(url, tmp_path, "a lighthouse", "--timeout", "0.2") == 1
    assert capsys.readouterr().err.startswith(f"client: no answer from {url} within 0.2 s")


def test_inpainting_sends_the_mask_file_as_base64(server: FakeTorchServe, tmp_path: Path) -> None:
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init.write_bytes(png(3))
    mask.write_bytes(png(4))
    assert run(server.url, tmp_path / "out", "a door", "--init-image", str(init), "--mask-image", str(mask)) == 0
    body = server.requests[0]["body"]
    assert set(body) == {"prompt", "init_image", "mask_image"}
    assert base64.b64decode(body["mask_image"], validate=True) == mask.read_bytes()
    how = ["--masked-content", "fill", "--inpaint-area", "only_masked", "--masked-area-padding", "16",
           "--resize-mode", "crop_and_resize", "--invert-mask"]  # fmt: skip
    assert run(server.url, tmp_path / "out", "a door", "--init-image", str(init), "--mask-image", str(mask), *how) == 0
    body = server.requests[1]["body"]
    assert (body["masked_content"], body["inpaint_area"], body["masked_area_padding"]) == ("fill", "only_masked", 16)
    assert body["resize_mode"] == "crop_and_resize" and body["invert_mask"] is True


@pytest.mark.parametrize("option", ["--init-image", "--mask-image"])
def test_a_missing_image_file_exits_2_naming_its_option_before_any_request(
    server: FakeTorchServe, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    init, missing = tmp_path / "init.png", tmp_path / "missing.png"
    init.write_bytes(png(3))
    images = {"--init-image": init, "--mask-image": init, option: missing}
    argv = [word for flag, path in images.items() for word in (flag, str(path))]
    assert run(server.url, tmp_path, "a lighthouse", *argv) == 2
    assert capsys.readouterr().err == f"client: cannot read {option} {missing}: No such file or directory\n"
    assert server.requests == []


def test_no_invert_mask_asks_for_nothing_and_needs_no_mask(server: FakeTorchServe, tmp_path: Path) -> None:
    """`--no-invert-mask` is the server's default said aloud: sent as it is, with or without a mask."""
    assert run(server.url, tmp_path, "a lighthouse", "--no-invert-mask") == 0
    assert server.requests[0]["body"] == {"prompt": "a lighthouse", "invert_mask": False}


def test_a_bad_url_is_a_clear_error_not_a_traceback() -> None:
    with pytest.raises(ClientError) as error:
        generate("127.0.0.1:8080", MODEL, {"prompt": "a lighthouse"}, timeout=1)
    assert str(error.value) == "the URL: expected http://HOST[:PORT] or https://..., got '127.0.0.1:8080'"


@pytest.mark.parametrize("url", ["https://sd.example.com", "HTTP://127.0.0.1:8080/", "http://[::1]:8080"])
def test_an_http_or_https_url_with_a_host_is_taken(url: str) -> None:
    assert check_url(url) is None


@pytest.mark.parametrize(
    ("option", "says"),
    [(["--url", "localhost:8080"], "--url: expected http://HOST[:PORT]"),
     (["--url", "http://127.0.0.1:abc"], "--url: 'http://127.0.0.1:abc' is not a URL"),
     (["--url", "http://[::1"], "--url: 'http://[::1' is not a URL"),
     (["--url", "http://:8080"], "--url: expected http://HOST[:PORT]"),
     (["--timeout", "0"], "--timeout: expected seconds above 0, got '0'"),
     (["--timeout", "nan"], "--timeout: expected seconds above 0, got 'nan'"),
     (["--timeout", "inf"], "--timeout: expected seconds above 0, got 'inf'")],
)  # fmt: skip
def test_a_bad_url_or_timeout_is_a_usage_error_before_anything_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], says: str
) -> None:
    outdir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["a lighthouse", "--outdir", str(outdir), *option])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err
    assert not outdir.exists()


def test_a_file_another_run_wrote_meanwhile_is_never_replaced(tmp_path: Path) -> None:
    """Two runs into one folder (of the client, or of the command lines, which write alike) may both number from the
    same n: a name already taken moves on to the next."""
    taken = tmp_path / "seed_4_00001.png"
    taken.write_bytes(b"another run's image")
    path, following = write_new(tmp_path, 4, 1, "png", b"ours")
    assert (path.name, following, path.read_bytes()) == ("seed_4_00002.png", 3, b"ours")
    assert taken.read_bytes() == b"another run's image"


@pytest.mark.parametrize(
    "body", [b"hello", json.dumps({"images": ["aGVs!bG8="], "seeds": [1], "parameters": {}}).encode()]
)
def test_an_answer_that_is_not_the_apis_json_is_a_client_error(body: bytes) -> None:
    """Not JSON, or an image that is not strict base64 (a lenient decoder would skip its "!" and write "hello" as
    the PNG): nothing is written."""

    class NotTorchServe(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with http_server(NotTorchServe) as url, pytest.raises(ClientError, match="is --url our TorchServe"):
        generate(url, MODEL, {"prompt": "a lighthouse"}, timeout=5)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ({"images": [], "seeds": []}, "answered with 0 images, 0 seeds"),
        ({"images": ["iVBORw0K", "iVBORw0K"], "seeds": [1, 2], "subseeds": [7]}, "2 images, 2 seeds and 1 subseeds"),
    ],
)
def test_an_answer_whose_images_and_seeds_do_not_pair_is_a_client_error(answer: dict, says: str) -> None:
    body = json.dumps(answer).encode()

    class Unpaired(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with http_server(Unpaired) as url, pytest.raises(ClientError, match=says):
        generate(url, MODEL, {"prompt": "a lighthouse"}, timeout=5)


def test_a_connection_lost_once_the_request_was_sent_is_not_called_unreachable() -> None:
    """The server read the request and went away (a worker's crash, a restart): that is not a server that cannot be
    reached, and the message says where to look."""

    class GoneAway(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.close_connection = True  # no answer at all

    with http_server(GoneAway) as url, pytest.raises(ClientError) as error:
        generate(url, MODEL, {"prompt": "a lighthouse"}, timeout=5)
    assert str(error.value).startswith(f"the connection to {url} broke off before its answer (")


def test_an_outdir_that_cannot_be_one_is_a_usage_error_before_the_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main(["a lighthouse", "--url", "http://127.0.0.1:9", "--outdir", str(taken)])
    assert exit_.value.code == 2
    assert f"--outdir {taken} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--strength", "0.5"], "--strength needs --init-image, or the hires fix's --hr-scale or --hr-resize-x/-y"),
        (
            ["--hr-scale", "1", "--hr-resize-y", "0", "--strength", "0.5"],
            "--strength needs --init-image, or the hires fix's",
        ),  # 1 and 0: no hires fix
        (["--mask-image", "mask.png"], "--mask-image needs --init-image"),
        (["--init-image", "init.png", "--mask-blur", "8"], "--mask-blur needs --mask-image"),
        (["--resize-mode", "crop_and_resize"], "--resize-mode needs --init-image"),
        (["--init-image", "init.png", "--inpaint-area", "only_masked"], "--inpaint-area needs --mask-image"),
        (["--hr-upscaler", "lanczos"], "--hr-upscaler needs an --hr-scale above 1 or --hr-resize-x/-y"),
        (["--hr-steps", "10"], "--hr-steps needs an --hr-scale above 1"),
        (["--hr-sampler", "DDIM"], "--hr-sampler needs an --hr-scale above 1"),
    ],
)
def test_an_option_without_the_one_it_belongs_to_is_a_usage_error(
    options: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["a lighthouse", *options])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err
