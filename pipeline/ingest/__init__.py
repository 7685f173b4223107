"""Turning image datasets into WebDataset shards with a per-shard sample-count index."""
