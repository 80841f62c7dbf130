#!/usr/bin/env bash
# Installs llama-cpp-python into a virtual environment with a build of only the library it loads.
#
# Why not `pip install llama-cpp-python`: PyPI has only its source for Linux, and its build compiles
# llama.cpp's `common` library and the multimodal one as well, which the Python package never loads
# (about 40% of a ~9 CPU-minute compile; docs/export.md). Here the Python package is installed with
# its own build switched off (LLAMA_BUILD=OFF) and libllama + ggml are compiled from the llama.cpp it
# vendors (the same sources, so the same runtime), then copied where the package loads them from.
#
#     tools/install-llama-cpp.sh [VENV]        # default .venv; `make llama-cpp` runs it
#
# Flags: GGML_NATIVE=OFF builds ggml's portable x86-64 variant (a cached build runs on another AVX2
# machine); -O1 compiles the heaviest files 30-50% faster than -O3 and the tests do not notice.
set -euo pipefail
VENV=${1:-.venv}
VERSION=0.3.36   # keep in step with pyproject.toml's `llama` extra (the pre-tokenizer table follows it)
PY="$VENV/bin/python"

if "$PY" - <<EOF 2>/dev/null
import llama_cpp, sys
sys.exit(llama_cpp.__version__ != "$VERSION")
EOF
then
    echo "llama-cpp-python $VERSION is installed in $VENV"
    exit 0
fi

if ! command -v c++ >/dev/null || ! command -v make >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing a C++ compiler (apt-get install g++ make)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ make >/dev/null
    else
        echo "error: a C++ compiler is needed to build llama.cpp (Debian: apt-get install g++ make)" >&2
        exit 2
    fi
fi
if ! command -v cmake >/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check cmake
    CMAKE="$VENV/bin/cmake"
else
    CMAKE=cmake
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$work"
tar xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION"

start=$(date +%s)
echo "building libllama from llama-cpp-python $VERSION's llama.cpp ($(nproc) jobs)"
"$CMAKE" -S "$src/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    '-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG' '-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG' \
    '-DCMAKE_INSTALL_RPATH=$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >"$work/configure.log" \
    || { cat "$work/configure.log" >&2; exit 1; }
"$CMAKE" --build "$work/build" --target llama -j "$(nproc)" >"$work/build.log" \
    || { tail -50 "$work/build.log" >&2; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

# The Python package alone: its CMake project with both of its builds off compiles nothing.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet --disable-pip-version-check "$src"
lib=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
mkdir -p "$lib"
find "$work/build" -name 'lib*.so*' \( -name 'libllama*' -o -name 'libggml*' \) -exec cp -P {} "$lib"/ \;
# llama.cpp's own Llama 2 (SentencePiece) vocabulary and its tokenizer test texts and ids, beside the library:
# tests/test_llama_cpp.py exports a tokenizer made from it and checks llama.cpp's ids for those texts
cp "$src"/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf* "$lib"/
"$PY" -c "import llama_cpp; llama_cpp.llama_backend_init(); print('llama-cpp-python', llama_cpp.__version__, 'loads', '$lib')"
