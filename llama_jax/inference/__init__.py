"""The inference engine: a loaded model, generation and the one scoring engine.

loaded           LoadedModel: params placed on a mesh + tokenizer; makes the engines
sampler          Sampler: jitted prefill / decode over a KV cache, whole-generation loop
sampling_params  SamplingParams and the per-row token draw
decode_layout    decode-time param layouts and XLA options (CPU matvec, int8)
text_stream      streaming detokenisation, stop strings, chat on top of the Sampler
scoring          Scorer: batched log-likelihoods (eval, Llama3.score)
"""
