#!/usr/bin/env bash
# The GPU figures of issue 6 in two or three device-tool calls (see bench/RESULTS.md, section 6).
#   .gpu/a/part_00, .gpu/b/part_01: the SmolLM2 GGUF split in two by `bash bench/gpu_default_model.sh pack`, carried in
#   two back-to-back calls (one call carries at most 64 MiB); .gpu/b/*.whl: the gguf wheel.
# Stage "prep"  (call 1, carry .gpu/a): stash the first half.
# Stage "default" (call 2, carry .gpu/b): the default model on this GPU, eager / static /
#   draft trees (verify, 16 nodes: more rows per pass, which a GPU at batch 1 runs nearly free) /
#   compiled / CUDA graphs / draft trees under CUDA graphs; every JSON (7) lands in $OUT.
# Stage "release" (an H200 call): the full-size model with random weights: `info` (where each part
#   lives, its weight bytes, the peak after loading), then bench eager and under CUDA graphs.
set -euo pipefail
stage=$1
export PYTHONUNBUFFERED=1 TWOTOWER_CACHE=/root/twotower-cache TWOTOWER_SMOLLM2_GGUF=/root/g/smollm2.gguf
mkdir -p /root/g
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
bench() {   # bench NAME ARGS...: one JSON per run into $OUT (at most 8 files come back), a summary line
  local name=$1; shift
  python3 -m twotower bench --device "${DEVICE:-cuda}" --json "$@" > "$OUT/${gpu}_$name.json" 2> "$OUT/${gpu}_$name.log" || {
    echo "$name FAILED"; tail -5 "$OUT/${gpu}_$name.log"; return 0; }
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'ratio', r['ratio'],
    'AR', r['ar']['tokens_per_second'], 'diffusion', r['diffusion']['tokens_per_second'],
    'tok/NFE', r['diffusion']['tokens_per_nfe'], 'peak GB', r['peak_memory'].get('gb'))" "$OUT/${gpu}_$name.json" "$name"
  rm -f "$OUT/${gpu}_$name.log"
}
case $stage in
prep)
  cp .gpu/a/part_00 /root/g/ && nvidia-smi --query-gpu=name,memory.total --format=csv ;;
default)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/*.whl
  export PYTHONPATH=/tmp/site
  cat /root/g/part_00 .gpu/b/part_01 > /root/g/smollm2.gguf
  common=(--prompts 8 --max-new-tokens 128 --repeats 3)
  bench default_adaptive "${common[@]}" --warmup 2
  bench default_fixed_T4 "${common[@]}" --warmup 2 --steps-per-block fixed --steps 4 --stream-repeats 0
  bench default_static "${common[@]}" --warmup 2 --static --stream-repeats 0
  bench default_tree16 "${common[@]}" --warmup 2 --draft-nodes 16 --stream-repeats 0
  bench default_compile "${common[@]}" --warmup 3 --compile --stream-repeats 0
  bench default_cudagraphs "${common[@]}" --warmup 3 --compile --compile-mode reduce-overhead
  bench default_tree16_cudagraphs "${common[@]}" --warmup 3 --draft-nodes 16 --compile --compile-mode reduce-overhead \
      --stream-repeats 0 ;;
release)
  python3 -m twotower info random:nemotron-h-release --device cuda --json > "$OUT/${gpu}_release_info.json" \
      && grep -E "device|weight_bytes|peak" "$OUT/${gpu}_release_info.json"   # where each part lives, loading's peak
  common=(--model random:nemotron-h-release --prompts 2 --max-new-tokens 64 --no-hf)
  bench release_random_T16 "${common[@]}" --warmup 1 --stream-repeats 1
  bench release_random_T4 "${common[@]}" --warmup 1 --steps 4 --stream-repeats 0
  bench release_random_T4_cudagraphs "${common[@]}" --warmup 2 --steps 4 --stream-repeats 0 \
      --compile --compile-mode reduce-overhead ;;
esac
