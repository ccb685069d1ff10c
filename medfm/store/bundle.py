"""Result bundles: a work directory's results as one versioned, self-describing file that any
other work directory can merge (two labs, two clusters, one table).

    medfm export lab-a.medfm --dataset breastmnist,pneumoniamnist
    medfm merge lab-a.medfm --workdir W
    from medfm.store.bundle import export_bundle, merge_bundle

Format (BUNDLE_FORMAT, version BUNDLE_VERSION): an uncompressed POSIX tar of three members, in
this order:
- `manifest.json`: format and format_version, created_at, the exporting medfm's and libraries'
  versions (medfm.runtime.software_versions), the registry schema version, the filters, the
  counts, and for the database its size and SHA-256;
- `manifest.sha256`: the SHA-256 of manifest.json, so a flipped byte anywhere in the bundle is
  caught (in the manifest by this sum, in the database by the manifest's);
- `results.sqlite`: a medfm results registry (the registry's own schema, one file) holding the
  exported rows (`results`), their per-sample test scores (`scores`), their corrupted
  evaluations (`evaluations`), and a table `stores`: per feature-store fingerprint the probe
  rows read, the store's file name and its provenance attributes (JSON), from the stores found
  in the exporting work directory.

Merging verifies everything before it writes anything: the members, the manifest's sum, the
format version (a bundle of a newer format is refused), the database's size and sum, its
schema and `PRAGMA quick_check`. Then, in one transaction of the target registry, each bundle
row is matched by its key digest: a key not there is added with its scores and evaluations; a
key there with the same result (SAME_RESULT_FIELDS and the per-sample scores) is left as it is
(scores or evaluations it lacks are added); a key there with another result is a conflict: the
registry keeps its row and the bundle's is kept apart, in the registry
`<workdir>/conflicts/<bundle id>/registry.sqlite` (`medfm results --workdir` reads it), and
reported. Nothing is recomputed, so merging the same bundle twice adds nothing. The manifest and
the store provenance are kept in `<workdir>/bundles/<bundle id>/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from medfm.cache import write_atomic
from medfm.errors import BundleError, InvalidArgumentError, StoreError
from medfm.paths import resolve_workdir
from medfm.runtime import software_versions
from medfm.store.features import STORES_DIRNAME, FeatureStore
from medfm.store.registry import (
    METRIC_FIELDS,
    REGISTRY_FILENAME,
    SCHEMA_VERSION,
    Registry,
    matching_rows,
)

BUNDLE_FORMAT = "medfm-bundle"  # manifest["format"]
BUNDLE_VERSION = 1  # manifest["format_version"]; a newer one is refused
MANIFEST, MANIFEST_SUM, DATABASE = "manifest.json", "manifest.sha256", "results.sqlite"
MEMBERS = (MANIFEST, MANIFEST_SUM, DATABASE)  # the tar's members, in order
MANIFEST_BYTES_MAX = 1_048_576  # a manifest is a few KB; a larger one is not a bundle's
SUM_BYTES_MAX = 128  # manifest.sha256: 64 hex digits and a newline
TABLES = ("results", "scores", "evaluations")  # registry tables a bundle carries, in this order
# what makes two rows of one key the same result (with the per-sample scores); how and when it
# was computed (solver, device, versions, wall_s, created_at, extra) may differ between labs
SAME_RESULT_FIELDS = ("n_train", "subset_digest", "chosen_C", *METRIC_FIELDS)
BATCH = 500  # bundle rows matched per query
READ_BYTES = 1 << 20
CONFLICTS_DIRNAME, BUNDLES_DIRNAME = "conflicts", "bundles"  # inside the work directory
CONFLICTS_SHOWN = 20  # conflicts the CLI lists one per line (then a count)


@dataclass
class ExportedBundle:
    """What `export_bundle` wrote."""

    path: Path
    bundle_id: str  # first 16 hex digits of the manifest's SHA-256
    counts: dict[str, int]  # results, scores, evaluations, stores


@dataclass
class Conflict:
    """A bundle row whose key the registry holds with another result."""

    digest: str
    run: str  # dataset, size, backbone, method, regime, seed
    differences: list[str]  # "acc 0.8123 here, 0.8301 in the bundle", ...


@dataclass
class MergeReport:
    """What `merge_bundle` did."""

    bundle_id: str
    added: int = 0  # rows new to the registry
    same: int = 0  # rows already there with the same result
    evaluations_added: int = 0
    scores_added: int = 0  # per-sample scores added to rows that had none
    conflicts: list[Conflict] = field(default_factory=list)
    conflicts_workdir: Path | None = None  # where the disagreeing rows are (to be) kept apart
    dry_run: bool = False  # nothing was written

    def summary(self) -> list[str]:
        """The lines `medfm merge` prints."""
        added, kept = ("to add", "would be kept") if self.dry_run else ("added", "are kept")
        lines = [f"bundle {self.bundle_id}{' (dry run: nothing written)' if self.dry_run else ''}"
                 f": {self.added} row(s) {added} ({self.evaluations_added} corrupted "
                 f"evaluation(s), {self.scores_added} score set(s) for rows that had none), "
                 f"{self.same} already here"]
        if self.conflicts:
            lines.append(
                f"{len(self.conflicts)} row(s) disagree with this registry's row of the same "
                f"key: the registry's {kept}, the bundle's {kept} apart in "
                f"{self.conflicts_workdir} (medfm results --workdir {self.conflicts_workdir})")
            lines += [f"  {c.digest[:12]} {c.run}: {'; '.join(c.differences)}"
                      for c in self.conflicts[:CONFLICTS_SHOWN]]
            if len(self.conflicts) > CONFLICTS_SHOWN:
                lines.append(f"  ... and {len(self.conflicts) - CONFLICTS_SHOWN} more")
        return lines


# --- export -----------------------------------------------------------------------------------

def export_bundle(path: str | os.PathLike, *, workdir: str | os.PathLike | None = None,
                  force: bool = False, **filters) -> ExportedBundle:
    """Write the registry rows matching `filters` (as Registry.query: dataset, backbone, size,
    method ...) with their scores, evaluations and store provenance to the bundle `path`.

    An existing `path` is replaced only with `force`; the file appears whole or not at all.
    """
    path = Path(path).expanduser()
    if path.is_dir() or (path.exists() and not force):
        raise InvalidArgumentError(f"{path} already exists; give another bundle name, or "
                                   "--force to replace it")
    source, frame = matching_rows(workdir, **filters)
    digests = list(frame["digest"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".medfm-export-", dir=path.parent) as tmp:
        database = Path(tmp) / DATABASE
        Registry(database).close()  # an empty registry: the schema this medfm writes
        fingerprints = sorted(set(frame["store_fingerprint"]) - {""})
        stores = _store_provenance(workdir, fingerprints)
        counts = _fill_database(database, source.path, digests, stores)
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": software_versions(), "registry_schema": SCHEMA_VERSION,
            "filters": {k: v if isinstance(v, (str, int, float)) else list(v)
                        for k, v in filters.items()},
            "counts": counts,
            "stores_not_found": [f for f in fingerprints if f not in {s[0] for s in stores}],
            "files": {DATABASE: {"bytes": database.stat().st_size,
                                 "sha256": _sha256_file(database)}},
        }
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        manifest_sum = hashlib.sha256(manifest_bytes).hexdigest()
        partial = Path(tmp) / "bundle.tar"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_member(tar, MANIFEST, manifest_bytes)
            _add_member(tar, MANIFEST_SUM, f"{manifest_sum}\n".encode("ascii"))
            info = tar.gettarinfo(str(database), arcname=DATABASE)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(database, "rb") as fh:
                tar.addfile(info, fh)
        os.replace(partial, path)
    return ExportedBundle(path=path, bundle_id=manifest_sum[:16], counts=counts)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _columns(conn: sqlite3.Connection, table: str, schema: str = "main") -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA {schema}.table_info({table})")]


def _fill_database(database: Path, source: Path, digests: list[str],
                   stores: list[tuple[str, str, str]]) -> dict[str, int]:
    """Copy the rows of `digests` (results, scores, evaluations) from the registry `source`
    into the empty registry `database`, add the `stores` table, and make it one file."""
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        uri = f"file:{quote(str(source.resolve()))}?mode=ro"
        if not os.access(source.parent, os.W_OK):  # no -shm file can be made: nothing writes
            uri += "&immutable=1"                   # there either (as Registry reads it)
        conn.execute("ATTACH DATABASE ? AS src", (uri,))
        conn.execute("BEGIN")
        selected = json.dumps(digests)
        counts = {}
        for table in TABLES:
            columns = ", ".join(_columns(conn, table))
            counts[table] = conn.execute(
                f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM src.{table} "
                "WHERE digest IN (SELECT value FROM json_each(?)) ORDER BY rowid",
                (selected,)).rowcount
        conn.execute("CREATE TABLE stores (fingerprint TEXT PRIMARY KEY, file TEXT NOT NULL, "
                     "attrs TEXT NOT NULL)")
        conn.executemany("INSERT INTO stores VALUES (?, ?, ?)", stores)
        counts["stores"] = len(stores)
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE src")
        conn.execute("PRAGMA journal_mode=DELETE")  # no -wal beside it: one file
        conn.execute("VACUUM")
    finally:
        conn.close()
    return counts


def _store_provenance(workdir, fingerprints: list[str]) -> list[tuple[str, str, str]]:
    """(fingerprint, file name, attributes as JSON) of each store in the work directory whose
    fingerprint a row read; a store that cannot be opened is passed over (the manifest lists
    the fingerprints it could not describe)."""
    folder = resolve_workdir(workdir, create=False) / STORES_DIRNAME
    wanted, found = set(fingerprints), []
    for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        try:
            store = FeatureStore(path)
            if store.fingerprint in wanted:
                attrs = json.dumps(store.attrs, sort_keys=True, default=_plain)
                found.append((store.fingerprint, path.name, attrs))
                wanted.discard(store.fingerprint)
        except StoreError:
            continue
    return found


def _plain(value):
    """JSON for the attribute values json cannot take (numpy arrays and scalars)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


