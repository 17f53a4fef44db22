#!/usr/bin/env bash
# Rehearses the GPU check's carried route HERE, on this CPU machine, before a lent GPU machine sees it:
#   1. a fresh venv (outside the repository) holding only the lent image's package set: python 3.12,
#      torch 2.11.0 (PyPI's build of it, which runs on the CPU here; ~4 GB with its CUDA libraries,
#      downloaded once), transformers 5.17.0 and the other versions the device notes give, the rest
#      as PyPI resolves them; no ray, deepspeed, datasets or gguf (checked);
#   2. bench/gpu/fetch.sh's folder, made if missing: the very files that travel;
#   3. bench/gpu/run.sh, the command the lent machine runs: the carried wheels installed with
#      --no-index into a target folder, then the check, here on the CPU in fp32 for 2 steps on the
#      same cases with 2-layer models, the loss cases at 256 and 512 tokens instead of 4k and 8k
#      (the figures mean nothing; that every case runs does). The liger cases are refused here: no
#      CUDA (liger-kernel's wheel is installed, as there).
#     bash bench/gpu/rehearse.sh [check.py options]     # later options win, e.g.:
#     bash bench/gpu/rehearse.sh --only 'len=4096 loss=chunked' --loss-lengths 4096 8192
# PY312: a python 3.12 (default: python3.12 on PATH, else pyenv's); VENV: default /tmp/sft-gpu-rehearsal.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-/tmp/sft-gpu-rehearsal}
if [ -z "${PY312:-}" ]; then  # Debian 12 has no python3.12 package; this machine's pyenv holds one
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12.*/bin/python3; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$candidate; break
    fi
  done
fi
[ -n "${PY312:-}" ] || { echo "no python 3.12 here: set PY312" >&2; exit 2; }
if [ ! -f "$VENV/.complete" ]; then  # built once; a half-built one is started again
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  # The image's versions where the device notes give them (KINDS.md, 2026-11); the rest unpinned.
  "$VENV/bin/python" -m pip install -q torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 \
    huggingface_hub==1.33.0 safetensors==0.8.0 tokenizers==0.23.2 numpy==2.5.2 peft tensorboard pyarrow pandas \
    pyyaml regex typer xxhash fsspec psutil py-cpuinfo msgpack einops ninja nvidia-ml-py typing-extensions
  touch "$VENV/.complete"
fi
for missing in ray deepspeed datasets gguf; do
  if "$VENV/bin/python" -c "import $missing" 2>/dev/null; then
    echo "$VENV has $missing, which the lent image lacks: remove the venv and start again" >&2; exit 1
  fi
done
[ -d bench/gpu/carry/wheels ] || bash bench/gpu/fetch.sh
PY="$VENV/bin/python" SITE="$VENV/carried" bash bench/gpu/run.sh --device cpu --steps 2 --layers 2 \
  --micro-batch 2 --max-length 128 --loss-lengths 256 512 --loss-micro-batch 2 --rows 300 --threads 2 \
  --budget 1800 --case-timeout 300 "$@"
