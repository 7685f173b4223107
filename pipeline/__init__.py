"""The distributed data plane: WebDataset shards in, Zarr features and a Parquet manifest out.

    caching/    the caching job: driver, shard scheduler, Ray worker pool, per-shard processing,
                output store, commit log, manifest, storage presets, the output lease
    storage/    object storage and shard I/O: fsspec filesystems and credentials, shard resolution
                and strict streaming, image decoding and resizing
    ingest/     datasets into shards: COCO folders, the shard writer, scikit-image sample photographs
    reading/    reading a finished cache: FeatureCache / LabelledFeatures, its key index, PCA previews
    workflows/  jobs built on shards or caches: upsampler training and scoring, segmentation probes

How features are computed is `featup_ops.FeatureModel`'s business; nothing here knows more of it.
"""
