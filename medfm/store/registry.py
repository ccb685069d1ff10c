"""The results registry: one SQLite file, `<workdir>/registry.sqlite`, holding every finished run.

    from medfm.store.registry import Registry, ResultRow
    reg = Registry.in_workdir()                  # $MEDFM_WORKDIR or ./medfm-work
    if not reg.has(key):
        reg.add(ResultRow(key=key, ...), scores=y_score, y_true=y_true)
    df = reg.to_dataframe(dataset="breastmnist", method="logreg")

Identity. A run is identified by a `ResultKey`: exactly the fields that change its result
(`RESULT_KEY_FIELDS`). `ResultKey.digest()` is the sha256 of the key's canonical JSON (sorted keys,
no whitespace, Python's shortest round-trip float repr, `params` re-serialized the same way), so
the same run gets the same digest in every process, on every machine, whatever the key order of
its method settings. Adding a key that is already there is a no-op that returns False.

Storage. Table `results` holds one row per digest: the key fields as columns (so they can be
filtered), metrics with their CIs, how the run was computed (`solver`, `device`, the loaded
`weights_digest`), and JSON columns `extra` and `versions`. Table `scores` holds
the per-sample test scores beside the row, keyed by the same digest: two `.npy`-serialized BLOBs,
`y_true` (labels, dtype and shape as given) and `y_score` (float32). Row and scores are written in
one transaction, so a reader never sees one without the other. Table `evaluations` holds the same
run scored on corrupted copies of its test split (MedMNIST-C): one record per (digest,
corruption, severity) with the metrics as JSON (the names of the results columns, METRIC_FIELDS)
and the per-sample scores (float32 .npy BLOB; the labels are the clean split's, in `scores`).

    reg.add_evaluation(key, "pixelate", 3, evaluate(y_true, y_score, task), y_score)
    reg.evaluated(keys)            # {digest: {("pixelate", 3), ...}}: what is already scored
    reg.to_dataframe(corruptions=True)  # clean rows, then one row per stored evaluation

Concurrency. WAL journal (readers never block the writer), 30 s busy timeout, and every write in a
`BEGIN IMMEDIATE` transaction with `INSERT ... ON CONFLICT DO NOTHING`: several processes adding at
once neither lose nor duplicate rows, and exactly one of them wins each key. A `Registry` opened
before a fork reconnects in the child. The schema version lives in `PRAGMA user_version`;
`_MIGRATIONS` upgrades older files in place on open, in one transaction (schema 1 -> 2 re-keys
every row by its resolved request; 2 -> 3 adds the calibration columns, computed from each row's
stored scores, and the `evaluations` table; medfm.store.migrate).

Integrity. Opening a registry to write first runs `PRAGMA quick_check` (0.3 s for 200 MB; once
per state of the file and its WAL, recorded in $MEDFM_CACHE/registry-checks): a damaged file is
a RegistryError and nothing is written to it. `Registry.existing` (results, report) and grid
planning open a current file read-only, so a read-only registry is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from medfm.backbones.names import canonical_backbone_id
from medfm.cache import cache_dir, read_json, write_atomic
from medfm.errors import InvalidArgumentError, RegistryError
from medfm.paths import resolve_workdir
from medfm.resolve.keys import RESULT_KEY_FIELDS, ResultKey, canonical_json
from medfm.store.blobs import from_npy, to_npy

if TYPE_CHECKING:
    import pandas

    from medfm.metrics import Metrics

REGISTRY_FILENAME = "registry.sqlite"  # inside the work directory
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's write lock
WAL_RETRY_S = 0.05  # pause between attempts to switch a fresh file to WAL
METRIC_FIELDS = (  # ResultRow floats that may be NaN (e.g. AUC with one class in the test set)
    "acc", "auc", "balanced_acc", "acc_ci_low", "acc_ci_high", "auc_ci_low", "auc_ci_high",
    "balanced_acc_ci_low", "balanced_acc_ci_high", "ece", "ece_ci_low", "ece_ci_high",
    "brier", "brier_ci_low", "brier_ci_high", "nll", "nll_ci_low", "nll_ci_high",
)
METRICS_V3 = METRIC_FIELDS[7:]  # the columns schema 3 added (computed from stored scores)
CORRUPTION_FIELDS = ("corruption", "severity")  # what tells an evaluation from the clean row


def metric_values(metrics: Metrics) -> dict[str, float]:
    """A metrics.Metrics as METRIC_FIELDS values: `x_ci` becomes `x_ci_low` and `x_ci_high`."""
    values = {}
    for name in METRIC_FIELDS:
        if name.endswith(("_ci_low", "_ci_high")):
            base, bound = name.rsplit("_", 1)
            values[name] = float(getattr(metrics, base)[0 if bound == "low" else 1])
        else:
            values[name] = float(getattr(metrics, name))
    return values


@dataclass(kw_only=True)
class ResultRow:
    """One finished run: its key, what it trained on, its test metrics and its provenance."""

    key: ResultKey
    n_train: int  # training images actually used
    subset_digest: str  # digest of the training indices (same sampler => same digest)
    chosen_C: float | None = None  # logistic-regression C picked on the selection split
    acc: float  # MedMNIST ACC on the test split, in [0, 1]
    auc: float  # MedMNIST AUC on the test split, in [0, 1]
    balanced_acc: float  # mean per-class recall on the test split
    acc_ci_low: float  # bootstrap 95% CI of acc
    acc_ci_high: float
    auc_ci_low: float  # bootstrap 95% CI of auc
    auc_ci_high: float
    balanced_acc_ci_low: float = math.nan  # bootstrap 95% CI of balanced_acc
    balanced_acc_ci_high: float = math.nan
    ece: float = math.nan  # expected calibration error (medfm.metrics), in [0, 1]
    ece_ci_low: float = math.nan
    ece_ci_high: float = math.nan
    brier: float = math.nan  # Brier score (binary/multi-label: on P(class 1))
    brier_ci_low: float = math.nan
    brier_ci_high: float = math.nan
    nll: float = math.nan  # mean negative log-likelihood (natural log)
    nll_ci_low: float = math.nan
    nll_ci_high: float = math.nan
    solver: str = ""  # what fitted it: sklearn | scipy | torch | cuml ("" when nothing to fit)
    device: str = ""  # device type it computed on: cpu | cuda
    weights_digest: str = ""  # sha256 of the backbone tensors actually loaded ("" unknown)
    extra: dict = field(default_factory=dict)  # grid, iterations, converged, curves, ...
    versions: dict = field(default_factory=dict)  # medfm, torch, timm, sklearn, ... versions
    wall_s: float  # seconds the run took
    created_at: str = ""  # ISO-8601 UTC; filled on insert when empty

    @classmethod
    def scored(cls, key: ResultKey, subset, metrics: Metrics, **fields: Any) -> ResultRow:
        """A row from a sampling.Subset and a metrics.Metrics (the test-split evaluation)."""
        return cls(key=key, n_train=subset.n, subset_digest=subset.digest,
                   **metric_values(metrics), **fields)


PROVENANCE_FIELDS = ("solver", "device", "weights_digest")  # ResultRow strings beside the key
_ROW_COLUMNS = (
    "n_train", "subset_digest", "chosen_C", *METRIC_FIELDS, *PROVENANCE_FIELDS, "extra",
    "versions", "wall_s", "created_at",
)
_ALL_COLUMNS = ("digest", *RESULT_KEY_FIELDS, *_ROW_COLUMNS)
DATAFRAME_COLUMNS = (  # to_dataframe's columns, in order (corruption, severity: None when clean)
    *RESULT_KEY_FIELDS, *CORRUPTION_FIELDS, *METRIC_FIELDS, "n_train", "subset_digest", "chosen_C",
    *PROVENANCE_FIELDS, "wall_s", "created_at", "digest",
)

_RESULTS_TABLE = """
    CREATE TABLE {table} (
        digest TEXT PRIMARY KEY,
        dataset TEXT NOT NULL, size INTEGER NOT NULL, data_digest TEXT NOT NULL,
        backbone TEXT NOT NULL, weights TEXT NOT NULL, resize_policy TEXT NOT NULL,
        input_size INTEGER NOT NULL, normalize TEXT NOT NULL, feature_kind TEXT NOT NULL,
        method TEXT NOT NULL, params TEXT NOT NULL, selection TEXT NOT NULL,
        select_metric TEXT NOT NULL, fraction REAL, shots INTEGER, seed INTEGER NOT NULL,
        store_fingerprint TEXT NOT NULL,
        n_train INTEGER NOT NULL, subset_digest TEXT NOT NULL, chosen_C REAL,
        acc REAL, auc REAL, balanced_acc REAL,
        acc_ci_low REAL, acc_ci_high REAL, auc_ci_low REAL, auc_ci_high REAL,
        solver TEXT NOT NULL, device TEXT NOT NULL, weights_digest TEXT NOT NULL,
        extra TEXT NOT NULL, versions TEXT NOT NULL, wall_s REAL NOT NULL,
        created_at TEXT NOT NULL
    )
