#!/usr/bin/env bash
# Set up (if needed) and serve: TorchServe with the checkpoint at models/ldm/stable-diffusion-v1/model.ckpt, or a
# tiny random-weight demo model when there is none. Stop with scripts/stop.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m scripts.server start
