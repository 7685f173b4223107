"""Sample keys without a Python object per key: a 64-bit hash of each key, sorted, over an Arrow string column.

`hash_keys` hashes a whole Arrow column with numpy (a few vectorised passes per 8 bytes of key length);
`hash_key` is the same function for one Python string, in plain integer arithmetic. The hash is
splitmix64's finaliser applied per little-endian 8-byte word, seeded, with the key's length mixed in:
fixed by its definition here, so it is the same on every machine and for every run. `KeyIndex` keeps
the sorted hashes with the positions they came from (one numpy array) and finds a key in O(log n),
checking candidates against the Arrow column itself, so a hash collision can never return a wrong row.
`KeySelection` is a sequence of keys held as positions into an index (what a split of a cache is).
Everything is plain numpy/Arrow memory: forked DataLoader workers share it copy-on-write.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
CHUNK = 1 << 16  # keys hashed per vectorised block: its temporaries stay in the CPU cache
_ITER_BLOCK = 1 << 16  # keys made into Python strings at a time when a selection is iterated
_TAIL_MASKS = np.array([(1 << (8 * r)) - 1 for r in range(8)] + [MASK64], dtype=np.uint64)


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    return z


def _start(seed: int, length: int) -> int:
    return _mix_int((((seed + 1) * GOLDEN) & MASK64) ^ length)


def hash_key(key: str, seed: int = 0) -> int:
    """The 64-bit hash of one key (UTF-8), equal to what `hash_keys` gives for it."""
    data = key.encode()
    h = _start(seed, len(data))
    for k in range(0, len(data), 8):
        word = int.from_bytes(data[k: k + 8], "little")
        h = _mix_int(((h ^ word) + GOLDEN) & MASK64)
    return h



def _string_chunks(keys: pa.Array | pa.ChunkedArray | Sequence[str]) -> list[pa.Array]:
    """The keys as Arrow string arrays (a chunked column stays in its chunks: nothing is copied)."""
    if isinstance(keys, pa.ChunkedArray):
        chunks = list(keys.chunks)
    elif isinstance(keys, pa.Array):
        chunks = [keys]
    else:
        chunks = [pa.array(list(keys), type=pa.string())]
    out = []
    for chunk in chunks:
        if pa.types.is_dictionary(chunk.type):
            chunk = chunk.cast(chunk.type.value_type)
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            raise TypeError(f"keys must be strings, got an Arrow column of {chunk.type}")
        if chunk.null_count:
            raise ValueError(f"{chunk.null_count} key(s) are null; every sample needs a key")
        out.append(chunk)
    return out


def _as_string_array(keys: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array:
    chunks = _string_chunks(keys)
    if len(chunks) == 1:
        return chunks[0]
    return pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.string()).combine_chunks()


def _hash_chunk(keys: pa.Array, seed_word: np.uint64, out: np.ndarray) -> None:
    n = len(keys)
    offset_type = np.int64 if pa.types.is_large_string(keys.type) else np.int32
    offsets = np.frombuffer(keys.buffers()[1], dtype=offset_type)[keys.offset: keys.offset + n + 1].astype(np.int64)
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8) if keys.buffers()[2] is not None else np.zeros(0, np.uint8)
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        first, last = offsets[lo], offsets[hi]
        # the block's bytes plus 8 zero bytes, seen as one (unaligned) uint64 starting at every byte
        block = np.zeros(last - first + 8, dtype=np.uint8)
        block[: last - first] = data[first:last]
        words = np.ndarray(shape=(len(block) - 7,), dtype="<u8", buffer=block, strides=(1,))
        starts = offsets[lo:hi] - first
        lengths = offsets[lo + 1: hi + 1] - offsets[lo:hi]
        h = _mix(seed_word ^ lengths.astype(np.uint64))
        shortest, longest = int(lengths.min()), int(lengths.max())
        for k in range(0, longest, 8):
            if k < shortest:  # every key has bytes in this word: no selection
                word = words[starts + k]
                if k + 8 > shortest:  # some keys end inside it: keep only their bytes
                    tail = shortest - k if shortest == longest else np.minimum(lengths - k, 8)
                    word &= _TAIL_MASKS[tail]
                h ^= word
                h += np.uint64(GOLDEN)
                _mix(h)
                continue
            active = np.nonzero(lengths > k)[0]
            word = words[starts[active] + k] & _TAIL_MASKS[np.minimum(lengths[active] - k, 8)]
            word ^= h[active]
            word += np.uint64(GOLDEN)
            h[active] = _mix(word)
        out[lo:hi] = h


def hash_keys(keys: pa.Array | pa.ChunkedArray | Sequence[str], seed: int = 0) -> np.ndarray:
    """uint64 hashes of a column of keys, vectorised (see the module docstring for the function)."""
    chunks = _string_chunks(keys)
    out = np.empty(sum(len(c) for c in chunks), dtype=np.uint64)
    seed_word = np.uint64(((seed + 1) * GOLDEN) & MASK64)
    at = 0
    for chunk in chunks:
        if len(chunk):
            _hash_chunk(chunk, seed_word, out[at: at + len(chunk)])
        at += len(chunk)
    return out


def below_fraction(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """True where hash / 2**64 < fraction: a deterministic, uniform draw per key."""
    if fraction <= 0:
        return np.zeros(len(hashes), dtype=bool)
    return hashes < np.uint64(min(int(fraction * 2.0**64), MASK64))


class DuplicateKeyError(KeyError):
    """A key that occurs in several rows, looked up by key."""


class KeyIndex:
    """Finds keys of an Arrow string column by their sorted 64-bit hashes; O(log n) per key.

    The indexed keys are `keys[rows]` (all of `keys` when `rows` is None) at positions 0, 1, ...; the
    column is kept as it is (unfiltered, in its chunks). One sorted uint64 array holds, per key,
    the top bits of its hash above its position (as many low bits as positions need): sorting it orders
    the keys by hash and carries the positions along, at the cost of one array of n words. Equal prefixes
    (duplicated keys, or rare prefix collisions) are told apart by comparing the keys themselves.
    """

    def __init__(self, keys: pa.Array | pa.ChunkedArray, rows: np.ndarray | None = None):
        self.chunks = _string_chunks(keys)  # kept as they are: joining them would copy every key once more
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])
        self._starts = self.starts.tolist()
        self.rows = None if rows is None else np.asarray(rows)
        hashes = hash_keys(self.column)
        if self.rows is not None:
            hashes = hashes[self.rows]
        n = len(hashes)
        self.shift = np.uint64(max(1, (n - 1).bit_length()))
        self.low = np.uint64((1 << int(self.shift)) - 1)
        self._shift, self._low = int(self.shift), int(self.low)
        for lo in range(0, n, CHUNK):  # a block at a time: no n-long temporaries
            block = hashes[lo: lo + CHUNK]
            block >>= self.shift
            block <<= self.shift
            block |= np.arange(lo, lo + len(block), dtype=np.uint64)
        hashes.sort()
        self.packed = hashes
        self.has_duplicates = self._any_duplicate()

    def __len__(self) -> int:
        return len(self.packed)

    @property
    def column(self) -> pa.ChunkedArray:
        """The key column (every row, also those not indexed), without copying it."""
        return pa.chunked_array(self.chunks, type=self.chunks[0].type if self.chunks else pa.string())

    @property
    def nbytes(self) -> int:
        """Memory held: the keys, the sorted hashes and the row selection."""
        return self.packed.nbytes + sum(c.nbytes for c in self.chunks) + (0 if self.rows is None else self.rows.nbytes)

    def key_at(self, position: int) -> str:
        """The key at `position`."""
        row = int(position) if self.rows is None else int(self.rows[position])
        if len(self.chunks) == 1:
            return self.chunks[0][row].as_py()
        chunk = bisect.bisect_right(self._starts, row) - 1
        return self.chunks[chunk][row - self._starts[chunk]].as_py()

    def take(self, positions: np.ndarray) -> pa.Array:
        """The keys at `positions`, as one Arrow array (a take per chunk holding some of them)."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = positions if self.rows is None else self.rows[positions].astype(np.int64)
        if len(self.chunks) == 1:
            return self.chunks[0].take(pa.array(rows))
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        bounds = np.searchsorted(chunk[order], np.arange(len(self.chunks) + 1))
        pieces = [self.chunks[c].take(pa.array(rows[order[bounds[c]: bounds[c + 1]]] - self.starts[c]))
                  for c in range(len(self.chunks)) if bounds[c + 1] > bounds[c]]
        joined = pa.concat_arrays(pieces) if pieces else pa.array([], pa.string())
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return joined.take(pa.array(inverse))

    def _any_duplicate(self) -> bool:
        """True when a key occurs twice: only keys in runs of equal hash prefixes (rare) are compared."""
        prefix = self.packed >> self.shift
        same = prefix[1:] == prefix[:-1]
        if not same.any():
            return False
        in_run = np.zeros(len(prefix), dtype=bool)
        in_run[1:] |= same
        in_run[:-1] |= same
        at = np.nonzero(in_run)[0]
        keys = self.take((self.packed[at] & self.low).astype(np.int64)).to_pylist()
        seen: set = set()
        for entry in zip(prefix[at].tolist(), keys):
            if entry in seen:
                return True
            seen.add(entry)
        return False

    def find(self, key: str) -> list[int]:
        """Positions holding `key` (empty when absent; more than one for a duplicated key), ascending."""
        if not isinstance(key, str):
            return []
        shift, low, packed = self._shift, self._low, self.packed
        prefix = hash_key(key) >> shift
        at = int(packed.searchsorted(np.uint64(prefix << shift)))
        found = []
        while at < len(packed):
            entry = int(packed[at])
            if entry >> shift != prefix:
                break
            position = entry & low
            if self.key_at(position) == key:
                found.append(position)
            at += 1
        return sorted(found)

    def position(self, key: str) -> int | None:
        """The one position of `key`; None when absent; DuplicateKeyError when it occurs several times."""
        found = self.find(key)
        if len(found) > 1:
            raise DuplicateKeyError(key, found)
        return found[0] if found else None

    def positions(self, keys: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
        """Positions of many keys at once (vectorised); -1 for an absent key, -2 for a duplicated one."""
        query = _as_string_array(keys)
        first = hash_keys(query)
        first >>= self.shift
        first <<= self.shift
        by_hash = np.argsort(first)  # sorted queries: each binary search starts where the last one ended
        lo = np.empty(len(query), dtype=np.int64)
        hi = np.empty(len(query), dtype=np.int64)
        lo[by_hash] = np.searchsorted(self.packed, first[by_hash], side="left")
        hi[by_hash] = np.searchsorted(self.packed, first[by_hash] | self.low, side="right")
        out = np.full(len(query), -1, dtype=np.int64)
        single = np.nonzero(hi - lo == 1)[0]
        candidates = (self.packed[lo[single]] & self.low).astype(np.int64)
        same = pc.equal(self.take(candidates), query.take(pa.array(single)))
        matched = np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
        out[single[matched]] = candidates[matched]
        for i in np.nonzero(hi - lo > 1)[0]:  # equal prefixes: a duplicated key or (rarely) a collision
            found = self.find(query[int(i)].as_py())
            out[i] = found[0] if len(found) == 1 else (-2 if len(found) > 1 else -1)
        return out


class KeySelection(Sequence[str]):
    """Keys of one cache chosen by position (what `FeatureCache.split` returns): a sequence of str that
    holds only a numpy array of positions. `list(selection)` makes a list; `positions` gives the positions."""

    def __init__(self, index: KeyIndex, positions: np.ndarray):
        self.index = index  # the cache's keys, shared, never copied
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return KeySelection(self.index, self.positions[item])
        return self.index.key_at(self.positions[item])

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.positions), _ITER_BLOCK):
            yield from self.index.take(self.positions[start: start + _ITER_BLOCK]).to_pylist()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(np.isin(self.positions, self.index.find(key)).any())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeySelection) and other.index is self.index:
            return np.array_equal(self.positions, other.positions)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # list-like: compared by content, not hashable

    def __add__(self, other: Sequence[str]) -> Sequence[str]:
        if isinstance(other, KeySelection) and other.index is self.index:
            return KeySelection(self.index, np.concatenate([self.positions, other.positions]))
        return list(self) + list(other)

    def __radd__(self, other: Sequence[str]) -> list[str]:
        return list(other) + list(self)

    def to_arrow(self) -> pa.Array:
        """The selected keys as an Arrow string array."""
        return self.index.take(self.positions)

    def __repr__(self) -> str:
        head = ", ".join(repr(k) for k in self[:3])
        return f"KeySelection([{head}{', ...' if len(self) > 3 else ''}], {len(self)} keys)"