"""  # schema 2 (`{table}`: the migration builds it beside the old one, then renames it)
_RESULTS_INDEX = "CREATE INDEX results_by_run ON results (dataset, size, backbone, method)"
_EVALUATIONS_TABLE = """
    CREATE TABLE evaluations (
        digest TEXT NOT NULL REFERENCES results (digest),
        corruption TEXT NOT NULL,
        severity INTEGER NOT NULL,
        metrics TEXT NOT NULL,
        y_score BLOB NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (digest, corruption, severity)
    )
"""  # schema 3


def _migrate_to_v2(conn: sqlite3.Connection, workdir: Path) -> None:
    """Schema 1 -> 2: re-key every row by its resolved request (medfm.store.migrate)."""
    from medfm.store.migrate import migrate_results_v1  # h5py, stores: only for an old file

    migrate_results_v1(conn, workdir, _RESULTS_TABLE, _RESULTS_INDEX)


def _migrate_to_v3(conn: sqlite3.Connection, workdir: Path) -> None:
    """Schema 2 -> 3: calibration columns, filled from each row's stored scores; `evaluations`."""
    from medfm.store.migrate import add_calibration_v2  # only for an old file

    for name in METRICS_V3:
        conn.execute(f"ALTER TABLE results ADD COLUMN {name} REAL")
    conn.execute(_EVALUATIONS_TABLE)
    add_calibration_v2(conn, workdir, METRICS_V3)


