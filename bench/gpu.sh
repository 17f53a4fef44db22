#!/usr/bin/env bash
# One prepared script for a GPU machine: real tokens/s per GPU and MFU of sft-launch, bf16, packing
# off/on x gradient checkpointing off/on, on SmolLM2-135M (the shipped GGUF) and on a 1B-class
# Llama built from config (random weights: throughput only). Run from the repository root after the
# README's install (with the machine's CUDA torch):   bash bench/gpu.sh [rounds]
# Prints one line per launch and a table; MFU = 6 * parameters * tokens/s / peak bf16 FLOP/s
# (PEAK_TFLOPS, default 989 for an H100/H200 SXM dense bf16).
set -euo pipefail
ROUNDS=${1:-1}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
PY=${PY:-.venv/bin/python}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "no GPU visible to torch"; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PY - "$WORK/dolly_like.jsonl" <<'EOF'
import json, sys
sys.path.insert(0, ".")
from bench.throughput import dolly_like_rows
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in dolly_like_rows(20000)))
EOF
LLAMA_1B='{model_type: llama, hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: 16, num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 49152, max_position_embeddings: 2048, tie_word_embeddings: true}'
# The de-quantized SmolLM2 folder (its tokenizer serves the 1B model too) and both parameter counts.
read -r SMOL_DIR SMOL_PARAMS LLAMA_PARAMS < <($PY - "$LLAMA_1B" <<'EOF'
import sys, torch, yaml
sys.path.insert(0, ".")
from transformers import AutoConfig, AutoModelForCausalLM
from launcher.cli import cache_dir
from trainer.config import load_config
from trainer.model import prepare_pretrained
smol = prepare_pretrained(load_config("configs/gpt_ft.yaml").model, cache_dir())
def count(config):
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
arch = yaml.safe_load(sys.argv[1])
print(smol, count(AutoConfig.from_pretrained(smol)), count(AutoConfig.for_model(arch.pop("model_type"), **arch)))
EOF
)
run() {  # name, params, extra --set args...
  local name=$1 params=$2; shift 2
  local out="$WORK/run-$RANDOM"
  $PY -m launcher.cli configs/gpt_ft.yaml --output "$out" --workers-per-node "$GPUS" \
    --set data.train_file="\"$WORK/dolly_like.jsonl\"" --set data.max_length=512 --set finetune='{mode: global}' \
    --set train.max_steps=30 --set train.eval_every=30 --set train.log_every=1 --set train.micro_batch_size=8 \
    --set deepspeed.precision=bf16 --set data.cache_dir="\"$WORK/cache\"" "$@" > "$out.log" 2>&1 || { tail -30 "$out.log"; exit 1; }
  $PY - "$out/tensorboard" "$name" "$params" "$GPUS" "$PEAK_TFLOPS" <<'EOF'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
tb, name, params, gpus, peak = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
acc = EventAccumulator(tb, size_guidance={"scalars": 0}); acc.Reload()
tps = statistics.median([e.value for e in acc.Scalars("train/tokens_per_s")][5:])
pad = statistics.median([e.value for e in acc.Scalars("train/padding_fraction")][5:])
mfu = 6 * params * tps / (gpus * peak * 1e12)
print(f"| {name} | {tps / gpus:,.0f} | {pad:.2f} | {100 * mfu:.1f}% |", flush=True)
EOF
}
echo "| run | real tokens/s per GPU | padding | MFU |"
echo "|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  for packing in false true; do
    for ckpt in false true; do
      run "SmolLM2-135M packing=$packing grad_ckpt=$ckpt" "$SMOL_PARAMS" \
        --set data.packing=$packing --set train.gradient_checkpointing=$ckpt
      run "Llama-1B (config) packing=$packing grad_ckpt=$ckpt" "$LLAMA_PARAMS" \
        --set model.name_or_path=null --set model.gguf_file=null --set model.architecture="$LLAMA_1B" \
        --set model.tokenizer="\"$SMOL_DIR\"" --set data.packing=$packing --set train.gradient_checkpointing=$ckpt
    done
  done
done
