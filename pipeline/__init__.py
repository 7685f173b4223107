"""The distributed data plane: shards in, Zarr features and a Parquet manifest out."""
