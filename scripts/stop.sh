#!/usr/bin/env bash
# Stop what scripts/serve.sh started.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m scripts.server stop
