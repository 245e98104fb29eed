#!/usr/bin/env bash
# Packs what a GPU machine without network lacks into the git-ignored .gpu/a and .gpu/b (scripts/gpu_check.sh):
# the Python packages it has no copy of (bitsandbytes with its CUDA 13 library only, gguf, the serving stack)
# for its Python 3.12, as one compressed site folder, and SmolLM2's GGUF (from `onejump assets`) in two halves,
# so that each folder plus the working tree stays under the 64 MiB one command may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${1:-.cache/onejump/models/SmolLM2-135M-Instruct.Q4_1.gguf}
PKGS=(bitsandbytes==0.50.2 gguf==0.19.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic_core==2.50.4
      pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 uvicorn==0.54.0
      sse-starlette==3.7.0 opentelemetry-api==1.45.2 importlib-metadata zipp)  # fastapi imports opentelemetry
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp/wheels" "${PKGS[@]}"
mkdir -p "$tmp/site"
for w in "$tmp"/wheels/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
find "$tmp/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cpu*' ! -name '*cuda130*' -delete
rm -rf .gpu/a .gpu/b && mkdir -p .gpu/a .gpu/b
tar -cJf .gpu/a/site.tar.xz -C "$tmp/site" .
split -n 2 -d -a 2 "$GGUF" "$tmp/smollm2.gguf.part"
mv "$tmp/smollm2.gguf.part00" .gpu/a/ && mv "$tmp/smollm2.gguf.part01" .gpu/b/
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/a/smollm2.sha256
rm -rf "$tmp"
du -sh .gpu/a .gpu/b