# --- reading and verifying ---------------------------------------------------------------------

def read_bundle(path: str | os.PathLike, folder: Path) -> tuple[dict, str, Path]:
    """(manifest, bundle id, database path) of the bundle at `path`, its database extracted
    into `folder`, after every check: members, sums, format version, schema, integrity. Any
    failure is one BundleError, and nothing outside `folder` is written."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BundleError(f"bundle {path} does not exist (or is not a file); give the file "
                          "`medfm export` wrote")
    broken = f"{path} is not a readable medfm bundle"
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            if [m.name for m in members] != list(MEMBERS) or not all(m.isfile()
                                                                      for m in members):
                raise BundleError(f"{broken} (its members are {[m.name for m in members]}, "
                                  f"not {list(MEMBERS)}); export it again with `medfm export`")
            if members[0].size > MANIFEST_BYTES_MAX or members[1].size > SUM_BYTES_MAX:
                raise BundleError(f"{broken} (its manifest is {members[0].size:,} bytes, more "
                                  f"than a manifest's {MANIFEST_BYTES_MAX:,})")
            manifest_bytes = tar.extractfile(members[0]).read()
            claimed = tar.extractfile(members[1]).read().decode("ascii").strip()
            bundle_sum = hashlib.sha256(manifest_bytes).hexdigest()
            if claimed != bundle_sum:
                raise BundleError(f"{path} is damaged: its manifest's SHA-256 is {bundle_sum[:16]}"
                                  f"..., not the {claimed[:16]}... it records; nothing was "
                                  "merged: copy the bundle again from its source")
            manifest = _check_manifest(json.loads(manifest_bytes), path)
            expected = manifest["files"][DATABASE]
            want = (int(expected["bytes"]), str(expected["sha256"]))
            database = folder / DATABASE
            digest, size = hashlib.sha256(), 0
            with tar.extractfile(members[2]) as src, open(database, "wb") as dst:
                while block := src.read(READ_BYTES):
                    digest.update(block)
                    size += len(block)
                    dst.write(block)
    except (tarfile.TarError, EOFError, UnicodeDecodeError, ValueError, KeyError,
            TypeError) as exc:
        raise BundleError(f"{broken} ({type(exc).__name__}: {exc}); give the file `medfm "
                          "export` wrote, or copy it again from its source") from None
    if (size, digest.hexdigest()) != want:
        raise BundleError(f"{path} is damaged: its {DATABASE} ({size:,} bytes) does not match "
                          f"the SHA-256 its manifest records; nothing was merged: copy the "
                          "bundle again from its source")
    _check_database(database, path)
    return manifest, bundle_sum[:16], database


def _check_manifest(manifest, path: Path) -> dict:
    """The manifest, if it is one this medfm reads (a newer format is refused)."""
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a medfm bundle (no {BUNDLE_FORMAT} manifest); give "
                          "the file `medfm export` wrote")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{path} has no valid bundle format version ({version!r}); export "
                          "it again with `medfm export`")
    if version > BUNDLE_VERSION:
        made_by = manifest.get("versions", {}).get("medfm", "a newer medfm")
        raise BundleError(f"{path} is a bundle of format version {version}, newer than this "
                          f"medfm reads ({BUNDLE_VERSION}); it was written by medfm {made_by}: "
                          "upgrade medfm, then merge it; nothing was merged")
    return manifest


def _check_database(database: Path, path: Path) -> None:
    """The bundle's registry: a schema this medfm reads (an older one is upgraded in place, in
    the temporary copy) and a sound file."""
    try:
        with sqlite3.connect(database) as conn:
            schema = conn.execute("PRAGMA user_version").fetchone()[0]
            check = [r[0] for r in conn.execute("PRAGMA quick_check")]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise BundleError(f"{path} holds a damaged database ({exc}); nothing was merged: "
                          "export it again") from None
    if schema > SCHEMA_VERSION:
        raise BundleError(f"{path} holds a registry of schema {schema}, newer than this medfm "
                          f"reads ({SCHEMA_VERSION}): upgrade medfm, then merge it; nothing was "
                          "merged")
    if check != ["ok"] or not {*TABLES, "stores"} <= tables:
        raise BundleError(f"{path} holds a damaged database ({check[0][:120]}); nothing was "
                          "merged: export it again")
    if schema < SCHEMA_VERSION:
        Registry(database).close()  # medfm's migrations, on the temporary copy


# --- merge ------------------------------------------------------------------------------------

def merge_bundle(path: str | os.PathLike, *, workdir: str | os.PathLike | None = None,
                 dry_run: bool = False) -> MergeReport:
    """Add the bundle at `path` to a work directory's registry (created if there is none);
    see the module docstring for what is checked first and how keys are matched.

    `dry_run`: check the bundle and report what a merge would add, skip and keep apart,
    writing nothing (the work directory is not even created)."""
    with tempfile.TemporaryDirectory(prefix="medfm-merge-") as tmp:
        manifest, bundle_id, database = read_bundle(path, Path(tmp))
        report = MergeReport(bundle_id=bundle_id, dry_run=dry_run)
        bundle = sqlite3.connect(database)
        bundle.row_factory = sqlite3.Row
        try:
            if dry_run:
                with contextlib.closing(_read_target(workdir, bundle)) as conn:
                    _merge_rows(conn, bundle, report, write=False)
                    _merge_evaluations(conn, bundle, report, write=False)
                if report.conflicts:
                    report.conflicts_workdir = (resolve_workdir(workdir, create=False)
                                                / CONFLICTS_DIRNAME / bundle_id)
                return report
            registry = Registry.in_workdir(workdir)
            with registry.transaction() as conn:
                _merge_rows(conn, bundle, report, write=True)
                _merge_evaluations(conn, bundle, report, write=True)
                if report.conflicts:
                    apart = registry.path.parent / CONFLICTS_DIRNAME / bundle_id
                    report.conflicts_workdir = apart
                    _keep_apart(bundle, apart, [c.digest for c in report.conflicts])
            stores = [dict(r) for r in bundle.execute("SELECT * FROM stores ORDER BY rowid")]
        finally:
            bundle.close()
    record = registry.path.parent / BUNDLES_DIRNAME / bundle_id
    record.mkdir(parents=True, exist_ok=True)
    write_atomic(record / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    write_atomic(record / "stores.json", json.dumps(
        [{**s, "attrs": json.loads(s["attrs"])} for s in stores], indent=1))
    return report


def _read_target(workdir, bundle: sqlite3.Connection) -> sqlite3.Connection:
    """A connection that only reads the work directory's registry (a dry run), or, where there
    is none, an empty in-memory one of the bundle's schema."""
    registry_path = resolve_workdir(workdir, create=False) / REGISTRY_FILENAME
    if registry_path.is_file():
        Registry.existing(workdir).close()  # upgrades an older schema, as any open does
        conn = sqlite3.connect(f"file:{quote(str(registry_path.resolve()))}?mode=ro", uri=True)
    else:
        conn = sqlite3.connect(":memory:")
        for (sql,) in bundle.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND "
                                     f"name IN {TABLES}"):
            conn.execute(sql)
    conn.row_factory = sqlite3.Row
    return conn


