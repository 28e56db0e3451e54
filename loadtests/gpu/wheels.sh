#!/usr/bin/env bash
# Wheels the GPU machine's Python lacks (it has torch, transformers, accelerate, peft, safetensors, httpx and
# prometheus-client, and no network), fetched here for CPython 3.10-3.12 on x86-64 Linux, to carry along with the tree.
#   loadtests/gpu/wheels.sh [DIR]        (default: wheels/, ignored by git)
set -euo pipefail
dir=${1:-wheels}
mkdir -p "$dir"
packages=(msgspec pydantic llguidance fastapi uvicorn pytest pytest-timeout jsonschema)
# manylinux_2_31: llguidance 1.9 and newer publish no older tag
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
    --platform manylinux_2_31_x86_64)
for version in 3.10 3.11 3.12; do
    python -m pip download --quiet --only-binary=:all: "${platforms[@]}" --python-version "$version" --dest "$dir" \
        "${packages[@]}"
done
# gguf alone: its dependencies (numpy, pyyaml, tqdm) come with torch and transformers there, and numpy for three
# Pythons would be most of the carry's 64 MiB
python -m pip download --quiet --no-deps --dest "$dir" gguf
# bitsandbytes (quantization int8, nf4, fp4): one wheel for every Python (py3-none), 43 MB; torch and numpy are there
python -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 --dest "$dir" \
    bitsandbytes
du -sh "$dir"
