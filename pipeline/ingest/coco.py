"""COCO-layout folders (images + optional instances JSON) as WebDataset samples, and the make_shards job."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.options import ConfigError, option
from pipeline.storage.filesystems import filesystem
from pipeline.storage.images import IMAGE_EXTENSIONS, decode_image

log = logging.getLogger(__name__)
IGNORE_LABEL = 255  # crowd regions: neither background nor a reliable class


def annotation_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, or an RLE with compressed or uncompressed counts) -> bool mask (h, w).

    Decoded by pycocotools, the COCO API's own implementation of the format.
    """
    if isinstance(segmentation, list):  # polygons [x0, y0, x1, y1, ...]; the parts of one object are merged
        polygons = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise ValueError(f"RLE of size {segmentation['size']} for an image of {height}x{width}: the annotation "
                             "belongs to another image or the image entry's height/width are wrong")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed run lengths
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"not a COCO segmentation (polygon list or RLE dict): {str(segmentation)[:80]}")
    with warnings.catch_warnings():  # pycocotools' decoder predates numpy 2's copy keyword; the result is right
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def rasterize(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """COCO instance annotations -> a category map (h, w): 0 background, category id inside objects (smaller
    objects drawn over larger ones), 255 over crowd regions."""
    label = np.zeros((height, width), dtype=np.uint16)
    crowd = np.zeros((height, width), dtype=bool)
    for ann in sorted(annotations, key=lambda a: -float(a.get("area", 0))):
        seg = ann.get("segmentation")
        if not seg:
            continue
        mask = annotation_mask(seg, height, width)
        if ann.get("iscrowd"):
            crowd |= mask
        else:
            label[mask] = int(ann["category_id"])
    label[crowd] = IGNORE_LABEL
    return label


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
        try:
            label = rasterize(anns_by_image.get(info["id"], []), int(info["height"]), int(info["width"]))
        except ValueError as exc:
            raise ValueError(f"annotations of {name} (image id {info['id']}): {exc}") from None
        return label_png(label)
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
