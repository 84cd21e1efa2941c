"""Runtime: KV cache, sampling, the generate loop (and, later, the batching scheduler)."""