def _batches(cursor: sqlite3.Cursor) -> Iterator[list[sqlite3.Row]]:
    while batch := cursor.fetchmany(BATCH):
        yield batch


def _by_digest(conn: sqlite3.Connection, table: str, digests: list[str]) -> dict:
    rows = conn.execute(f"SELECT * FROM {table} WHERE digest IN (SELECT value FROM json_each(?))",
                        (json.dumps(digests),))
    return {r["digest"]: r for r in rows}


def _insert(conn: sqlite3.Connection, table: str, row: sqlite3.Row, columns: list[str]) -> None:
    conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                 f"({', '.join('?' * len(columns))}) ON CONFLICT DO NOTHING",
                 [row[c] for c in columns])


def _merge_rows(conn: sqlite3.Connection, bundle: sqlite3.Connection, report: MergeReport, *,
                write: bool) -> None:
    """Add the bundle's new rows (with their scores); count the same ones; collect conflicts
    (`write=False`: count only)."""
    columns = {t: _columns(conn, t) for t in ("results", "scores")}
    for batch in _batches(bundle.execute("SELECT * FROM results ORDER BY rowid")):
        digests = [r["digest"] for r in batch]
        ours, our_scores = _by_digest(conn, "results", digests), _by_digest(conn, "scores",
                                                                            digests)
        their_scores = _by_digest(bundle, "scores", digests)
        for row in batch:
            digest = row["digest"]
            theirs = their_scores.get(digest)
            if digest not in ours:
                if write:
                    _insert(conn, "results", row, columns["results"])
                if write and theirs is not None:
                    _insert(conn, "scores", theirs, columns["scores"])
                report.added += 1
                continue
            differences = _differences(ours[digest], row, our_scores.get(digest), theirs)
            if differences:
                report.conflicts.append(Conflict(digest, _run_label(row), differences))
                continue
            report.same += 1
            if theirs is not None and digest not in our_scores:
                if write:
                    _insert(conn, "scores", theirs, columns["scores"])
                report.scores_added += 1