# _MIGRATIONS[v] takes a file from schema version v to v + 1 (PRAGMA user_version; 0 = empty):
# SQL text, or a function (connection, work directory) for steps that need Python.
_MIGRATIONS: tuple[str | Callable[[sqlite3.Connection, Path], None], ...] = (
    """
    CREATE TABLE results (
        digest TEXT PRIMARY KEY,
        dataset TEXT NOT NULL, size INTEGER NOT NULL, backbone TEXT NOT NULL,
        tag TEXT NOT NULL, weights_digest TEXT NOT NULL, resize_policy TEXT NOT NULL,
        input_size INTEGER NOT NULL, feature_kind TEXT NOT NULL, method TEXT NOT NULL,
        backend TEXT NOT NULL, fraction REAL, shots INTEGER, seed INTEGER NOT NULL,
        selection TEXT NOT NULL, params TEXT NOT NULL, store_fingerprint TEXT NOT NULL,
        n_train INTEGER NOT NULL, subset_digest TEXT NOT NULL, chosen_C REAL,
        acc REAL, auc REAL, balanced_acc REAL,
        acc_ci_low REAL, acc_ci_high REAL, auc_ci_low REAL, auc_ci_high REAL,
        extra TEXT NOT NULL, versions TEXT NOT NULL, wall_s REAL NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX results_by_run ON results (dataset, size, backbone, method);
    CREATE TABLE scores (
        digest TEXT PRIMARY KEY REFERENCES results (digest),
        y_true BLOB NOT NULL,
        y_score BLOB NOT NULL
    );
    """,
    _migrate_to_v2,
    _migrate_to_v3,
)
SCHEMA_VERSION = len(_MIGRATIONS)


