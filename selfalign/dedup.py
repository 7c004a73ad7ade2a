"""Exact and near-duplicate removal across every file the clean stage reads.

A record's dedup key is all of its text (`records.texts`), normalised: lower case, letters and
digits only, single spaces. Two records with the same key are exact duplicates; two whose sets
of word shingles have an estimated Jaccard similarity of at least `threshold` (MinHash with an
LSH index, datasketch) are near-duplicates. The first record in input order is kept, so the
outcome is deterministic and the seed file, read first, wins over web text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence

from selfalign.config import Config, opt
from selfalign.records import texts


@dataclasses.dataclass
class NearDup(Config):
    """Near-duplicate removal's settings (params clean.near_dup)."""

    enabled: bool = True
    threshold: float = opt(0.8, lo=0, hi=1, lo_open=True)  # estimated Jaccard at or above which a record is a copy
    num_perm: int = opt(128, lo=1)  # MinHash permutations (more: finer estimates, slower)
    shingle: int = opt(3, lo=1)  # words per shingle
    seed: int = 1  # MinHash seed


_NON_WORD = re.compile(r"[\W_]+")


def key_text(record: dict) -> str:
    return _NON_WORD.sub(" ", " ".join(texts(record)).lower()).strip()


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of a normalised text; a text shorter than n words is one shingle."""
    ws = text.split()
    if len(ws) <= n:
        return {" ".join(ws).encode("utf-8")}
    return {" ".join(ws[i : i + n]).encode("utf-8") for i in range(len(ws) - n + 1)}


def exact_duplicates(keys: Sequence[str]) -> Iterator[tuple[int, int]]:
    """(index, index of the first record with the same key) for every later copy."""
    first: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        h = hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest()
        if h in first:
            yield i, first[h]
        else:
            first[h] = i


def near_duplicates(
    keys: Sequence[str], *, threshold: float, num_perm: int, shingle: int, seed: int = 1, skip: set[int] = frozenset()
) -> Iterator[tuple[int, int, float]]:
    """(index, index of the earlier record it nearly duplicates, estimated Jaccard) for each later near-copy.

    Records are indexed in order and each is queried against those before it, so a chain
    a ~ b ~ c keeps only a when b and c are both close to a, and keeps c when it is close to b
    but not to a (b was dropped, yet c is compared with what is kept, not with b).
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    order = [i for i in range(len(keys)) if i not in skip]
    sigs = MinHash.bulk([shingles(keys[i], shingle) for i in order], num_perm=num_perm, seed=seed)
    kept: dict[int, MinHash] = {}
    for i, sig in zip(order, sigs, strict=True):
        best = None
        for j in lsh.query(sig):
            sim = sig.jaccard(kept[j])
            if sim >= threshold and (best is None or j < best[0]):
                best = (j, sim)
        if best is not None:
            yield i, best[0], best[1]
            continue
        lsh.insert(i, sig, check_duplication=False)
        kept[i] = sig


# ---------------------------------------------------------------- the same decisions from compact state
# For a stream (bench/scale.py: a million web segments) the clean stage keeps no records for dedup: exact duplicates
# are found with a set of 16-byte hashes, and near-duplicates from the MinHash signatures alone (N x num_perm uint32,
# on disk), banded as datasketch's MinHashLSH bands them. `near_duplicates_of` gives the answer `near_duplicates`
# gives for the same keys (tests/test_stream_clean.py holds them equal).


def key_hash(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def signatures(keys: Sequence[str], *, num_perm: int, shingle: int, seed: int = 1):
    """The MinHash signatures of `keys` as one (len(keys), num_perm) uint32 array (datasketch's affine32 values)."""
    import numpy as np
    from datasketch import MinHash

    if not keys:
        return np.zeros((0, num_perm), dtype=np.uint32)
    sigs = MinHash.bulk([shingles(k, shingle) for k in keys], num_perm=num_perm, seed=seed)
    return np.stack([s.hashvalues for s in sigs]).astype(np.uint32, copy=False)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that MinHashLSH picks for `threshold` and `num_perm` with its default weights."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def near_duplicates_of(sigs, *, threshold: float, num_perm: int) -> Iterator[tuple[int, int, float]]:
    """`near_duplicates` from the signatures of the records it would index (rows in input order, exact duplicates
    already left out): (row, earlier row it nearly duplicates, estimated Jaccard) for each later near-copy.

    Two rows are candidates when some band of theirs is equal, as in MinHashLSH; a row whose every band is unique
    can neither be dropped nor drop another, so only the rows in shared buckets are walked in order, each compared
    with the kept rows of its buckets. Memory: the signatures plus a few int arrays per row.
    """
    import numpy as np

    n = len(sigs)
    b, r = lsh_bands(threshold, num_perm)
    buckets = np.empty((b, n), dtype=np.int64)
    shared = np.zeros(n, dtype=bool)
    for k in range(b):
        band = np.ascontiguousarray(sigs[:, k * r : (k + 1) * r]).view(np.dtype((np.void, r * sigs.itemsize))).ravel()
        _, inverse, counts = np.unique(band, return_inverse=True, return_counts=True)
        multi = counts[inverse] > 1
        buckets[k] = np.where(multi, inverse, -1)
        shared |= multi
    kept_in: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(shared).tolist():
        mine = [(k, int(buckets[k, i])) for k in range(b) if buckets[k, i] >= 0]
        best = None
        for j in {j for key in mine for j in kept_in.get(key, ())}:
            sim = float(np.count_nonzero(sigs[i] == sigs[j])) / float(num_perm)
            if sim >= threshold and (best is None or j < best[0]):
                best = (j, sim)
        if best is not None:
            yield i, best[0], best[1]
            continue
        for key in mine:
            kept_in.setdefault(key, []).append(i)
