"""The manifest: one row per input sample, saying where its features live, at what shape, and how the image was
resized and cropped (`--resize fit` caches hold arrays of several shapes: one per shape and shard attempt).

Each shard attempt writes its rows as a Parquet part; `assemble` streams the committed parts into one
manifest.parquet, a row group at a time, so the driver never holds more than a row group of rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.images import Geometry

SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),  # position of the sample in its shard
    pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
    pa.field("error", pa.string()),
    pa.field("storage", pa.string()),  # the storage preset (pipeline/presets.py)
    pa.field("features_array", pa.string()),  # Zarr array path inside the store, e.g. features/shard-000003_ab12cd34
    pa.field("lowres_array", pa.string()),
    pa.field("labels_array", pa.string()),  # aligned segmentation labels, when the sample had (or got) one
    pa.field("index", pa.int32()),  # row of this sample in those arrays
    pa.field("feature_height", pa.int32()),
    pa.field("feature_width", pa.int32()),
    pa.field("orig_height", pa.int32()),
    pa.field("orig_width", pa.int32()),
    pa.field("orig_mode", pa.string()),
    pa.field("exif_orientation", pa.int32()),
    pa.field("resized_height", pa.int32()),
    pa.field("resized_width", pa.int32()),
    pa.field("crop_top", pa.int32()),
    pa.field("crop_left", pa.int32()),
    pa.field("crop_size", pa.int32()),  # the square window's side (--resize crop); null for fit
    # How well the high-res features, area-pooled to the backbone's grid, agree with its own low-res features
    # (featup_ops.upsampler_metrics.lowres_agreement): ||pool(hr) - lr|| / ||lr|| and the mean per-cell cosine.
    pa.field("pooled_rel_error", pa.float32()),
    pa.field("pooled_cosine", pa.float32()),
    # added for --resize fit (older manifests lack them: crop_height = crop_width = crop_size, resize "crop")
    pa.field("crop_height", pa.int32()),  # the window kept = the model's input image; the features cover it
    pa.field("crop_width", pa.int32()),
    pa.field("resize", pa.string()),  # "crop" or "fit"
    pa.field("scale_y", pa.float64()),  # resized / original height: original y = (crop_top + y + 0.5) / scale_y - 0.5
    pa.field("scale_x", pa.float64()),
])

_GEOMETRY_FIELDS = ("orig_height", "orig_width", "orig_mode", "exif_orientation", "resized_height", "resized_width", "crop_top",
                    "crop_left", "crop_size", "crop_height", "crop_width", "resize", "scale_y", "scale_x")


def ok_row(key: str, shard: str, source: str, sample_index: int, storage: str, features_array: str,
           lowres_array: str | None, labels_array: str | None, index: int, feature_hw: tuple[int, int],
           geometry: Geometry) -> dict:
    return {"key": key, "shard": shard, "source": source, "sample_index": sample_index, "status": "ok",
            "error": None, "storage": storage, "features_array": features_array, "lowres_array": lowres_array,
            "labels_array": labels_array, "index": index, "feature_height": feature_hw[0],
            "feature_width": feature_hw[1], **geometry.as_dict(), **quality(None, None)}


def quality(pooled_rel_error: float | None, pooled_cosine: float | None) -> dict:
    """The per-sample quality columns of a row (see SCHEMA; None until the sample's features are measured)."""
    return {"pooled_rel_error": pooled_rel_error, "pooled_cosine": pooled_cosine}


def error_row(key: str, shard: str, source: str, sample_index: int, error: str) -> dict:
    row = {"key": key, "shard": shard, "source": source, "sample_index": sample_index, "status": "error",
           "error": error, "storage": None, "features_array": None, "lowres_array": None, "labels_array": None,
           "index": None, "feature_height": None, "feature_width": None}
    row.update({f: None for f in _GEOMETRY_FIELDS})
    row.update(quality(None, None))
    return row


def to_table(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def conform(part: pa.Table) -> pa.Table:
    """A part in SCHEMA's columns and types; columns it lacks (parts committed by an earlier version of the job,
    resumed) are null."""
    for name in SCHEMA.names:
        if name not in part.column_names:
            part = part.append_column(name, pa.nulls(part.num_rows, SCHEMA.field(name).type))
    return part.select(SCHEMA.names).cast(SCHEMA)


ROW_GROUP_ROWS = 65_536  # manifest rows per Parquet row group: a reader fetching one row reads this many
COMPACT_EVERY = 256  # parts gathered for a row group are joined into one table this often


def assemble(parts: Iterable[pa.Table]) -> pa.Buffer:
    """The manifest.parquet bytes of `parts` (tables of SCHEMA, in order), written a row group at a time."""
    sink = pa.BufferOutputStream()
    # keys are unique: plain encoding (a dictionary attempt on them triples a reader's decoding time)
    with pq.ParquetWriter(sink, SCHEMA, use_dictionary=[n for n in SCHEMA.names if n != "key"]) as writer:
        pending: list[pa.Table] = []
        rows = 0
        for part in parts:
            pending.append(conform(part))
            rows += part.num_rows
            if len(pending) >= COMPACT_EVERY:  # many small parts: hold their rows, not a table object each
                pending = [pa.concat_tables(pending).combine_chunks()]
            if rows >= ROW_GROUP_ROWS:
                table = pa.concat_tables(pending)
                whole = rows - rows % ROW_GROUP_ROWS
                writer.write_table(table.slice(0, whole), row_group_size=ROW_GROUP_ROWS)
                pending, rows = [table.slice(whole)], rows - whole
        if rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
    return sink.getvalue()
