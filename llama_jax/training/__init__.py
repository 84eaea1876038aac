"""The trainer and what only training needs.

trainer     the one linear training script (banner sections), train / eval steps
experiment  the experiment-config schema, `--config.x=y` overrides, legacy flags
data        the trainer's data: tokenizer (load or train once), splits, iterators
loss        next-token cross-entropy in chunks of tokens
optim       schedules and AdamW with a decay mask
metrics     tokens/s, MFU, metrics.jsonl, TensorBoard, logging
finetune    the fine-tune experiment defaults and the checks before a fine-tune runs
plan        `llama3 plan`: the real steps compiled for a TPU topology (AOT, from a CPU)
"""
