"""Workflows on shards or caches behind the jobs: upsampler training and scoring, segmentation probes."""
