"""Paged KV cache: geometry, block pool, prefix cache, manager, storage."""
