#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has JAX, flax, optax, orbax, torch, torchvision,
# transformers, ...; not grain, TFDS, ml_collections, segment_anything, sam2, ...), for its
# Python 3.12, at the versions this checkout's .venv holds, into .whl/ (gitignored).
# Run here, in the repo root, with the test venv installed (README's test command):
#   bash benchmarks/gpu/wheels.sh
# then send `.whl` with every device call (carry) and start its command with
#   source benchmarks/gpu/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=".venv/bin/pip"
mkdir -p .whl/sam2
freeze=$($PIP list --format=freeze 2>/dev/null)
version() { grep -i "^${1//-/[-_]}==" <<<"$freeze" | head -1; }
binary=(array-record dm-pix dm-tree docstring-parser googleapis-common-protos grain hydra-core
        immutabledict ml-collections omegaconf portpicker pycocotools segment-anything
        simple-parsing tensorboardx tensorflow-datasets tensorflow-metadata termcolor toml
        annotated-types pydantic pydantic-core typing-inspection)
for p in "${binary[@]}"; do
  v=$(version "$p"); [ -n "$v" ] || { echo "not in .venv: $p" >&2; continue; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$v"
done
# sdist-only packages: pure-Python wheels built here.
sdist=()
for p in antlr4-python3-runtime iopath promise; do sdist+=("$(version "$p")"); done
$PIP wheel -q --no-deps -w .whl "${sdist[@]}"
SAM2_BUILD_CUDA=0 $PIP wheel -q --no-deps --no-build-isolation -w .whl/sam2 sam2==1.1.0
du -sh .whl