def _read_only_connection(path: Path) -> sqlite3.Connection:
    """A connection that never writes: `mode=ro`, or, where the folder is read-only and SQLite
    cannot make the WAL's shared-memory file, `immutable=1` (nothing can change the file
    there)."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA user_version").fetchone()
    except sqlite3.OperationalError:
        conn.close()
        if os.access(path.parent, os.W_OK):
            raise
        conn = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
    return conn


def _file_state(path: Path) -> str | None:
    """Path, size and mtime of a registry and of its WAL, or None when there is no file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    if not stat.st_size:
        return None
    try:
        wal = Path(f"{path}-wal").stat()
        wal_state = f"{wal.st_size}|{wal.st_mtime_ns}"
    except FileNotFoundError:
        wal_state = "-"
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{wal_state}"


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (persistent), retrying while another process holds it.

    The switch needs an exclusive lock and SQLite answers "database is locked" at once, without
    calling the busy handler, when several processes open a fresh file together.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_RETRY_S)


def _digest_of(key: ResultKey | str) -> str:
    """The registry digest of a key, or the digest itself."""
    return key if isinstance(key, str) else key.digest()


class Registry:
    """The SQLite results registry (see the module docstring for identity, storage, concurrency)."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False) -> None:
        """Open `path`, creating the file and its schema if needed (WAL, 30 s busy timeout),
        after an integrity check (`PRAGMA quick_check`, once per state of the file): a registry
        that would be refused when read is refused before anything is written to it.

        `read_only`: open an existing, current registry for reading only (nothing is checked
        or written, so a read-only file or folder reads); one of an older schema is upgraded
        first, as any open does."""
        self.path = Path(path).expanduser()
        self._conn_obj: sqlite3.Connection | None = None
        self._conn_pid = -1
        self._read_only = read_only and self._current_schema()
        if not self._read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._check_integrity()
            self._migrate()

    @classmethod
    def in_workdir(cls, workdir: str | os.PathLike | None = None) -> Registry:
        """The registry of a work directory (argument, then $MEDFM_WORKDIR, then ./medfm-work)."""
        return cls(resolve_workdir(workdir) / REGISTRY_FILENAME)

    @classmethod
    def existing(cls, workdir: str | os.PathLike | None = None) -> Registry:
        """The registry of a work directory for a verb that only reads it (results, report):
        where there is none, a RegistryError saying so, and nothing is created (a mistyped
        --workdir used to leave an empty work directory and print no rows)."""
        path = resolve_workdir(workdir, create=False) / REGISTRY_FILENAME
        if not path.is_file():
            raise RegistryError(
                f"no results registry in {path.parent}: nothing has been recorded there; check "
                "--workdir (or $MEDFM_WORKDIR), or run `medfm probe` or `medfm finetune` (or "
                "`medfm grid SPEC.yaml`) first")
        return cls(path, read_only=True)

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"

    # -- connection and schema ------------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        """This process's connection (a connection inherited through fork is never reused)."""
        if self._conn_obj is None or self._conn_pid != os.getpid():
            if self._read_only:
                conn = _read_only_connection(self.path)
            else:
                # isolation_level=None: autocommit; writes open their own BEGIN IMMEDIATE.
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                _enable_wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable, never corrupt
            conn.row_factory = sqlite3.Row
            self._conn_obj, self._conn_pid = conn, os.getpid()
        return self._conn_obj

    def _current_schema(self) -> bool:
        """Whether the file holds this medfm's schema (then reading needs no upgrade)."""
        try:
            with contextlib.closing(_read_only_connection(self.path)) as conn:
                return conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        except sqlite3.Error:
            return False  # the writable open says what is wrong

    def _check_integrity(self) -> None:
        """RegistryError, before anything is written, if `PRAGMA quick_check` finds the file
        damaged; a file found sound is recorded (by path, size and mtime of it and its WAL) so
        the check runs once per state of the file."""
        state = _file_state(self.path)
        if state is None:
            return  # a new registry
        record = cache_dir("registry-checks") / hashlib.sha1(state.encode()).hexdigest()
        if read_json(record) == {"state": state}:
            return
        with self._translate_errors():
            with contextlib.closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)) as conn:
                found = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if found != ["ok"]:
            raise RegistryError(
                f"results registry {self.path} is damaged (quick_check: "
                f"{' '.join(found[0].split())[:160]}"
                f"{f'; {len(found) - 1} more problem(s)' if len(found) > 1 else ''}); nothing "
                f"was written to it: restore a backup, or move it aside (medfm starts a new one "
                "and reruns what it needs)")
        write_atomic(record, json.dumps({"state": state}))

    def close(self) -> None:
        """Close this process's connection (the registry reopens on next use)."""
        if self._conn_obj is not None and self._conn_pid == os.getpid():
            self._conn_obj.close()
        self._conn_obj = None

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """Turn SQLite failures into a RegistryError that says what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise RegistryError(
                    f"results registry {self.path} stayed locked for {BUSY_TIMEOUT_S:.0f} s "
                    f"({exc}); check that no medfm process is stuck writing to it, then retry"
                ) from exc
            if "full" in str(exc):  # SQLITE_FULL: "database or disk is full"
                raise RegistryError(
                    f"disk full writing results registry {self.path} ({exc}); finished runs are "
                    "kept: free space, then rerun the same command to resume"
                ) from exc
            if "readonly" in str(exc):  # SQLITE_READONLY: a read-only file or file system
                raise RegistryError(
                    f"results registry {self.path} is read-only ({exc}); make it and its folder "
                    "writable, or pass another --workdir"
                ) from exc
            raise RegistryError(
                f"cannot use results registry {self.path} ({exc}); check that the file and its "
                "folder are readable and writable"
            ) from exc
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # subclasses (bad SQL, bindings) are bugs
                raise
            raise RegistryError(
                f"results registry {self.path} is corrupt or not a SQLite file ({exc}); move it "
                "aside (medfm starts a new one and reruns what it needs) or restore a backup"
            ) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A BEGIN IMMEDIATE transaction: takes the write lock up front, so no upgrade deadlock."""
        with self._translate_errors():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction for a bulk writer (medfm.store.bundle's merge): the connection
        inside a BEGIN IMMEDIATE, committed on leaving, rolled back on any error, SQLite
        failures as RegistryError."""
        with self._write() as conn:
            yield conn

    def _migrate(self) -> None:
        """Bring the file's schema to SCHEMA_VERSION (one transaction; safe when racing)."""
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"results registry {self.path} has schema version {version}, newer than this "
                    f"medfm understands ({SCHEMA_VERSION}); upgrade medfm"
                )
            for step in range(version, SCHEMA_VERSION):
                migration = _MIGRATIONS[step]
                if callable(migration):
                    migration(conn, self.path.parent)
                    continue
                for statement in migration.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            # PRAGMA cannot take a bound parameter; SCHEMA_VERSION is an int constant.
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- writing ---------------------------------------------------------------------------

    def add(
        self,
        row: ResultRow,
        scores: np.ndarray | None = None,
        y_true: np.ndarray | None = None,
        *,
        replace: bool = False,
    ) -> bool:
        """Insert `row` and its per-sample test scores in one transaction.

        Returns False, writing nothing, when the key is already there and `replace` is False.
        With `replace=True` the old row, its scores and its corrupted evaluations are dropped
        first (they scored the model being replaced). `scores` (N, C) are
        stored as float32; `y_true` (N, ...) as given.
        """
        if (scores is None) != (y_true is None):
            raise InvalidArgumentError("pass both scores and y_true, or neither")
        blobs = None
        if scores is not None:
            y_score = np.asarray(scores, dtype=np.float32)
            labels = np.asarray(y_true)
            if len(y_score) != len(labels):
                raise InvalidArgumentError(
                    f"scores has {len(y_score)} samples but y_true has {len(labels)}; pass the "
                    "test-set scores and labels of the same samples"
                )
            blobs = (to_npy(labels), to_npy(y_score))
        digest = row.key.digest()
        values = self._row_values(row, digest)
        placeholders = ", ".join("?" * len(_ALL_COLUMNS))
        with self._write() as conn:
            if replace:
                conn.execute("DELETE FROM evaluations WHERE digest = ?", (digest,))
                conn.execute("DELETE FROM scores WHERE digest = ?", (digest,))
                conn.execute("DELETE FROM results WHERE digest = ?", (digest,))
            inserted = conn.execute(
                f"INSERT INTO results ({', '.join(_ALL_COLUMNS)}) VALUES ({placeholders}) "
                "ON CONFLICT (digest) DO NOTHING",
                values,
            ).rowcount
            if inserted and blobs is not None:
                conn.execute(
                    "INSERT INTO scores (digest, y_true, y_score) VALUES (?, ?, ?)",
                    (digest, *blobs),
                )
        return bool(inserted)

    def add_evaluation(
        self,
        key: ResultKey | str,
        corruption: str,
        severity: int,
        metrics: Metrics,
        y_score: np.ndarray,
    ) -> bool:
        """Record a stored run scored on a corrupted copy of its test split, in one transaction.

        `corruption` is the corruption's name (MedMNIST-C's, e.g. "pixelate"), `severity` its
        level (1-5 in MedMNIST-C), `metrics` what metrics.evaluate gives on the corrupted
        scores, `y_score` those per-sample scores (N, C) in the clean test split's order
        (stored as float32). Returns False, writing nothing, when this (run, corruption,
        severity) is already there. The run itself must be in the registry.
        """
        digest = _digest_of(key)
        if not isinstance(corruption, str) or not corruption.strip():
            raise InvalidArgumentError(
                f"corruption must be a non-empty name such as 'pixelate'; got {corruption!r}")
        if isinstance(severity, bool) or int(severity) != severity or severity < 1:
            raise InvalidArgumentError(
                f"severity must be a positive integer (MedMNIST-C: 1-5); got {severity!r}")
        scores = np.asarray(y_score, dtype=np.float32)
        values = canonical_json({
            name: None if math.isnan(value) else value
            for name, value in metric_values(metrics).items()
        })
        created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM results WHERE digest = ?", (digest,)).fetchone() is None:
                raise RegistryError(
                    f"run {digest[:12]} is not in {self.path}; add its clean row first "
                    "(Registry.add), then its corrupted evaluations")
            clean = conn.execute("SELECT y_score FROM scores WHERE digest = ?",
                                 (digest,)).fetchone()
            if clean is not None and len(from_npy(clean["y_score"])) != len(scores):
                raise InvalidArgumentError(
                    f"y_score has {len(scores)} samples but run {digest[:12]}'s test split has "
                    f"{len(from_npy(clean['y_score']))}; pass one score row per test image")
            inserted = conn.execute(
                "INSERT INTO evaluations (digest, corruption, severity, metrics, y_score, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (digest, corruption, int(severity), values, to_npy(scores), created_at),
            ).rowcount
        return bool(inserted)

    @staticmethod
    def _row_values(row: ResultRow, digest: str) -> tuple:
        """`row` as a tuple in _ALL_COLUMNS order."""
        created_at = row.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        by_name = {
            "digest": digest,
            **row.key.as_dict(),
            "n_train": int(row.n_train),
            "subset_digest": row.subset_digest,
            "chosen_C": None if row.chosen_C is None else float(row.chosen_C),
            **{name: float(getattr(row, name)) for name in METRIC_FIELDS},
            **{name: str(getattr(row, name)) for name in PROVENANCE_FIELDS},
            "extra": canonical_json(row.extra),
            "versions": canonical_json(row.versions),
            "wall_s": float(row.wall_s),
            "created_at": created_at,
        }
        return tuple(by_name[name] for name in _ALL_COLUMNS)

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._translate_errors():
            return self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def has(self, key: ResultKey | str) -> bool:
        """Whether a run with this key (or digest) is in the registry."""
        with self._translate_errors():
            found = self._conn.execute(
                "SELECT 1 FROM results WHERE digest = ?", (_digest_of(key),)
            ).fetchone()
        return found is not None

    def done_keys(self, keys: Iterable[ResultKey | str]) -> set[str]:
        """Digests of those `keys` already in the registry, in one query (any number of keys)."""
        digests = [_digest_of(key) for key in keys]
        with self._translate_errors():
            rows = self._conn.execute(
                "SELECT digest FROM results WHERE digest IN (SELECT value FROM json_each(?))",
                (json.dumps(digests),),
            ).fetchall()
        return {row["digest"] for row in rows}

    def get(self, key: ResultKey | str) -> ResultRow | None:
        """The stored row of a key (or digest), or None."""
        with self._translate_errors():
            found = self._conn.execute(
                "SELECT * FROM results WHERE digest = ?", (_digest_of(key),)
            ).fetchone()
        return None if found is None else self._to_row(found)

    @staticmethod
    def _to_row(record: sqlite3.Row) -> ResultRow:
        """A `results` record as a ResultRow (NULL metrics, stored for NaN, back to NaN)."""
        metrics = {
            name: math.nan if record[name] is None else record[name] for name in METRIC_FIELDS
        }
        return ResultRow(
            key=ResultKey(**{name: record[name] for name in RESULT_KEY_FIELDS}),
            n_train=record["n_train"],
            subset_digest=record["subset_digest"],
            chosen_C=record["chosen_C"],
            **metrics,
            **{name: record[name] for name in PROVENANCE_FIELDS},
            extra=json.loads(record["extra"]),
            versions=json.loads(record["versions"]),
            wall_s=record["wall_s"],
            created_at=record["created_at"],
        )

    def scores(self, key: ResultKey | str) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_score) saved with a run: labels as given, scores float32 (N, C)."""
        digest = _digest_of(key)
        with self._translate_errors():
            found = self._conn.execute(
                "SELECT y_true, y_score FROM scores WHERE digest = ?", (digest,)
            ).fetchone()
        if found is None:
            state = "was saved without per-sample scores" if self.has(digest) else "is not there"
            raise RegistryError(
                f"run {digest[:12]} {state} in {self.path}; rerun it and add it with "
                "replace=True to record its test scores"
            )
        return from_npy(found["y_true"]), from_npy(found["y_score"])

    def evaluations(self, key: ResultKey | str) -> list[dict[str, Any]]:
        """The corrupted evaluations of a run, by corruption then severity: dicts with
        `corruption`, `severity`, every METRIC_FIELDS value (NaN where undefined), `y_score`
        (float32 (N, C)) and `created_at`. Empty when none is stored."""
        with self._translate_errors():
            records = self._conn.execute(
                "SELECT corruption, severity, metrics, y_score, created_at FROM evaluations "
                "WHERE digest = ? ORDER BY corruption, severity", (_digest_of(key),)
            ).fetchall()
        return [{"corruption": r["corruption"], "severity": r["severity"],
                 **_metrics_from_json(r["metrics"]), "y_score": from_npy(r["y_score"]),
                 "created_at": r["created_at"]} for r in records]

    def evaluated(self, keys: Iterable[ResultKey | str]) -> dict[str, set[tuple[str, int]]]:
        """Per digest of `keys`, the (corruption, severity) pairs already stored (an empty set
        when none), in one query: what a run still needs scored."""
        digests = [_digest_of(key) for key in keys]
        found: dict[str, set[tuple[str, int]]] = {digest: set() for digest in digests}
        with self._translate_errors():
            records = self._conn.execute(
                "SELECT digest, corruption, severity FROM evaluations "
                "WHERE digest IN (SELECT value FROM json_each(?))", (json.dumps(digests),)
            ).fetchall()
        for record in records:
            found[record["digest"]].add((record["corruption"], record["severity"]))
        return found

    def _select(self, columns: Iterable[str], filters: dict[str, Any]) -> list[sqlite3.Row]:
        """Records matching `filters` (field=value, field=[values], field=None), oldest first."""
        allowed = (*RESULT_KEY_FIELDS, *PROVENANCE_FIELDS, "digest")
        clauses, params = [], []
        for name, value in filters.items():
            if name not in allowed:
                raise InvalidArgumentError(
                    f"cannot filter results on {name!r}; use one of {', '.join(allowed)}"
                )
            values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            if name == "backbone":  # any spelling of a backbone finds its canonical id
                values = [canonical_backbone_id(v) if isinstance(v, str) else v for v in values]
            tests = []
            # numpy scalars (e.g. from a DataFrame) bind as their Python value
            present = [
                v.item() if isinstance(v, np.generic) else v for v in values if v is not None
            ]
            if present:
                tests.append(f"{name} IN ({', '.join('?' * len(present))})")
                params.extend(present)
            if len(present) < len(values):
                tests.append(f"{name} IS NULL")
            clauses.append("(" + (" OR ".join(tests) or "0") + ")")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._translate_errors():
            return self._conn.execute(
                f"SELECT {', '.join(columns)} FROM results {where} ORDER BY rowid", params
            ).fetchall()

    def query(self, **filters: Any) -> list[ResultRow]:
        """Rows whose key (or provenance) fields match every filter; a list value matches any of
        its items; a backbone matches in any spelling (alias, bare architecture, arch.tag).

        `reg.query(dataset="breastmnist", method=["logreg", "knn"], fraction=None)`
        """
        return [self._to_row(record) for record in self._select(_ALL_COLUMNS, filters)]

    def to_dataframe(self, *, corruptions: bool = False, **filters: Any) -> pandas.DataFrame:
        """Matching rows as one flat table with columns DATAFRAME_COLUMNS (filters as `query`).

        Clean rows have `corruption` and `severity` None. With `corruptions=True` each row is
        followed by one row per stored evaluation (by corruption, then severity): the run's
        key and provenance, the evaluation's metrics, corruption, severity and created_at.
        """
        import pandas  # deferred: workers that only add rows never pay for it

        selected = [f"NULL AS {name}" if name in CORRUPTION_FIELDS else name
                    for name in DATAFRAME_COLUMNS]
        records = [dict(record) for record in self._select(selected, filters)]
        if corruptions and records:
            records = self._with_evaluations(records)
        frame = pandas.DataFrame.from_records(
            [tuple(record[name] for name in DATAFRAME_COLUMNS) for record in records],
            columns=list(DATAFRAME_COLUMNS),
        )
        floats = [*METRIC_FIELDS, "fraction", "chosen_C", "wall_s"]
        frame[floats] = frame[floats].astype(float)  # NULL -> NaN, even in an all-NULL column
        frame["severity"] = frame["severity"].astype("Int64")  # integer, <NA> for clean rows
        frame["corruption"] = frame["corruption"].astype(object).where(
            frame["corruption"].notna(), None)  # None for clean rows (not NaN)
        return frame

    def _with_evaluations(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`records` (results rows as dicts), each followed by a copy per stored evaluation."""
        with self._translate_errors():
            stored = self._conn.execute(
                "SELECT digest, corruption, severity, metrics, created_at FROM evaluations "
                "WHERE digest IN (SELECT value FROM json_each(?)) "
                "ORDER BY digest, corruption, severity",
                (json.dumps([r["digest"] for r in records]),),
            ).fetchall()
        by_digest: dict[str, list[sqlite3.Row]] = {}
        for evaluation in stored:
            by_digest.setdefault(evaluation["digest"], []).append(evaluation)
        out = []
        for record in records:
            out.append(record)
            for evaluation in by_digest.get(record["digest"], []):
                out.append({**record, **_metrics_from_json(evaluation["metrics"]),
                            "corruption": evaluation["corruption"],
                            "severity": evaluation["severity"],
                            "created_at": evaluation["created_at"]})
        return out


def matching_rows(workdir: str | os.PathLike | None = None,
                  **filters: Any) -> tuple[Registry, pandas.DataFrame]:
    """(a work directory's registry, opened to read, and its clean rows matching `filters` as
    Registry.to_dataframe gives them) for verbs that read it (leaderboard, export): a
    RegistryError when there is no registry or no row matches."""
    registry = Registry.existing(workdir)
    frame = registry.to_dataframe(**filters)
    if frame.empty:
        shown = ", ".join(f"{k}={v}" for k, v in filters.items()) or "no filter"
        raise RegistryError(f"no results in {registry.path} match ({shown}); check the "
                            "filters with `medfm results`")
    return registry, frame


def _metrics_from_json(text: str) -> dict[str, float]:
    """An evaluation's stored metrics as METRIC_FIELDS floats (null, or absent, -> NaN)."""
    stored = json.loads(text)
    return {name: math.nan if stored.get(name) is None else float(stored[name])
            for name in METRIC_FIELDS}
