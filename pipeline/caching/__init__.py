"""The caching job: shards -> backbone + upsampler on Ray actors -> Zarr arrays, commit records, manifest."""
