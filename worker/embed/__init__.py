"""Embedding models: `/v1/embeddings` from an encoder (BERT family) or a causal LM's last hidden state, batched by a
token budget in a worker of their own, with no KV cache and no decode loop."""
