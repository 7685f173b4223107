"""COCO-layout folders (images + optional instances JSON) as WebDataset samples, and the make_shards job."""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.options import ConfigError, option
from pipeline.storage.filesystems import filesystem
from pipeline.storage.images import IMAGE_EXTENSIONS, decode_image

log = logging.getLogger(__name__)
IGNORE_LABEL = 255  # crowd regions: neither background nor a reliable class


def rle_counts_from_string(text: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (5-bit groups, sign bit, deltas from two runs back)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """A COCO RLE (compressed string or list of counts) -> bool mask (h, w); runs alternate 0/1, column-major."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts.decode() if isinstance(counts, bytes) else counts)
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for run in counts:
        if value:
            flat[pos : pos + run] = True
        pos += run
        value = not value
    return flat.reshape((w, h)).T


def rasterize(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """COCO instance annotations -> a category map (h, w): 0 background, category id inside objects (smaller
    objects drawn over larger ones), 255 over crowd regions."""
    label = Image.new("I", (width, height), 0)
    draw = ImageDraw.Draw(label)
    crowd = np.zeros((height, width), dtype=bool)
    for ann in sorted(annotations, key=lambda a: -float(a.get("area", 0))):
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            mask = rle_decode(seg)
            if ann.get("iscrowd"):
                crowd |= mask
            else:
                arr = np.asarray(label)
                label = Image.fromarray(np.where(mask, ann["category_id"], arr).astype(np.int32), "I")
                draw = ImageDraw.Draw(label)
        elif isinstance(seg, list):
            for polygon in seg:
                if len(polygon) >= 6:
                    draw.polygon([float(v) for v in polygon], fill=int(ann["category_id"]))
    out = np.asarray(label).astype(np.uint16)
    out[crowd] = IGNORE_LABEL
    return out


def label_png(label: np.ndarray) -> bytes:
    """A class-id map as PNG: 8-bit when the ids allow, else 16-bit."""
    buf = io.BytesIO()
    img = Image.fromarray(label.astype(np.uint8), "L") if label.max(initial=0) < 256 else Image.fromarray(label)
    img.save(buf, format="PNG")
    return buf.getvalue()


def oracle_label_png(image_bytes: bytes) -> bytes:
    """Known-truth oracle labels of an image at its own (upright) resolution, as PNG."""
    import torch

    from featup_ops import FeatureModel
    from featup_ops.oracle import oracle_labels

    rgb, _, _ = decode_image(image_bytes)
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    return label_png(oracle_labels(FeatureModel.guidance(x))[0].numpy().astype(np.uint16))


def sample_key(file_name: str) -> str:
    """A WebDataset-safe key from an image file name (no folders, no dots: those mark extensions)."""
    stem = Path(file_name).name.rsplit(".", 1)[0]
    return stem.replace(".", "_")


def load_annotations(url: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        coco = json.load(f)
    if "images" not in coco:
        raise ValueError(f"{url} is not a COCO annotations file (no 'images' list)")
    return coco


def coco_samples(images: str, annotations: str | None = None, storage_options: Mapping[str, Any] | None = None,
                 include_unannotated: bool = True, labels: str | None = None, rasterize_annotations: bool = True,
                 oracle_labels: bool = False) -> Iterator[dict]:
    """Samples {"__key__", "<ext>": image bytes, "json": metadata, "seg.png": labels (when there are any)}.

    Images are taken in file-name order. With an annotations file, every listed image is expected to
    exist (a missing one is logged and counted, not fatal); images it does not list are included with
    empty annotations unless include_unannotated=False. Labels come from, in order of preference: a
    COCO-Stuff style folder of <stem>.png class maps (`labels`), the known-truth oracle (`oracle_labels`),
    or the instance annotations rasterised to a category map.
    """
    fs, root = filesystem(images, storage_options)
    label_fs = filesystem(labels, storage_options) if labels is not None else None
    files = sorted(p for p in fs.find(root) if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    by_name: dict[str, dict] = {}
    anns_by_image: dict[int, list] = defaultdict(list)
    categories: dict[int, str] = {}
    if annotations:
        coco = load_annotations(annotations, storage_options)
        by_name = {Path(im["file_name"]).name: im for im in coco["images"]}
        for ann in coco.get("annotations", []):
            anns_by_image[ann["image_id"]].append(ann)
        categories = {c["id"]: c["name"] for c in coco.get("categories", [])}
        present = {Path(p).name for p in files}
        missing = [n for n in by_name if n not in present]
        if missing:
            log.warning("%d images listed in %s are missing from %s, e.g. %s", len(missing), annotations, images,
                        missing[:3])
    for path in files:
        name = Path(path).name
        info = by_name.get(name)
        if annotations and info is None and not include_unannotated:
            continue
        meta: dict[str, Any] = {"file_name": name}
        if info is not None:
            anns = anns_by_image.get(info["id"], [])
            meta.update({"id": info["id"], "height": info.get("height"), "width": info.get("width"),
                         "annotations": anns,
                         "categories": sorted({categories.get(a["category_id"], str(a["category_id"])) for a in anns})})
        ext = name.rsplit(".", 1)[-1].lower()
        data = fs.cat_file(path)
        sample = {"__key__": sample_key(name), ext: data, "json": meta}
        label = _label_for(name, data, info, anns_by_image, labels, label_fs, oracle_labels, rasterize_annotations)
        if label is not None:
            sample["seg.png"] = label
        yield sample


def _label_for(name: str, data: bytes, info: dict | None, anns_by_image: dict, labels: str | None, label_fs,
               oracle: bool, rasterize_annotations: bool) -> bytes | None:
    if labels is not None:
        fs, root = label_fs
        path = f"{root}/{name.rsplit('.', 1)[0]}.png"
        return fs.cat_file(path) if fs.exists(path) else None
    if oracle:
        return oracle_label_png(data)
    if rasterize_annotations and info is not None and info.get("height") and info.get("width"):
        return label_png(rasterize(anns_by_image.get(info["id"], []), int(info["height"]), int(info["width"])))
    return None


@dataclass(frozen=True)
class MakeShardsConfig:
    """The make_shards job's options."""

    images: str = option(required=True, help="folder of images (local or fsspec URL), searched recursively")
    output: str = option(required=True, help="folder for the shards and index.json (local or fsspec URL)")
    annotations: str | None = option(None, help="COCO instances JSON; its annotations go into each sample's json")
    prefix: str = option("shard", help="shard file prefix: PREFIX-000000.tar")
    samples_per_shard: int = option(1000, help="samples per shard")
    only_annotated: bool = option(False, help="skip images the annotations do not list")
    labels: str | None = option(None, help="COCO-Stuff style folder of <image stem>.png class maps, stored as seg.png")
    oracle_labels: bool = option(False, help="attach known-truth labels of the oracle backbone (8 classes) to every "
                                             "image")
    rasterize: bool = option(True, negate="--no-rasterize",
                             help="do not rasterise instance annotations into a seg.png category map")
    storage_options: Mapping[str, Any] = option({}, help="fsspec options: JSON or @file.json")


def run(config: MakeShardsConfig) -> dict:
    """Writes the shards and their index.json; returns the index."""
    from tqdm.auto import tqdm

    from pipeline.ingest.shard_writer import write_shards

    if config.samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be >= 1, got {config.samples_per_shard}")
    samples = coco_samples(config.images, config.annotations, config.storage_options,
                           include_unannotated=not config.only_annotated, labels=config.labels,
                           rasterize_annotations=config.rasterize, oracle_labels=config.oracle_labels)
    index = write_shards(tqdm(samples, unit="img", desc="sharding"), config.output, config.samples_per_shard,
                         config.prefix, config.storage_options)
    print(f"wrote {index['total_samples']} samples in {len(index['shards'])} shards to {config.output}")
    return index
