"""Exact and near-duplicate removal across every file the clean stage reads.

A record's dedup key is all of its text (`records.texts`), normalised: lower case, letters and
digits only, single spaces. Two records with the same key are exact duplicates; two whose sets
of word shingles have an estimated Jaccard similarity of at least `threshold` (MinHash with an
LSH index, datasketch) are near-duplicates. The first record in input order is kept, so the
outcome is deterministic and the seed file, read first, wins over web text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence

from selfalign.records import texts

_NON_WORD = re.compile(r"[\W_]+")


def key_text(record: dict) -> str:
    return _NON_WORD.sub(" ", " ".join(texts(record)).lower()).strip()


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of a normalised text; a text shorter than n words is one shingle."""
    ws = text.split()
    if len(ws) <= n:
        return {" ".join(ws).encode("utf-8")}
    return {" ".join(ws[i:i + n]).encode("utf-8") for i in range(len(ws) - n + 1)}


def exact_duplicates(keys: Sequence[str]) -> Iterator[tuple[int, int]]:
    """(index, index of the first record with the same key) for every later copy."""
    first: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        h = hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest()
        if h in first:
            yield i, first[h]
        else:
            first[h] = i


def near_duplicates(keys: Sequence[str], *, threshold: float, num_perm: int, shingle: int, seed: int = 1,
                    skip: set[int] = frozenset()) -> Iterator[tuple[int, int, float]]:
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
