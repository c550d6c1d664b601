#!/bin/sh
# The README's trade-off table: SmolLM2-135M's F16 conversion quantized to every type by
# `garage quantize`, then `garage eval compare` on 6 windows of 512 tokens of Persuasion.
# Usage: bench/quality_table.sh [WORKDIR]   (needs smollm2:135m in the store; ~10 minutes)
set -eu
work=${1:-$(mktemp -d)}
text=$(dirname "$0")/../../shared/data/austen/persuasion.txt
src=$(python -c "from garagelm.cli.resolve import resolve_model; print(resolve_model('smollm2:135m'))")
garage convert "$src" --type F16 --out "$work/smol-F16.gguf" --quiet
models=""
for t in Q8_0 Q6_K Q5_K_M Q5_1 Q5_0 Q4_K_M Q4_1 Q4_0; do
  garage quantize "$work/smol-F16.gguf" --type "$t" --out "$work/smol-$t.gguf" --quiet
  models="$models $work/smol-$t.gguf"
done
# shellcheck disable=SC2086
garage eval compare "$work/smol-F16.gguf" $models --text "$text" --chunks 6 \
  --json bench/results/quality-smollm2-135m.json --plot bench/results/quality-smollm2-135m.png
