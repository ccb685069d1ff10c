"""Upgrades of work directories written by older medfm versions, run once, automatically, by the
code that opens them: nothing in them is recomputed.

- Stores (layout 1 -> 2). Each `.h5` (and resumable `.h5.partial`) store gets its request
  (medfm.resolve.store.StoreRequest identity) written into its attributes and is renamed to the name
  that request gives, so `extract` finds it by one lookup. Its features are not touched (the
  content fingerprint stays valid). A marker file `stores/.layout` records the upgrade.
- Registry (schema 1 -> 2, called by `Registry` in its migration transaction). Every row is
  re-keyed by the request it answers (medfm.resolve.keys.run_key): the backbone becomes its
  canonical
  id, the weights their identity, the dataset gains its file digest, the solver and device move
  out of the key into columns, and `selection` splits into `selection` and `select_metric`.
  Scores and fine-tune checkpoint folders follow their rows. Rows that turn out to be the same
  run (one request fitted by two solvers, or trained on two devices) are merged: the oldest stays,
  the others are kept in table `results_v1_merged` without their scores.
- Registry (schema 2 -> 3). Every row with stored per-sample test scores gets its calibration
  (ECE, Brier, NLL) and the bootstrap CI of its balanced accuracy, computed from those scores
  exactly as `medfm.metrics.evaluate` computes them for a new run (same resamples: 1000, seed
  0), so its numbers equal a rerun's; its stored ACC/AUC are kept. Rows saved without scores
  keep NULL there (NaN when read).

Where an old row does not say everything (a fine-tune row does not record its data file's MD5;
a probe row whose store was deleted does not record how its weights were chosen), the migration
fills in what medfm itself did at the time: the official MedMNIST file, the pretrained weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from pathlib import Path

import h5py

from medfm.backbones.names import FILE_DIGEST_CHARS, FILE_PREFIX, PRETRAINED, RANDOM
from medfm.cache import file_digest
from medfm.data import get_dataset
from medfm.preprocess import DEFAULT_NORMALIZATION
from medfm.resolve.recipes import PREPROCESS_FIELDS
from medfm.resolve.store import FEATURE_KIND
from medfm.resolve.keys import (PARTIAL_SUFFIX, STORES_DIRNAME, canonical_json, run_key,
                                store_digest, store_filename)
from medfm.sampling import SubsetSpec
from medfm.store.blobs import from_npy, stored_task

LAYOUT_FILE = ".layout"  # in <workdir>/stores: the layout version the folder is in
LAYOUT_VERSION = "2"
LOCK_FILE = ".layout.lock"
_UPGRADED: set[Path] = set()  # store folders this process has seen upgraded


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on `path` (created), held for the block."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def weights_identity_of(label: str, weights_digest: str) -> str:
    """The v2 weights identity of a v1 weights label ("offline:...", "hub", "random", "file:P")."""
    if label == "random":
        return RANDOM
    if label.startswith("file:"):
        path = Path(label[len("file:"):])
        if path.is_file():
            return FILE_PREFIX + file_digest(path, "sha256")[:FILE_DIGEST_CHARS]
        return f"{FILE_PREFIX}missing-{weights_digest[:FILE_DIGEST_CHARS]}"
    return PRETRAINED  # "offline:<package>" or "hub": the timm id's published weights


def v1_identity(attrs: dict) -> dict:
    """The v2 request identity of a store written by medfm's first layout (StoreKey attrs)."""
    key = json.loads(_decode(attrs["key_json"]))
    preprocess = json.loads(_decode(attrs["preprocess_json"]))
    backbone = f"{key['arch']}.{key['tag']}" if key["tag"] else key["arch"]
    return {
        "dataset": key["dataset"], "size": int(key["size"]),
        "data_digest": _decode(attrs["data_md5"]), "backbone": backbone,
        "weights": weights_identity_of(_decode(attrs.get("weights", "hub")), key["weights_digest"]),
        "resize_policy": preprocess["resize_policy"], "input_size": int(preprocess["input_size"]),
        "mean": list(preprocess["mean"]), "std": list(preprocess["std"]),
        "normalize": DEFAULT_NORMALIZATION, "feature_kind": key.get("feature_kind", FEATURE_KIND),
        "dtype": key.get("dtype", "float16"),
    }


def v1_attrs(attrs: dict) -> dict:
    """Layout-1 store attributes as layout 2 reads them (its request, version 2; layout 1's
    `request_json`, what the user typed, is replaced)."""
    identity = v1_identity(attrs)
    return {**attrs, "format_version": 2, "request_json": canonical_json(identity),
            "request_digest": store_digest(identity)}


