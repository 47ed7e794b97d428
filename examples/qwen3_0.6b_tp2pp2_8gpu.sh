#!/usr/bin/env bash
# ConSA on one 8-GPU node: a Qwen3-0.6B-shaped model at TP2 x PP2 x DP2.
#
#   1. import the Hugging Face checkpoint, sharded for TP2 x PP2;
#   2. learn the allocation (gates + weights, KV-head granularity, 75% SWA, W=1024);
#   3. finalize it (allocation.json, heatmap, fixed-mode checkpoint);
#   4. continued training of the hybrid model with the allocation fixed;
#   5. export back to Hugging Face (the head-wise allocation runs through the consa attention:
#      `import megatron_consa` before `from_pretrained`), and generate from the export.
#
# Usage: HF=/models/Qwen3-0.6B DATA=/data/corpus_text_document OUT=/ckpt/consa bash examples/qwen3_0.6b_tp2pp2_8gpu.sh
#
# Run it again after a failure (or a lost node) and it goes on where it stopped: the import
# is skipped when done, each phase resumes from its own latest checkpoint, finalize runs once.
set -euo pipefail
: "${HF:?set HF to a local Qwen3-0.6B directory}" "${DATA:?set DATA to a preprocessed dataset prefix}"
OUT=${OUT:-runs/qwen3-0.6b}
NPROC=${NPROC:-8}
TP=2; PP=2

python tools/convert_hf_to_megatron.py --hf-path "$HF" --save "$OUT/imported" \
    --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP --dtype bf16

COMMON=(
  --hf-config "$HF" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF"
  --data-path "$DATA" --split 989,10,1
  --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --sequence-parallel --bf16
  --num-workers 2 --manual-gc --manual-gc-interval 100
  --seq-length 8192 --micro-batch-size 1 --global-batch-size 64
  --consa-window 1024 --consa-granularity kv_head
  --log-interval 10 --eval-interval 200 --eval-iters 10
)

# A phase starts from the previous phase's weights (--pretrained-checkpoint) while its own --save holds no
# checkpoint, and resumes its own run once it does.
torchrun --nproc-per-node "$NPROC" -m megatron_consa.train "${COMMON[@]}" \
    --load "$OUT/learn" --pretrained-checkpoint "$OUT/imported" --consa-phase learn --consa-target-sparsity 0.75 \
    --train-iters 1500 --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 50 \
    --save "$OUT/learn" --save-interval 250 --tensorboard-dir "$OUT/tensorboard/learn"

if [[ ! -f "$OUT/finalized/allocation.json" ]]; then
  python tools/finalize_allocation.py --load "$OUT/learn" --save "$OUT/finalized"
fi

torchrun --nproc-per-node "$NPROC" -m megatron_consa.train "${COMMON[@]}" \
    --load "$OUT/fixed" --pretrained-checkpoint "$OUT/finalized" --consa-phase fixed \
    --train-iters 5000 --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 100 \
    --save "$OUT/fixed" --save-interval 500 --tensorboard-dir "$OUT/tensorboard/fixed"

# the fixed checkpoint carries its allocation: the export writes it into config.json
python tools/convert_megatron_to_hf.py --load "$OUT/fixed" --save "$OUT/hf-hybrid" --overwrite

python tools/generate.py --hf-path "$OUT/hf-hybrid" --prompt "The capital of France is" --max-new-tokens 32 --kv-report
