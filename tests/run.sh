#!/usr/bin/env bash
# Install garagelm with its test dependencies (llama.cpp included, as the reference peer), then
# run the format/lint checks and the whole test suite. Run it inside a virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]'
# llama.cpp built from source; with gcc 12 its AMX path crashes on the first decode, so AMX is off.
if ! python -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS='-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"' \
    python -m pip install -q llama-cpp-python==0.3.36
fi
ruff format --check .
ruff check .
python -m pytest -q "$@"
