"""`sd-front`: serve the front with uvicorn.

    sd-front --port 5000 --inference-url http://127.0.0.1:8080 --model sd

Each option falls back to its environment variable (SD_FRONT_PORT, SD_INFERENCE_URL, SD_MODEL_NAME, SD_FRONT_HOST,
SD_FRONT_TIMEOUT), then to the default, so a container configures it without a command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import uvicorn

from front.app import create_app
from front.settings import FrontSettings, settings_from_environment


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> FrontSettings:
    """Settings from the command line over the environment over the defaults."""
    try:
        base = settings_from_environment(environ)
    except ValueError as error:
        sys.exit(f"sd-front: {error}")
    parser = argparse.ArgumentParser(prog="sd-front", description="The /imagine API and web UI in front of TorchServe.")
    add = parser.add_argument
    add("--port", type=int, default=base.port, help="port to listen on [SD_FRONT_PORT] (%(default)s)")
    add("--host", default=base.host, help="address to listen on, 0.0.0.0 for all [SD_FRONT_HOST] (%(default)s)")
    add("--inference-url", default=base.inference_url, help="TorchServe inference API [SD_INFERENCE_URL] (%(default)s)")
    add("--model", default=base.model, help="model name on TorchServe [SD_MODEL_NAME] (%(default)s)")
    add(
        "--timeout",
        type=float,
        default=base.timeout,
        help="seconds TorchServe may be silent [SD_FRONT_TIMEOUT] (%(default)g)",
    )
    args = parser.parse_args(argv)
    return FrontSettings(
        inference_url=args.inference_url, model=args.model, host=args.host, port=args.port, timeout=args.timeout
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    print(f"sd-front: http://{settings.host}:{settings.port}/ -> {settings.predictions_url}", flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
