#!/usr/bin/env bash
# The Python packages that the device tool's GPU image lacks, or has older than moe-cli's tests need, as wheels
# in .whl/ (ignored by git), for `bash bench/gpu_suite.sh` there (carry .whl; nothing can be downloaded there).
# The image (read 2026-11, /work/.library/device/KINDS.md) has Python 3.12 with torch, triton, timm, tokenizers,
# safetensors, huggingface-hub, pyarrow, pandas, pytest and pytest-xdist, and transformers 5.17 (moe-cli needs
# >= 5.18); it has no datasets or lpips. The versions are resolved against the image's huggingface-hub, tokenizers,
# safetensors and numpy (as read there; a transformers that needs a newer hub would not import), datasets' own
# pins choose dill and multiprocess, and only those five packages are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl /tmp/gpu-wheels
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
printf '%s\n' huggingface-hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0 numpy==2.5.2 > /tmp/gpu-image.txt
PIP_CONSTRAINT=/tmp/gpu-image.txt python3 -m pip download -q "${target[@]}" -d /tmp/gpu-wheels "transformers>=5.18" \
  "datasets>=3"
python3 -m pip download -q "${target[@]}" --no-deps -d /tmp/gpu-wheels "lpips>=0.1.4"
mkdir -p .whl
for name in transformers datasets dill multiprocess lpips; do
  cp /tmp/gpu-wheels/"$name"-*.whl .whl/
done
du -sh .whl && ls .whl
