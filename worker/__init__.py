"""The engine process: scheduler, paged KV cache, model runner and sampler behind a socket-free engine core."""
