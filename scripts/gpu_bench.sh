#!/usr/bin/env bash
# The GPU rows of docs/PERFORMANCE.md in one go (the rows in under 8 minutes on one H200, the whole within the 10 a
# device command may run): the CUDA tests (fp32 reproduces the reference, the fast path stays within fp16 rounding), then `python -m
# scripts.benchmark gpu`, then the PNG encoding rows. Each step has its own time limit, summing to 570 s (plus a few
# seconds of unpacking and version checks), so one that hangs costs its own results only. Writes everything to OUT_DIR: machine.txt, gpu-tests.txt, benchmark.log, gpu.md
# (the table), gpu.json and png.txt. The table is rewritten after every row: a row cut short loses itself alone.
#
# Installs nothing from the network. Python packages the machine lacks (diffusers, omegaconf, ftfy, ...) may be put
# as wheels in ./.whl beforehand (docs/PERFORMANCE.md has the `pip download` line); they go to a scratch folder.
#
#   scripts/gpu_bench.sh OUT_DIR        (PYTHON=... to pick the interpreter, BUDGET=... seconds for the rows)
# Every step runs whatever the others did; the exit status is the first failed step's (0: all passed).
set -uo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    if "$python" -m pip --version >/dev/null 2>&1; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl ||
            exit 1
    else  # no pip: these wheels hold no .data folder (docs/PERFORMANCE.md's four), so unpacking one installs it
        for wheel in .whl/*.whl; do "$python" -m zipfile -e "$wheel" "$site" || exit 1; done
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
# Nothing may wait on a network that is not there (diffusers and transformers look for the Hub otherwise).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
    nvidia-smi
    "$python" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
    # What torch.compile needs on top of torch: Triton, a C compiler and Python's headers.
    "$python" -c "import triton; print('triton', triton.__version__)" || echo "no triton: compiled rows will fail"
    command -v cc || command -v gcc || echo "no C compiler: compiled rows will fail"
    "$python" -c "import os, sysconfig; print('Python.h', os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))"
    java -version 2>&1 | head -1 || echo "no java here: TorchServe cannot run on this machine"
} >"$out/machine.txt" 2>&1
started=$SECONDS
# -v: each test's name and outcome as it ends, so a run cut short still says how far it got and where.
# 180 s: two cold Inductor compiles of the tiny UNet and decoder come first (135 s and 47 s with the CPU's Inductor).
timeout -k 10 180 "$python" -m pytest -v -rfE --durations=12 -p no:cacheprovider -p no:warnings --noconftest -m gpu \
    tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
status=$?
echo "tests: $((SECONDS - started)) s"
# No row starts after BUDGET seconds; one that started before may run on (a full-size compile takes a minute or two).
# On an H200 (2026-11-30) the rows before those that compile again took about 150 s, and each of those 45-75 s:
# 280 s lets the last (bf16) start, and 360 s lets it end.
timeout -k 10 360 "$python" -m scripts.benchmark gpu --out "$out" --budget "${BUDGET:-280}" 2>&1 | tee "$out/benchmark.log"
step=$?
[ "$status" -ne 0 ] || status=$step
# The GPU host's cores encode the answers' PNGs: a few seconds.
timeout -k 10 30 "$python" -m scripts.benchmark png --repeats 5 2>&1 | tee "$out/png.txt"
step=$?
[ "$status" -ne 0 ] || status=$step
echo "total: $((SECONDS - started)) s"
exit "$status"
