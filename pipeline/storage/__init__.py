"""Object storage and shard I/O: filesystems for any URL, shard patterns and streaming, image decoding."""
