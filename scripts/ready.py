"""Exit 0 when TorchServe can serve: every model it loads at start has a READY worker. The Kubernetes readiness probe.

    python -m scripts.ready [--config /home/model-server/config/config.properties] [--model sd]

TorchServe's /ping answers Healthy as soon as the frontend is up, while the workers are still loading a 4 GB model;
a pod that Kubernetes sent traffic to then would queue or refuse it. This asks the management API instead, which
the config keeps on 127.0.0.1 inside the pod: the probe runs there, so the API never has to leave it.
Standard library only, so that a probe every few seconds costs a few milliseconds of CPU, not a torch import.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scripts.server import read_properties, ready_workers

DEFAULT_CONFIG = "/home/model-server/config/config.properties"


def loaded_models(properties: dict[str, str]) -> list[str]:
    """Names of the models `load_models` registers at start: `name=file` gives name, `sd.mar` gives sd."""
    names = []
    for entry in filter(None, (e.strip() for e in properties.get("load_models", "").split(","))):
        if entry == "ALL":
            raise ValueError("load_models=ALL does not name the models to wait for; pass --model")
        name = entry.split("=", 1)[0] if "=" in entry else Path(entry).name.removesuffix(".mar")
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(os.environ.get("TS_CONFIG", DEFAULT_CONFIG)),
                        help="TorchServe's config.properties [TS_CONFIG] (%(default)s)")  # fmt: skip
    parser.add_argument("--model", action="append", help="model to wait for (repeatable; default: load_models)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per HTTP request (%(default)g)")
    args = parser.parse_args(argv)
    try:
        properties = read_properties(args.config)
        models = args.model or loaded_models(properties)
    except (OSError, ValueError) as error:
        print(f"ready: {error}", file=sys.stderr)
        return 2
    if not models:
        print(f"ready: {args.config} loads no model; pass --model", file=sys.stderr)
        return 2
    # TorchServe's own default when the config names none.
    management_url = properties.get("management_address", "http://127.0.0.1:8081")
    waiting = [model for model in models if not ready_workers(management_url, model, args.timeout)]
    if waiting:
        print(f"ready: no READY worker yet for {', '.join(waiting)} at {management_url}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
