#!/usr/bin/env bash
# Install garagelm with its test dependencies (llama.cpp included, as the reference peer), then
# run the format/lint checks and the whole test suite. Run it inside a virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]'
# The C kernels are optional (without a compiler garagelm runs the torch path), so pip does not
# fail when they do not build; where there is a compiler, a failed build must not pass unseen.
if command -v cc >/dev/null && ! python -c "from garagelm.quant import cpu; assert not cpu.unbuilt(), cpu.unbuilt()"; then
  echo "tests/run.sh: C kernel variants this CPU runs did not build; 'pip install -v -e .' shows the compiler's error" >&2
  exit 1
fi
# llama.cpp built from source; with gcc 12 its AMX path crashes on the first decode, so AMX is off.
if ! python -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS='-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"' \
    python -m pip install -q llama-cpp-python==0.3.36
fi
# The web page is tested in Debian's Chromium (Playwright cannot download its own browser here).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "tests/run.sh: the web test needs Debian's chromium: sudo apt-get install chromium" >&2
  fi
fi
# The ARM (NEON) kernels are checked by cross-compiling them and running them under qemu-user.
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null
  else
    echo "tests/run.sh: the ARM kernel test needs: sudo apt-get install gcc-aarch64-linux-gnu qemu-user" >&2
  fi
fi
ruff format --check .
ruff check .
python -m pytest -q -rs "$@"  # -rs: every skip's reason (a variant this CPU cannot run, say)
