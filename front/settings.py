"""Where TorchServe is and how long to wait for it: read once from the command line or the environment.

Environment variables are what a container sets; a command-line option, when given, wins over its variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# Seconds without a line from TorchServe (every generation is followed as a stream): a request's wait in TorchServe's
# queue and in its batch before its first step, and the decode after its last. TorchServe's responseTimeout in
# model-config.yaml, the longest it waits for a word from the worker too.
DEFAULT_TIMEOUT = 900.0


@dataclass(frozen=True)
class FrontSettings:
    """Everything the front is configured with."""

    inference_url: str = "http://127.0.0.1:8080"
    model: str = "sd"
    # Loopback by default, like TorchServe's own listeners (config.properties); a container sets 0.0.0.0.
    host: str = "127.0.0.1"
    # The original app's port: its users' bookmarks and clients point there.
    port: int = 5000
    # Seconds to wait for TorchServe's next bytes: a whole answer, or the next line of a progress stream.
    timeout: float = DEFAULT_TIMEOUT
    # Seconds to wait for a connection: TorchServe that does not accept one this fast is down, and the user is told.
    connect_timeout: float = 5.0
    # The most images one /imagine request may ask for (n_samples × n_iter): the front splits iterations into
    # requests TorchServe accepts, so without this bound one request could hold the GPU for hours.
    max_images: int = 64
    # The largest body read (it is held in memory): TorchServe's max_request_size in config.properties, which fits
    # a 10 MB init image in base64.
    max_body_bytes: int = 16 * 1024 * 1024

    @property
    def predictions_url(self) -> str:
        return f"{self.inference_url.rstrip('/')}/predictions/{self.model}"


ENVIRONMENT = {
    "inference_url": "SD_INFERENCE_URL",
    "model": "SD_MODEL_NAME",
    "host": "SD_FRONT_HOST",
    "port": "SD_FRONT_PORT",
    "timeout": "SD_FRONT_TIMEOUT",
}


def settings_from_environment(environ: Mapping[str, str] = os.environ) -> FrontSettings:
    """Settings from the SD_* variables; those not set keep their defaults. A malformed number is a ValueError
    naming the variable, so a container fails at start rather than on its first request."""
    values: dict[str, str | int | float] = {}
    for name, variable in ENVIRONMENT.items():
        if variable not in environ:
            continue
        kind = type(getattr(FrontSettings(), name))
        try:
            values[name] = kind(environ[variable])
        except ValueError:
            raise ValueError(f"{variable} must be {kind.__name__}, got {environ[variable]!r}") from None
    return FrontSettings(**values)
