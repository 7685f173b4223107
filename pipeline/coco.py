"""COCO-layout folders (images + optional instances JSON) as WebDataset samples."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .images import IMAGE_EXTENSIONS
from .storage import filesystem

log = logging.getLogger(__name__)


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
                 include_unannotated: bool = True) -> Iterator[dict]:
    """Samples {"__key__", "<ext>": image bytes, "json": metadata (+ the image's COCO annotations)}.

    Images are taken in file-name order. With an annotations file, every listed image is expected to
    exist (a missing one is logged and counted, not fatal); images it does not list are included with
    empty annotations unless include_unannotated=False.
    """
    fs, root = filesystem(images, storage_options)
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
        yield {"__key__": sample_key(name), ext: fs.cat_file(path), "json": meta}