def _upgrade_file(path: Path) -> None:
    """Write a layout-1 store's request into it and rename it to its request's name."""
    partial = path.name.endswith(PARTIAL_SUFFIX)
    try:
        with h5py.File(path, "r+") as fh:
            attrs = {k: fh.attrs[k] for k in fh.attrs}
            if attrs.get("format_version") != 1 or "key_json" not in attrs:
                return
            upgraded = v1_attrs(attrs)
            if "request_json" in attrs:  # layout 1's own: what the user typed, kept for the record
                fh.attrs["v1_request_json"] = attrs["request_json"]
            for name in ("format_version", "request_json", "request_digest"):
                fh.attrs[name] = upgraded[name]
            identity = json.loads(upgraded["request_json"])
    except (OSError, KeyError, ValueError):
        return  # unreadable: `medfm stores` reports it as corrupt under its old name
    target = path.with_name(store_filename(identity) + (PARTIAL_SUFFIX if partial else ""))
    if target == path:
        return
    if target.exists():  # the same request stored twice under layout 1: keep the first
        target = path.with_name(path.name + ".duplicate")
    os.replace(path, target)


def upgrade_stores(stores: Path) -> None:
    """Bring a stores folder to the current layout (once; concurrent callers wait)."""
    stores = Path(stores).resolve()
    if stores in _UPGRADED:
        return
    marker = stores / LAYOUT_FILE
    if not (marker.exists() and marker.read_text().strip() == LAYOUT_VERSION):
        with _locked(stores / LOCK_FILE):
            if not (marker.exists() and marker.read_text().strip() == LAYOUT_VERSION):
                for path in sorted([*stores.glob("*.h5"), *stores.glob("*.h5" + PARTIAL_SUFFIX)]):
                    _upgrade_file(path)
                tmp = marker.with_name(f".{LAYOUT_FILE}.{os.getpid()}")
                tmp.write_text(LAYOUT_VERSION + "\n")
                os.replace(tmp, marker)
    _UPGRADED.add(stores)


def _store_identities(workdir: Path) -> dict[str, dict]:
    """Content fingerprint -> request identity of every finished store in the work directory."""
    folder = workdir / STORES_DIRNAME
    if not folder.is_dir():
        return {}
    upgrade_stores(folder)  # stores of an older layout first: their names and attributes
    found = {}
    for path in folder.glob("*.h5"):
        try:
            with h5py.File(path, "r") as fh:
                if "fingerprint" in fh.attrs and "request_json" in fh.attrs:
                    found[_decode(fh.attrs["fingerprint"])] = json.loads(
                        _decode(fh.attrs["request_json"]))
        except OSError:
            continue
    return found


def _finetune_identity(row: sqlite3.Row, extra: dict, params: dict) -> dict:
    preprocess = json.loads(extra["preprocess"]) if "preprocess" in extra else {}
    backbone = f"{row['backbone']}.{row['tag']}" if row["tag"] else row["backbone"]
    return {
        "dataset": row["dataset"], "size": row["size"],
        "data_digest": get_dataset(row["dataset"]).md5(row["size"]),
        "backbone": backbone,
        "weights": weights_identity_of(extra.get("weights", "hub"), row["weights_digest"]),
        "resize_policy": preprocess.get("resize_policy", row["resize_policy"]),
        "input_size": preprocess.get("input_size", row["input_size"]),
        "normalize": params.get("normalize", DEFAULT_NORMALIZATION),
    }


def _probe_identity(row: sqlite3.Row, stores: dict[str, dict]) -> dict:
    if row["store_fingerprint"] in stores:
        return stores[row["store_fingerprint"]]
    backbone = f"{row['backbone']}.{row['tag']}" if row["tag"] else row["backbone"]
    return {  # the store is gone: what medfm extracted by default at the time
        "dataset": row["dataset"], "size": row["size"],
        "data_digest": get_dataset(row["dataset"]).md5(row["size"]), "backbone": backbone,
        "weights": PRETRAINED, "resize_policy": row["resize_policy"],
        "input_size": row["input_size"], "normalize": DEFAULT_NORMALIZATION,
        "feature_kind": row["feature_kind"],
    }


