#!/usr/bin/env bash
# The GPU checks in one run, on a GPU machine without network, from the repository root:
#   loadtests/gpu_check.sh OUT_DIR [WHEELS_DIR]
# installs what the machine's Python lacks from WHEELS_DIR (made by loadtests/gpu/wheels.sh; default wheels/), runs
# the tests marked gpu (at most 3 minutes), then the benchmark (loadtests.gpu.bench, at most 5.5 minutes; the whole fits
# a 10-minute command), and writes what it saw to OUT_DIR:
# device.txt, install.txt, pytest_gpu.txt, bench.txt and bench/ (bench.json, bench.md), and summary.txt (one line a
# step with its exit status). A step that fails does not stop the later ones. SKIP_BENCH=1 leaves the benchmark out;
# PROFILE=1 adds loadtests.gpu.profile_decode (profile.txt, profile/profile.json), at most 2.5 minutes more.
set -uo pipefail
# the GPU image may have python3 alone: a shim on PATH makes `python` that one
if ! command -v python >/dev/null; then
    shim=$(mktemp -d)
    ln -s "$(command -v python3)" "$shim/python"
    export PATH="$shim:$PATH"
fi
out=${1:?usage: loadtests/gpu_check.sh OUT_DIR [WHEELS_DIR]}
wheels=${2:-wheels}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"

step() {  # step NAME LOG COMMAND...: run, keep its output in LOG, note its exit status in the summary
    local name=$1 log=$2
    shift 2
    local start=$SECONDS
    "$@" > "$log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - start)) s" >> "$summary"
    return $status
}

step device "$out/device.txt" bash -c 'nvidia-smi; python -c "import sys, torch; print(sys.version); \
print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); \
from worker import flash_attention; print(\"flash-attn:\", flash_attention.installed_version())"'
if [ -d "$wheels" ]; then
    step install "$out/install.txt" python -m pip install --no-index --find-links "$wheels" \
        msgspec pydantic llguidance gguf fastapi uvicorn pytest pytest-timeout bitsandbytes jsonschema
fi
step tests "$out/pytest_gpu.txt" env PYTHONPATH="$PWD" timeout 180 python -m pytest -m gpu -q -p no:cacheprovider -rs \
    --continue-on-collection-errors tests/worker
# bounded here as well as by its own --time-limit (after which it starts nothing new), so the summary always comes
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    step bench "$out/bench.txt" env PYTHONPATH="$PWD" timeout 330 python -m loadtests.gpu.bench --out "$out/bench" \
        --time-limit 240
fi
# where the benchmark's targets are missed: what one decode step spends, on the host and on the GPU
if [ "${PROFILE:-0}" = 1 ]; then
    step profile "$out/profile.txt" env PYTHONPATH="$PWD" timeout 150 python -m loadtests.gpu.profile_decode \
        --out "$out/profile" --models llama-3.2-1b llama-3.1-8b
fi
cat "$summary"
