"""The key hash and the sorted hash index: the vectorised and the scalar hash against a reference written from
the definition, lookups single and batched, duplicates, absent keys, and correctness when hashes collide."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.reading import key_index
from pipeline.reading.key_index import DuplicateKeyError, KeyIndex, hash_key, hash_keys

KEYS = ["", "a", "abcdefg", "abcdefgh", "abcdefghi", "000000139", "ünïcødé 日本語", "x" * 33,
        "shard-000012/img_0004"]


def reference_hash(key: str, seed: int) -> int:
    """splitmix64's finaliser per little-endian 8-byte word (zero-padded), seeded, the length mixed in first."""
    m = 2**64

    def fmix(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % m
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % m
        return z ^ (z >> 31)

    data = key.encode("utf-8")
    h = fmix(((seed + 1) * 0x9E3779B97F4A7C15 % m) ^ len(data))
    for k in range(0, len(data), 8):
        h = fmix(((h ^ int.from_bytes(data[k:k + 8].ljust(8, b"\0"), "little")) + 0x9E3779B97F4A7C15) % m)
    return h


@pytest.mark.parametrize("seed", [0, 7])
def test_hashes_follow_the_definition(seed):
    rng = np.random.default_rng(seed)
    keys = KEYS + ["".join(chr(c) for c in rng.integers(32, 0x3000, size=n)) for n in rng.integers(0, 40, size=300)]
    expected = [reference_hash(k, seed) for k in keys]
    assert [hash_key(k, seed) for k in keys] == expected
    assert hash_keys(keys, seed).tolist() == expected
    assert hash_keys(pa.array(keys, pa.large_string()), seed).tolist() == expected
    assert hash_keys(pa.array(keys).slice(5, 100), seed).tolist() == expected[5:105]  # an offset into the buffers
    assert hash_keys(pa.chunked_array([keys[:50], keys[50:]]), seed).tolist() == expected


def test_blocks_of_mixed_lengths(monkeypatch):
    monkeypatch.setattr(key_index, "CHUNK", 7)  # many blocks, some with keys of equal length, some not
    keys = [f"{'k' * (i % 13)}{i}" for i in range(100)]
    assert hash_keys(keys).tolist() == [reference_hash(k, 0) for k in keys]


def test_lookups_single_and_batched():
    keys = [f"{i:012d}" for i in range(5000)] + ["dup", "other", "dup"]
    index = KeyIndex(pa.array(keys))
    assert index.has_duplicates
    for i in range(0, 5000, 97):
        assert index.position(f"{i:012d}") == i and index.find(f"{i:012d}") == [i]
    assert index.find("dup") == [5000, 5002] and index.position("nope") is None and index.find(123) == []
    with pytest.raises(DuplicateKeyError):
        index.position("dup")
    query = ["000000004321", "nope", "dup", "other", "000000000000"]
    assert index.positions(query).tolist() == [4321, -1, -2, 5001, 0]
    assert index.positions(pa.array(keys[:5000])).tolist() == list(range(5000))
    assert not KeyIndex(pa.array(["a", "b"])).has_duplicates and KeyIndex(pa.array([], pa.string())).positions([
        "a"]).tolist() == [-1]


def test_colliding_hashes_never_return_a_wrong_row(monkeypatch):
    # every key hashes the same: the index must still find each by comparing the keys themselves
    monkeypatch.setattr(key_index, "hash_key", lambda key, seed=0: 42)
    monkeypatch.setattr(key_index, "hash_keys", lambda keys, seed=0: np.full(len(key_index._as_string_array(keys)),
                                                                             42, np.uint64))
    keys = ["p", "q", "r", "q"]
    index = KeyIndex(pa.array(keys))
    assert index.has_duplicates
    assert [index.find(k) for k in ("p", "q", "r", "s")] == [[0], [1, 3], [2], []]
    assert index.positions(["r", "s", "q", "p"]).tolist() == [2, -1, -2, 0]
    assert not KeyIndex(pa.array(["p", "q"])).has_duplicates


def test_null_keys_are_refused():
    with pytest.raises(ValueError, match="1 key\\(s\\) are null"):
        hash_keys(pa.array(["a", None]))
    with pytest.raises(TypeError, match="keys must be strings"):
        hash_keys(pa.array([1, 2]))


def test_an_index_over_some_rows_of_a_chunked_column():
    column = pa.chunked_array([["r0", "skip", "r2"], [], ["r3", "skip2"], ["r5"]])
    index = KeyIndex(column, rows=np.array([0, 2, 3, 5]))
    assert len(index) == 4 and [index.key_at(p) for p in range(4)] == ["r0", "r2", "r3", "r5"]
    assert index.take(np.array([3, 0, 2, 1, 3])).to_pylist() == ["r5", "r0", "r3", "r2", "r5"]
    assert index.position("r3") == 2 and index.position("skip") is None
    assert index.positions(["r5", "skip2", "r0"]).tolist() == [3, -1, 0]
    assert hash_keys(index.column).tolist() == [reference_hash(k, 0) for k in column.to_pylist()]