def _v2_row(row: sqlite3.Row, stores: dict[str, dict]) -> dict:
    """A schema-1 results row as schema-2 column values (without the digest)."""
    extra = json.loads(row["extra"])
    params = json.loads(row["params"])
    spec = SubsetSpec(fraction=row["fraction"], shots=row["shots"], seed=row["seed"])
    if row["method"] == "finetune":
        identity = _finetune_identity(row, extra, params)
        params = {k: v for k, v in params.items() if k not in PREPROCESS_FIELDS}
        selection, select_metric = "val", row["selection"].removeprefix("val_")
        solver, device = "", row["backend"]
    elif row["method"] == "knn":
        identity = _probe_identity(row, stores)
        selection, select_metric, solver, device = "none", "", "", ""
    else:
        identity = _probe_identity(row, stores)
        selection = row["selection"]
        select_metric = extra.get("selection_metric", "acc")
        solver = row["backend"]
        device = "cpu" if solver == "sklearn" else ""
    key = run_key(store=identity, method=row["method"], params=params, selection=selection,
                  select_metric=select_metric, spec=spec,
                  store_fingerprint=row["store_fingerprint"],
                  feature_kind="" if row["method"] == "finetune" else None)
    copied = ("n_train", "subset_digest", "chosen_C", "acc", "auc", "balanced_acc",
              "acc_ci_low", "acc_ci_high", "auc_ci_low", "auc_ci_high", "extra", "versions",
              "wall_s", "created_at", "weights_digest")
    return {"digest": key.digest(), **key.as_dict(), **{c: row[c] for c in copied},
            "solver": solver, "device": device}


def migrate_results_v1(conn: sqlite3.Connection, workdir: Path, table_sql: str,
                       index_sql: str) -> None:
    """Re-key every schema-1 row (module docstring); runs inside the caller's transaction.

    `table_sql` creates the schema-2 results table under the name given by `{table}`;
    `index_sql` indexes it once it is called `results`.
    """
    stores = _store_identities(workdir)
    old = conn.execute("SELECT * FROM results ORDER BY rowid").fetchall()
    conn.execute(table_sql.format(table="results_v2"))
    conn.execute("CREATE TABLE IF NOT EXISTS results_v1_merged AS SELECT * FROM results WHERE 0")
    moved = {}  # old digest -> new digest, for the rows kept
    for row in old:
        values = _v2_row(row, stores)
        inserted = conn.execute(
            f"INSERT INTO results_v2 ({', '.join(values)}) VALUES "
            f"({', '.join('?' * len(values))}) ON CONFLICT (digest) DO NOTHING",
            tuple(values.values())).rowcount
        if inserted:
            moved[row["digest"]] = values["digest"]
        else:
            conn.execute("INSERT INTO results_v1_merged SELECT * FROM results WHERE digest = ?",
                         (row["digest"],))
            conn.execute("DELETE FROM scores WHERE digest = ?", (row["digest"],))
    for old_digest, new_digest in moved.items():
        conn.execute("UPDATE scores SET digest = ? WHERE digest = ?", (new_digest, old_digest))
    conn.execute("DROP TABLE results")
    conn.execute("ALTER TABLE results_v2 RENAME TO results")
    conn.execute(index_sql)
    _move_checkpoints(workdir / "checkpoints", moved)


def _move_checkpoints(folder: Path, moved: dict[str, str]) -> None:
    """Rename fine-tune checkpoint folders (named by key digest) after their rows."""
    if not folder.is_dir():
        return
    for old_digest, new_digest in moved.items():
        source, target = folder / old_digest, folder / new_digest
        if source.is_dir() and not target.exists():
            os.replace(source, target)


def add_calibration_v2(conn: sqlite3.Connection, workdir: Path, columns: tuple[str, ...]) -> None:
    """Fill `columns` (schema 3's metric columns) of every results row from its stored scores;
    runs inside the caller's transaction (module docstring)."""
    from medfm.metrics import bootstrap_metrics  # deferred: opening a registry stays light

    names = sorted({name.removesuffix("_ci_low").removesuffix("_ci_high") for name in columns})
    rows = conn.execute(
        "SELECT results.digest, results.dataset, scores.y_true, scores.y_score "
        "FROM results JOIN scores ON scores.digest = results.digest").fetchall()
    for row in rows:
        y_true, y_score = from_npy(row["y_true"]), from_npy(row["y_score"])
        scored = bootstrap_metrics(y_true, y_score, stored_task(row["dataset"], y_true, y_score),
                                   names)
        values = {}
        for name, (point, (low, high)) in scored.items():
            values.update({name: point, f"{name}_ci_low": low, f"{name}_ci_high": high})
        conn.execute(
            f"UPDATE results SET {', '.join(f'{c} = ?' for c in columns)} WHERE digest = ?",
            (*(values[c] for c in columns), row["digest"]))
