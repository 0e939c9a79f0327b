"""Attention kernels over kvtier's paged KV cache (the bottom layer: no imports from the engine)."""
