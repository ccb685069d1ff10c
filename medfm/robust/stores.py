"""Corrupted test splits of a feature store: a sibling HDF5 file per (store, corruption request),
in `<workdir>/stores/corrupted/`.

    from medfm.robust.stores import corrupted_sets
    for sibling in corrupted_sets(store):          # CorruptedStore objects
        for corruption, severity in sibling.pairs:
            X = sibling.features(corruption, severity)   # (N_test, D) float32

The main store is never rewritten (its fingerprint, which every probe key holds, stays as it
is); a sibling holds one group per (corruption, severity) - features of the corrupted test
images, their labels and index - and is built, resumed, fingerprinted, verified and renamed
into place exactly like a store (StoreWriter, FeatureStore's checks). Its identity is the main
store's request plus the corruption request: set, pairs, seed, the medmnistc version and the
image size the corruptions were applied at.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from medfm.errors import StoreError
from medfm.resolve.keys import store_digest
from medfm.store.features import (FeatureStore, _decode, content_fingerprint, digest_in_name,
                                  failed_block, is_verified, mark_verified, upcast)

CORRUPTED_DIRNAME = "corrupted"  # <workdir>/stores/corrupted/


def group_name(corruption: str, severity: int) -> str:
    """HDF5 group of one (corruption, severity): "pixelate_s5"."""
    return f"{corruption}_s{severity}"


def corrupted_identity(store: FeatureStore, pairs: list[tuple[str, int]], *, seed: int,
                       corruption_set: str, base: str | None, version: str) -> dict:
    return {"store": store.request, "store_fingerprint": store.fingerprint,
            "corruption_set": corruption_set, "base": base,
            "pairs": [[c, s] for c, s in pairs], "seed": seed, "medmnistc": version,
            "applied_at": store.request["size"], "dtype": store.request["dtype"]}


def corrupted_path(store: FeatureStore, identity: dict) -> Path:
    return (store.path.parent / CORRUPTED_DIRNAME
            / f"{store.path.stem}__c{store_digest(identity)}.h5")


class CorruptedStore:
    """A finished sibling of corrupted test features, checked against its fingerprint on the
    first read (like a store)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as fh:
                attrs = {k: _decode(fh.attrs.get(k)) for k in (
                    "complete", "request_json", "fingerprint", "pairs_json", "skipped_json")}
        except OSError as exc:
            raise StoreError(f"corrupted-split store {self.path} is unreadable ({exc}); delete "
                             "it and run the extraction with --corruptions again.") from None
        if not attrs["complete"]:
            raise StoreError(f"corrupted-split store {self.path} is not complete; delete it "
                             "and run the extraction with --corruptions again.")
        self.identity = json.loads(attrs["request_json"])
        named, held = digest_in_name(self.path.name), store_digest(self.identity)
        if named is not None and named != held:
            raise StoreError(
                f"corrupted-split store {self.path} is named for request {named} but holds "
                f"request {held} (corruptions of {self.identity['store'].get('dataset')}@"
                f"{self.identity['store'].get('size')} {self.identity['store'].get('backbone')})"
                ": it was copied or renamed onto this name; delete it and run the extraction "
                "with --corruptions again.")
        self.fingerprint = attrs["fingerprint"]
        self.pairs = [tuple(p) for p in json.loads(attrs["pairs_json"])]
        self.skipped = json.loads(attrs["skipped_json"] or "[]")
        self._checked = False

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(group_name(c, s) for c, s in self.pairs)

    def _check(self) -> None:
        if self._checked or is_verified(self.path, self.fingerprint):
            self._checked = True
            return
        try:
            with h5py.File(self.path, "r") as fh:
                actual = content_fingerprint(fh, self.splits)
        except (OSError, KeyError) as exc:
            raise StoreError(f"corrupted-split store {self.path} is damaged ({exc}); delete it "
                             "and run the extraction with --corruptions again.") from None
        if actual != self.fingerprint:
            raise StoreError(f"corrupted-split store {self.path} is damaged (contents hash to "
                             f"{actual}, not {self.fingerprint}); delete it and run the "
                             "extraction with --corruptions again.")
        mark_verified(self.path, self.fingerprint)
        self._checked = True

    def features(self, corruption: str, severity: int) -> np.ndarray:
        """(N_test, D) float32 features of the corrupted test split."""
        self._check()
        with h5py.File(self.path, "r") as fh:
            dset = fh[group_name(corruption, severity)]["features"]
            stored = dset[()]
            if failed_block(dset, stored) is not None:
                raise StoreError(f"corrupted-split store {self.path}: {corruption} severity "
                                 f"{severity} fails its checksum (bytes changed after it was "
                                 "finished); delete it and extract again.")
            values = upcast(stored)
        if not np.isfinite(values).all():
            raise StoreError(f"corrupted-split store {self.path}: {corruption} severity "
                             f"{severity} holds NaN or infinite features; delete it and "
                             "extract again.")
        return values


def corrupted_sets(store: FeatureStore) -> list[CorruptedStore]:
    """Every finished corrupted sibling of `store` (matched by its fingerprint)."""
    folder = store.path.parent / CORRUPTED_DIRNAME
    found = []
    for path in sorted(folder.glob(f"{store.path.stem}__c*.h5")):
        sibling = CorruptedStore(path)
        if sibling.identity.get("store_fingerprint") == store.fingerprint:
            found.append(sibling)
    return found


def available_pairs(store: FeatureStore) -> dict[tuple[str, int], CorruptedStore]:
    """(corruption, severity) -> the sibling holding it (the first one, when several do)."""
    pairs: dict[tuple[str, int], CorruptedStore] = {}
    for sibling in corrupted_sets(store):
        for pair in sibling.pairs:
            pairs.setdefault(pair, sibling)
    return pairs
