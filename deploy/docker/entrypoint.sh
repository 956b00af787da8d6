#!/bin/sh
# The server image's command: TorchServe in the foreground, so that the container lives exactly as long as its Java
# frontend (a crash ends the container and Kubernetes restarts it). tini, PID 1, forwards signals and reaps workers.
#
# Everything comes from the config file: listeners, model_store, load_models. Paths default to the image's layout
# and can be moved with TS_CONFIG and TS_HOME (TorchServe's pid file, Java's temp folder with the workers' sockets,
# unpacked archives, log files); extra arguments go to torchserve as they are.
set -eu
: "${TS_CONFIG:=/home/model-server/config/config.properties}"
: "${TS_HOME:=/tmp/torchserve}"
mkdir -p "$TS_HOME/logs"
export TMPDIR="$TS_HOME" TEMP="$TS_HOME"
export LOG_LOCATION="${LOG_LOCATION:-$TS_HOME/logs}" METRICS_LOCATION="${METRICS_LOCATION:-$TS_HOME/logs}"
# The image's PYTHONPATH (/app, for the probes' `python -m scripts...`) is not the workers': TorchServe puts the
# model's folder after it, so /app's handler and ldm would shadow the archive's, and an image newer than its archive
# would run the archive's sd_handler.py on the image's packages.
unset PYTHONPATH
exec torchserve --foreground --ncs --ts-config "$TS_CONFIG" "$@"
