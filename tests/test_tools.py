"""cluster.yaml against Ray's own schema, and jobs/make_shards.py on a COCO-layout folder."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from PIL import Image

from pipeline.ingest.sample_photos import photo
from pipeline.storage.shards import iter_samples, resolve_shards
from tests.conftest import ROOT


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_ray_validation():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(config)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and config["head_node_type"] == "head"
    assert any("pip install -e ." in cmd for cmd in config["setup_commands"])


def test_ray_validation_does_reject_a_broken_config():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_workers"] = "lots"
    with pytest.raises(Exception, match="lots"):
        _validate(config)


def test_make_shards_from_a_coco_folder(tmp_path):
    import make_shards

    images = tmp_path / "train2017"
    images.mkdir()
    names = {"000000000139.jpg": "astronaut", "000000000285.jpg": "coffee", "000000000632.png": "camera",
             "extra.image.jpg": "rocket"}
    for file_name, src in names.items():
        Image.fromarray(photo(src)).save(images / file_name)
    coco = {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 512, "width": 512},
                   {"id": 285, "file_name": "000000000285.jpg", "height": 400, "width": 600},
                   {"id": 632, "file_name": "000000000632.png", "height": 512, "width": 512},
                   {"id": 999, "file_name": "000000000999.jpg", "height": 10, "width": 10}],  # missing on disk
        "annotations": [{"id": 1, "image_id": 139, "category_id": 1, "bbox": [10, 10, 50, 80], "area": 4000,
                         "iscrowd": 0, "segmentation": [[10, 10, 60, 10, 60, 90, 10, 90]]},
                        {"id": 2, "image_id": 285, "category_id": 47, "bbox": [0, 0, 5, 5], "area": 25,
                         "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]}],
        "categories": [{"id": 1, "name": "person"}, {"id": 47, "name": "cup"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "shards"
    rc = make_shards.main(["--images", str(images), "--annotations", str(ann), "--output", str(out),
                           "--prefix", "train", "--samples-per-shard", "3"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [3, 1] and index["total_samples"] == 4
    shards = resolve_shards([str(out / "index.json")])
    assert [s.expected_samples for s in shards] == [3, 1]
    samples = [s for sh in shards for s in iter_samples(sh.url)]
    by_key = {s["__key__"]: s for s in samples}
    assert set(by_key) == {"000000000139", "000000000285", "000000000632", "extra_image"}
    meta = json.loads(by_key["000000000139"]["json"])
    assert meta["id"] == 139 and meta["categories"] == ["person"] and meta["annotations"][0]["bbox"] == [10, 10, 50, 80]
    assert "png" in by_key["000000000632"] and json.loads(by_key["extra_image"]["json"]) == {"file_name": "extra.image.jpg"}
    # the original bytes travel unchanged
    assert by_key["000000000285"]["jpg"] == (images / "000000000285.jpg").read_bytes()
