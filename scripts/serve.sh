#!/usr/bin/env bash
# Set up (if needed) and serve: TorchServe with the checkpoint at models/ldm/stable-diffusion-v1/model.ckpt, or a
# tiny random-weight demo model when there is none. Stop with scripts/stop.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# No Java at all is said before the setup's downloads; its version is checked once Python is set up (scripts/server.py).
if [ -z "${JAVA_HOME:-}" ] && ! command -v java >/dev/null 2>&1; then
    echo "serve: TorchServe needs Java 17 or newer, and there is no java on PATH (nor a JAVA_HOME)." \
        "Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless; others: see README.md, Requirements." >&2
    exit 1
fi
scripts/setup.sh
exec .venv/bin/python -m scripts.server start
