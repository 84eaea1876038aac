"""The model: architecture config and presets, the transformer, sharding rules, LoRA, int8.

config       ModelConfig (frozen, hashable), presets, HF / Meta config readers, FLOP counts
transformer  the Llama 3 transformer, read top to bottom like the paper
attention    attention kernels: xla, cudnn (checked up front), TPU splash in shard_map
sharding     the one logical-axis -> mesh-axis rules table, meshes, sharded init
lora         LoRA adapters in the params tree and the projection hook
quantize     int8 weight-only quantisation and its projection hook
"""