def _merge_evaluations(conn: sqlite3.Connection, bundle: sqlite3.Connection,
                       report: MergeReport, *, write: bool) -> None:
    """Add the bundle's corrupted evaluations the registry lacks (`write=False`: count them);
    one that the registry holds with other values makes its row a conflict."""
    columns = _columns(conn, "evaluations")
    conflicted = {c.digest for c in report.conflicts}
    for batch in _batches(bundle.execute("SELECT * FROM evaluations ORDER BY rowid")):
        for row in batch:
            if row["digest"] in conflicted:
                continue
            ours = conn.execute(
                "SELECT metrics, y_score FROM evaluations WHERE digest = ? AND corruption = ? "
                "AND severity = ?", (row["digest"], row["corruption"], row["severity"])).fetchone()
            if ours is None:
                if write:
                    _insert(conn, "evaluations", row, columns)
                report.evaluations_added += 1
            elif (ours["metrics"], ours["y_score"]) != (row["metrics"], row["y_score"]):
                result = bundle.execute("SELECT * FROM results WHERE digest = ?",
                                        (row["digest"],)).fetchone()
                report.conflicts.append(Conflict(row["digest"], _run_label(result), [
                    f"its {row['corruption']} severity {row['severity']} evaluation differs"]))
                conflicted.add(row["digest"])


