#!/usr/bin/env bash
# The README's first command: install, build the Shakespeare dataset, train its tokenizer,
# train a small Llama on the CPU, sample from it, then evaluate it. 12-30 minutes on 2 CPU cores
# (measured; the README says on what).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run=${RUN_DIR:-runs/shakespeare_tiny}
# The shakespeare TFDS dataset and the SentencePiece tokenizer are built on first use.
.venv/bin/llama3 train --config experiments/shakespeare_tiny.py --model_path "$run" "$@"
echo
echo "=== samples from $run ==="
.venv/bin/llama3 generate --model_path "$run" --dtype float32 --max_new_tokens 60 \
  --temperature 0.8 --top_p 0.95 --seed 0 \
  "ROMEO:" "To be, or not to be" "KING HENRY. Once more unto the breach"
echo
echo "=== evaluation of $run: held-out Shakespeare perplexity, and English trivia QA ==="
.venv/bin/llama3 eval --model_path "$run" --tasks shakespeare,trivia_qa_en --limit 50 \
  --output "$run/eval_results.json"
