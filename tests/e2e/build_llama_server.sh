#!/usr/bin/env bash
# Builds llama.cpp's own server (llama-server: /infill, /props, /v1/*) from the sources
# that the llama-cpp-python release pinned in .ci/run vendors, for the remote-backend tests.
# The binary is kept in ~/.cache/codevista-llama-server/VERSION/ (seconds after the first
# build, ~10-15 min on 2 cores the first time). Prints the binary's path.
set -euo pipefail
VERSION=0.3.36
DEST="${CODEVISTA_LLAMA_SERVER_CACHE:-$HOME/.cache/codevista-llama-server}/$VERSION"
BIN="$DEST/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null || { echo "cmake is needed to build llama-server" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK"/llama_cpp_python-$VERSION.tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# a portable CPU build of the server target only
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$DEST"
cp "$WORK/build/bin/"* "$DEST/"
echo "$BIN"