def _differences(ours: sqlite3.Row, theirs: sqlite3.Row, our_scores: sqlite3.Row | None,
                 their_scores: sqlite3.Row | None) -> list[str]:
    """How the bundle's result of a key differs from the registry's ([] when the same)."""
    found = [f"{name} {ours[name]!r} here, {theirs[name]!r} in the bundle"
             for name in SAME_RESULT_FIELDS if ours[name] != theirs[name]]
    if our_scores is not None and their_scores is not None and (
            our_scores["y_true"], our_scores["y_score"]) != (their_scores["y_true"],
                                                             their_scores["y_score"]):
        found.append("per-sample test scores differ")
    return found


def _run_label(row: sqlite3.Row) -> str:
    regime = (f"{row['fraction']:g} of train" if row["fraction"] is not None
              else f"{row['shots']}-shot")
    return (f"{row['dataset']}@{row['size']} {row['backbone']} {row['method']} {regime} "
            f"seed {row['seed']}")


def _keep_apart(bundle: sqlite3.Connection, folder: Path, digests: list[str]) -> None:
    """The bundle's disagreeing rows, with their scores and evaluations, into the registry in
    `folder` (created; a row already there is left as it is)."""
    registry = Registry(folder / "registry.sqlite")
    with registry.transaction() as conn:
        for table in TABLES:
            columns = _columns(conn, table)
            for batch in _batches(bundle.execute(
                    f"SELECT * FROM {table} WHERE digest IN (SELECT value FROM json_each(?)) "
                    "ORDER BY rowid", (json.dumps(digests),))):
                for row in batch:
                    _insert(conn, table, row, columns)
    registry.close()
