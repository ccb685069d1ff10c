"""Batched frozen inference from MedMNIST npz files into HDF5 feature stores.

    from medfm.extract import extract
    extract(dataset="breastmnist", backbone="tf_efficientnet_lite0.in1k", size=28)

    medfm extract --dataset breastmnist --backbone tf_efficientnet_lite0.in1k --size 28
    medfm extract --backbone convnext_base --size 224      # every MedMNIST dataset at 224

The request (dataset file, backbone and weights, preprocessing, dtype, precision) is resolved
first (medfm.resolve); its store is found by name, so a finished store makes a rerun a no-op
that loads no model, and a killed one resumes from its last complete chunk. For each split, a
loader thread slices uint8 chunks out of the (possibly memory-mapped) images into a ring of
reused host buffers (pinned on CUDA) and, on CUDA, onto the GPU on a side stream, so the copy of
the next chunk overlaps the model's work on this one. The main thread preprocesses the chunk on
the device in float32 (preprocess.py), runs the backbone (eval, inference mode, channels_last,
BatchNorm folded into the convs (fold.py), optionally torch.compile-d, in the request's
precision: bf16 autocast, or float32 with TF32 off; cuDNN picks its fastest kernels on CUDA) and
hands the chunk's pooled pre-logits, copied back asynchronously into a reused (pinned) host
buffer, to a writer thread that waits for the copy and writes the HDF5 store: the main thread
never waits for the GPU or the disk, except when every buffer is in flight. Out-of-memory halves
the batch and retries. A process keeps its last model loaded (`release_models`), so consecutive
extractions with the same backbone (several datasets or sizes, a grid worker's small stores)
load, fold and compile it once. Every finished extraction records its throughput
(medfm.throughput) for the cost estimates of `medfm grid --dry-run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medfm.backbones import Backbone, create_backbone
from medfm.data import SPLITS, get_dataset, load_split
from medfm.errors import InvalidArgumentError
from medfm.extract.fold import check_batch, fold_verified
from medfm.limits import check_batch_size, check_seed
from medfm.preprocess import DevicePreprocessor, PreprocessRequest
from medfm.resolve.store import StoreRequest, resolve_store_request
from medfm.robust.corrupt import (SEVERITIES, NotApplicable, corrupt, package_version,
                                  resolve_corruptions)
from medfm.robust.stores import CorruptedStore, corrupted_identity, corrupted_path, group_name
from medfm.runtime import device_name, resolve_device, versions
from medfm.store.done import finished_store
from medfm.store.features import (FeatureStore, StoreWriter, disk_full_is_one_line,
                                  store_lock, stores_dir)
from medfm.throughput import Measurement, record_throughput

DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 32}  # images per forward pass, per device type
CHUNK_BATCHES = 8  # batches per stored chunk: the unit of resumption
PREFETCH_CHUNKS = 2  # uint8 chunks the loader thread keeps ready ahead of the model
WRITE_AHEAD_CHUNKS = 2  # feature chunks queued for the writer thread before the model waits
PAD_DEVICES = ("cuda",)  # device types whose partial batches are padded to a full one (below)


@dataclass(frozen=True)
class ExtractResult:
    """What one extraction did: built a store, resumed one, or found it already done."""

    path: Path  # the finished .h5 store
    status: str  # "built", "resumed" or "exists"
    summary: dict  # FeatureStore.summary()
    images_per_s: float  # end-to-end rate of this call (0 when nothing was computed)


def _host_buffers(count: int, shape: tuple, dtype: torch.dtype, pinned: bool) -> list:
    """`count` reusable host tensors of `shape`; page-locked when `pinned` (CUDA copies them
    asynchronously), pageable otherwise (the CPU path runs the same code)."""
    return [torch.empty(shape, dtype=dtype, pin_memory=pinned) for _ in range(count)]


def _chunks(images, start: int, chunk_rows: int, device: torch.device):
    """Yield (start, uint8 tensor) chunks read by a background thread, PREFETCH_CHUNKS ahead,
    into a ring of reused host buffers; on CUDA they are pinned and each chunk is already on the
    GPU, copied on a side stream (the consumer's stream waits for each copy, so the copy overlaps
    the model's work on the chunk before). On the CPU a chunk is a view of its host buffer: it
    is valid until the next chunk is asked for."""
    q: queue.Queue = queue.Queue(maxsize=PREFETCH_CHUNKS)
    stop = threading.Event()
    cuda = device.type == "cuda"

    def load():
        try:
            copies = torch.cuda.Stream(device) if cuda else None
            # a buffer is rewritten only once the chunk read into it left the queue (PREFETCH
            # in it, one with the consumer, one being filled) and, on CUDA, its copy is done
            ring: list = []
            copied: list = [None] * (PREFETCH_CHUNKS + 2)  # each buffer's last copy (CUDA)
            for i, lo in enumerate(range(start, len(images), chunk_rows)):
                if stop.is_set():
                    return
                rows = images[lo:lo + chunk_rows]  # (N, H, W[, 3]) uint8, maybe memory-mapped
                if not ring:  # sized for the split's rows when it is less than a chunk
                    capacity = min(chunk_rows, len(images) - start)
                    ring = _host_buffers(len(copied), (capacity, *rows.shape[1:]),
                                         torch.uint8, cuda)
                slot = i % len(ring)
                if copied[slot] is not None:
                    copied[slot].synchronize()  # its previous chunk has reached the GPU
                host = ring[slot][:len(rows)]
                host.numpy()[...] = rows
                done = None
                if cuda:
                    with torch.cuda.stream(copies):
                        chunk = host.to(device, non_blocking=True)
                        done = copied[slot] = torch.cuda.Event()
                        done.record(copies)
                else:
                    chunk = host
                q.put((lo, chunk, done))
            q.put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=load, daemon=True, name="medfm-loader")
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            lo, chunk, done = item
            if done is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(done)  # the model's work waits for the copy, the host does not
                chunk.record_stream(stream)  # its memory is reused only after that work
            yield lo, chunk
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()


class _ChunkWriter:
    """Writes feature chunks into a StoreWriter from a background thread, in order.

    `submit` copies a chunk's (N, D) float32 features from the device into one of a ring of
    reused host buffers (pinned on CUDA: an asynchronous copy, followed by an event) and queues
    it; the thread waits for the copy's event, writes the rows (HDF5 write, float16 conversion,
    flush) and frees the buffer. So the model's stream is never synchronized per batch, and the
    host only when every buffer is still in flight (WRITE_AHEAD_CHUNKS). A write error (a full
    disk, NaN features) is raised in the caller at its next `submit` or at `close`; on leaving
    by an exception the chunks already queued are still written (their rows are computed)."""

    def __init__(self, writer: StoreWriter, rows: int, dim: int, device: torch.device):
        self.writer, self.device = writer, device
        self.cuda = device.type == "cuda"
        self._free: queue.Queue = queue.Queue()
        for buffer in _host_buffers(WRITE_AHEAD_CHUNKS + 1, (rows, dim), torch.float32,
                                    self.cuda):
            self._free.put(buffer)
        self._todo: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="medfm-writer")
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            split, lo, buffer, n, copied = item
            try:
                if self._error is None:
                    if copied is not None:
                        copied.synchronize()
                    self.writer.write(split, lo, buffer[:n].numpy())
            except BaseException as exc:  # noqa: BLE001 - raised in the caller
                self._error = exc
            finally:
                self._free.put(buffer)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, split: str, lo: int, features: torch.Tensor) -> None:
        """Queue rows [lo, lo + len(features)) of `split` ((N, D) float32, on the device)."""
        self._raise_error()
        buffer = self._free.get()  # waits only when WRITE_AHEAD_CHUNKS chunks are in flight
        n = len(features)
        buffer[:n].copy_(features, non_blocking=self.cuda)
        copied = None
        if self.cuda:
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
        self._todo.put((split, lo, buffer, n, copied))

    def close(self) -> None:
        """Write what is queued, stop the thread, raise a write error if one happened."""
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> _ChunkWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:  # the original error wins; the queued chunks are still written
            with contextlib.suppress(BaseException):
                self.close()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


@contextlib.contextmanager
def compute_settings(device: torch.device, precision: str):
    """Backend flags for a frozen forward pass, put back on leaving: on CUDA, cuDNN benchmarks
    its kernels once per input shape and keeps the fastest (extraction's shapes repeat), and
    float32 means float32 (no TF32 in convolutions or matmuls)."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.benchmark = True
    if precision == "float32":
        cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before


def pad_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """`batch` (B, ...) with zero images appended up to `size` rows (itself when B >= size).
    The frozen model runs in eval mode, so the appended rows change no other row's features."""
    if len(batch) >= size:
        return batch
    return torch.cat([batch, batch.new_zeros((size - len(batch), *batch.shape[1:]))])


class _Embedder:
    """Frozen backbone on the device; embeds uint8 chunks with the current store's preprocessing
    (`prep`, set per store), halving the batch on OOM. With `compile`, the pooled forward pass
    is torch.compile-d once BatchNorm is folded, and every batch is padded to the full batch
    size (one input shape, so one compilation per input size)."""

    def __init__(self, backbone: Backbone, device: torch.device, batch_size: int,
                 precision: str, compile: bool = False):
        self.backbone = backbone
        self.device = device
        self.prep: DevicePreprocessor | None = None
        self.batch_size = batch_size
        self.model = backbone.model.to(device, memory_format=torch.channels_last).eval()
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                         if precision == "bfloat16" else contextlib.nullcontext())
        self.bn_folded: int | None = None  # set on the first chunk (see fold.py)
        self.compile = compile
        self.compile_warmup_s: float | None = None  # the first compiled call, compilation in it
        self._forward = self._pooled
        # cuDNN benchmarks every new input shape (compute_settings), about 4 s for Lite0 on an
        # H200, and each split's last batch would be one: on CUDA it is padded to a full batch
        self.pad_batches = device.type in PAD_DEVICES or compile

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def _first_compiled_call(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled forward's first call, timed: its compilation (warm-up) cost."""
        t0 = time.perf_counter()
        feats = self._forward(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per process and model
        self.compile_warmup_s = round(time.perf_counter() - t0, 3)
        return feats

    @torch.inference_mode()
    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 pooled pre-logits of a (N, H, W[, 3]) uint8 chunk, on the device."""
        if self.bn_folded is None:  # checked once, in float64, on real images and noise
            self.model, self.bn_folded = fold_verified(self.model, self.prep(check_batch(chunk)))
            if self.compile:
                self._forward = torch.compile(self._pooled, dynamic=False)
        out = []
        lo = 0
        while lo < len(chunk):
            try:
                batch = chunk[lo:lo + self.batch_size]
                x = self.prep(pad_batch(batch, self.batch_size) if self.pad_batches else batch)
                # (B, H, W[, 3]) uint8 -> (B, 3, S, S) float32 on device
                with self.autocast:
                    if self.compile and self.compile_warmup_s is None:
                        feats = self._first_compiled_call(x)
                    else:
                        feats = self._forward(x)  # (B, D)
                out.append(feats[:len(batch)].float())  # on the device: one copy back per chunk
                lo += len(batch)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or self.batch_size == 1:
                    raise
                self.batch_size //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                tqdm.write(f"out of memory: retrying with batch size {self.batch_size}")
        return torch.cat(out)


_LOADED: dict[tuple, _Embedder] = {}  # the process's last model: (backbone, device, precision,
#                                       compile) -> its embedder; at most one entry


def release_models() -> None:
    """Drop the model this process keeps loaded between extractions (and its GPU memory)."""
    _LOADED.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _embedder_for(request: StoreRequest, dev: torch.device, batch_size: int | None,
                  compile: bool) -> _Embedder:
    """The loaded embedder of the request's backbone on `dev`: the one kept from the last
    extraction when it is the same model, precision and compile setting (loaded, folded and
    compiled once for several datasets and sizes), else a fresh one, replacing it."""
    key = (request.backbone, str(dev), request.precision, compile)
    embed = _LOADED.get(key)
    if embed is None:
        release_models()
        embed = _Embedder(create_backbone(request.backbone), dev,
                          batch_size or DEFAULT_BATCH_SIZE[dev.type], request.precision,
                          compile)
        _LOADED[key] = embed
    else:  # the batch asked for (an earlier out-of-memory halving is found again if needed)
        embed.batch_size = batch_size or DEFAULT_BATCH_SIZE[dev.type]
    return embed


def extract(
    *,
    dataset: str,
    backbone: str,
    size: int,
    weights: str | None = None,
    resize_policy: str | None = None,
    input_size: int | None = None,
    normalize: str | None = None,
    dtype: str = "float16",
    batch_size: int | None = None,
    device: str | None = None,
    workdir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    chunk_rows: int | None = None,
    precision: str | None = None,
    compile: bool = False,
) -> ExtractResult:
    """Embed every split of (`dataset`, `size`) with `backbone` into one HDF5 feature store.

    Resolves the request (medfm.resolve.store.resolve_store_request; `precision` None: bfloat16
    autocast on CUDA, float32 elsewhere), then `extract_request`. `compile` runs the backbone
    torch.compile-d (recorded in the store's provenance, not its identity: the features are the
    eager ones within the store's tolerance).
    """
    request = resolve_store_request(
        dataset=dataset, size=size, backbone=backbone, weights=weights, dtype=dtype,
        preprocess=PreprocessRequest(resize_policy, input_size, normalize), data_root=data_root,
        precision=precision, device=device)
    return extract_request(request, batch_size=batch_size, device=device, workdir=workdir,
                           force=force, progress=progress, chunk_rows=chunk_rows,
                           compile=compile)


def extract_request(
    request: StoreRequest,
    *,
    batch_size: int | None = None,
    device: str | None = None,
    workdir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    chunk_rows: int | None = None,
    compile: bool = False,
) -> ExtractResult:
    """Build the store for a resolved request, or find it built.

    A finished store is reused without loading the model (`force=True` rebuilds it); a corrupt
    one is an error naming it; a partial one from a killed run resumes from its last complete
    chunk.
    """
    if batch_size is not None:
        check_batch_size(batch_size, request.preprocess.input_size)
    dev = resolve_device(device)
    path = stores_dir(workdir) / request.filename()
    # done as the grid planner decides it (medfm.store.done); a corrupt store is reported here
    if not force and (store := finished_store(path, report_corrupt=True)) is not None:
        return ExtractResult(path, "exists", store.summary(), 0.0)
    # one writer per store: a second extraction of this request waits here, then finds it built
    with store_lock(path, label=f"{request.dataset.label} {request.backbone.id}"):
        if not force and (store := finished_store(path, report_corrupt=True)) is not None:
            return ExtractResult(path, "exists", store.summary(), 0.0)
        return _build(request, path, dev, batch_size=batch_size, force=force,
                      progress=progress, chunk_rows=chunk_rows, compile=compile)


def _build(request: StoreRequest, path: Path, dev: torch.device, *, batch_size: int | None,
           force: bool, progress: bool, chunk_rows: int | None,
           compile: bool) -> ExtractResult:
    """Embed every split into the store at `path` (resuming its partial file), under its lock,
    and record the throughput it measured (medfm.throughput)."""
    t0 = time.perf_counter()
    embed = _embedder_for(request, dev, batch_size, compile)
    bb = embed.backbone
    resolved = request.backbone.data_config()  # what the request was resolved against
    if bb.data_config["input_size"] != resolved["input_size"] or (
            tuple(bb.data_config["mean"]) != resolved["mean"]):
        raise RuntimeError(f"{request.backbone.id}: the created model's data config "
                           f"{bb.data_config} differs from the resolved one; a medfm bug")
    splits = {s: load_split(request.dataset.name, request.dataset.size, s,
                            request.dataset.path.parent) for s in SPLITS}
    labels = {s: np.asarray(y) for s, (_, y) in splits.items()}
    embed.prep = DevicePreprocessor(request.preprocess, dev)
    with disk_full_is_one_line(path):
        writer = StoreWriter(path, request.identity(), dim=bb.feature_dim, labels=labels,
                             attrs=_provenance(request, bb), restart=force)
        try:
            with compute_settings(dev, request.precision):
                computed, elapsed, wall, first = _embed_splits(
                    writer, splits, embed, chunk_rows, progress,
                    f"{request.dataset.label} {bb.arch}")
        except BaseException:
            writer.close()  # the partial file stays, ready to resume
            raise
        writer.finalize({
            "device": device_name(dev),
            "batch_size": embed.batch_size,
            "bn_folded": int(embed.bn_folded or 0),
            "compiled": int(compile),
            "compile_warmup_s": embed.compile_warmup_s or 0.0,
            "elapsed_s_json": json.dumps(elapsed),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
        })
    store = FeatureStore(path)
    status = "resumed" if writer.resumed else "built"
    if computed and wall > 0:
        _record_throughput(request, bb.arch, dev, compile, computed=computed, wall=wall,
                           first=first, total_s=time.perf_counter() - t0)
    return ExtractResult(path, status, store.summary(), computed / wall if wall > 0 else 0.0)


def _record_throughput(request: StoreRequest, arch: str, dev: torch.device, compile: bool, *,
                       computed: int, wall: float, first: tuple[int, float],
                       total_s: float) -> None:
    """Cache this extraction's figures (medfm.throughput): images/s after the first chunk
    (which pays the fold check, compilation and cuDNN's tuning), and as fixed seconds
    everything else (model load, store setup and finalization, the first chunk's extra)."""
    first_rows, first_s = first
    if computed > first_rows and wall > first_s:
        rate = (computed - first_rows) / (wall - first_s)
    else:
        rate = computed / wall
    record_throughput(Measurement(
        stage="extract", arch=arch, input_size=request.preprocess.input_size,
        device=device_name(dev), precision=request.precision, compiled=compile, rate=rate,
        overhead_s=max(0.0, total_s - computed / rate), units=computed))


def _provenance(request: StoreRequest, bb: Backbone) -> dict:
    """Store attributes beside the request: what was loaded, from where, with what software."""
    info = get_dataset(request.dataset.name)
    return {
        "backbone_name": request.backbone.name,
        "arch": bb.arch,
        "tag": bb.tag,
        "weights_source": bb.weights,
        "weights_digest": bb.weights_digest,
        "preprocess_json": request.preprocess.to_json(),
        "data_config_json": json.dumps(bb.data_config, sort_keys=True, default=str),
        "dataset": info.flag,
        "task": info.task.value,
        "label_names_json": json.dumps(info.label_names),
        "size": request.dataset.size,
        "data_file": request.dataset.path.name,
        "data_md5": request.dataset.digest,
        "data_md5_official": info.md5(request.dataset.size),
        "versions_json": json.dumps(versions("torch", "timm", "h5py"), sort_keys=True),
    }


def _embed_splits(writer: StoreWriter, splits: dict, embed: _Embedder, chunk_rows: int | None,
                  progress: bool, desc: str) -> tuple[int, dict, float, tuple[int, float]]:
    """Embed every split's remaining rows into `writer`; (rows computed, seconds per split,
    wall seconds, (rows, seconds) of the first chunk)."""
    rows_per_chunk = chunk_rows or embed.batch_size * CHUNK_BATCHES
    total = sum(len(images) for images, _ in splits.values())
    already = sum(writer.rows_done(s) for s in splits)
    elapsed = {}
    first = (0, 0.0)
    t0 = time.perf_counter()
    with tqdm(total=total, initial=already, unit="img", disable=not progress, desc=desc,
              dynamic_ncols=True) as bar:
        with _ChunkWriter(writer, rows_per_chunk, writer.dim, embed.device) as chunks_out:
            for split in splits:
                ts = time.perf_counter()
                bar.set_postfix_str(split)
                for lo, chunk in _chunks(splits[split][0], writer.rows_done(split),
                                         rows_per_chunk, embed.device):
                    chunks_out.submit(split, lo, embed(chunk))
                    bar.update(len(chunk))
                    if not first[0]:
                        first = (len(chunk), time.perf_counter() - t0)
                elapsed[split] = round(time.perf_counter() - ts, 3)  # queued, maybe not written
    return total - already, elapsed, time.perf_counter() - t0, first


# --- corrupted test splits (MedMNIST-C) ------------------------------------------------------

@dataclass(frozen=True)
class CorruptedResult:
    """What one corrupted-split extraction did."""

    path: Path  # the finished sibling store
    status: str  # "built", "resumed" or "exists"
    pairs: list  # (corruption, severity) stored
    skipped: list  # corruptions that cannot apply at this size, with why


class _CorruptedImages:
    """The test images with one corruption at one severity, corrupted chunk by chunk as the
    loader thread slices them (deterministic per image, so resuming at any row is exact)."""

    def __init__(self, images: np.ndarray, dataset: str, corruption: str, severity: int,
                 seed: int, base: str | None):
        self.images, self.args = images, (dataset, corruption, severity)
        self.seed, self.base = seed, base

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start = rows.start or 0
        return corrupt(np.asarray(self.images[rows]), *self.args, seed=self.seed,
                       base=self.base, start=start)


def extract_corrupted(
    request: StoreRequest,
    *,
    corruptions: str | list[str] | None = None,
    severities: tuple[int, ...] = SEVERITIES,
    seed: int = 0,
    base: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    workdir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    chunk_rows: int | None = None,
) -> CorruptedResult:
    """Embed the request's test split under MedMNIST-C corruptions (medfm.robust.corrupt) into a
    sibling of its store (medfm.robust.stores), building the store first if needed.

    `corruptions`: "medmnist-c" / None (every corruption defined for the dataset) or names;
    `severities` 1..5; `seed` makes the corrupted images reproducible; `base` lends an imported
    dataset a MedMNIST dataset's corruption set. A corruption that cannot be applied at the
    store's size is skipped and named in the result.
    """
    seed = check_seed(seed, "corruption seed")
    pairs = resolve_corruptions(request.dataset.name, corruptions, severities, base)
    main = extract_request(request, batch_size=batch_size, device=device, workdir=workdir,
                           progress=progress, chunk_rows=chunk_rows)
    store = FeatureStore(main.path)
    dataset = request.dataset.name
    corruption_set = corruptions if isinstance(corruptions, str) else ",".join(
        corruptions or ["medmnist-c"])
    identity = corrupted_identity(store, pairs, seed=seed, corruption_set=corruption_set,
                                  base=base, version=package_version())
    path = corrupted_path(store, identity)
    if path.exists() and not force:
        done = CorruptedStore(path)
        return CorruptedResult(path, "exists", done.pairs, done.skipped)
    path.parent.mkdir(parents=True, exist_ok=True)
    images, labels = load_split(dataset, request.dataset.size, "test",
                                request.dataset.path.parent)
    skipped, kept = [], []
    probe_image = np.asarray(images[:1])
    for name in dict.fromkeys(c for c, _ in pairs):
        try:  # the strongest severity asked for, on one image: does it apply at this size?
            corrupt(probe_image, dataset, name, max(s for c, s in pairs if c == name),
                    seed=seed, base=base)
            kept.append(name)
        except NotApplicable as exc:
            skipped.append({"corruption": name, "reason": str(exc)})
    pairs = [(c, s) for c, s in pairs if c in kept]
    if not pairs:
        raise InvalidArgumentError(
            f"none of the corruptions asked for applies to {request.dataset.label} images "
            f"({'; '.join(s['reason'] for s in skipped)}).")
    with store_lock(path, label=f"{request.dataset.label} corrupted test splits"):
        if path.exists() and not force:
            done = CorruptedStore(path)
            return CorruptedResult(path, "exists", done.pairs, done.skipped)
        dev = resolve_device(device)
        embed = _embedder_for(request, dev, batch_size, compile=False)
        embed.prep = DevicePreprocessor(request.preprocess, dev)
        bb = embed.backbone
        groups = {group_name(c, s): (_CorruptedImages(images, dataset, c, s, seed, base),
                                     np.asarray(labels)) for c, s in pairs}
        attrs = {"pairs_json": json.dumps(pairs), "skipped_json": json.dumps(skipped),
                 "main_store": store.path.name, "corruption_seed": seed,
                 "medmnistc_version": identity["medmnistc"]}
        with disk_full_is_one_line(path):
            writer = StoreWriter(path, identity, dim=bb.feature_dim,
                                 labels={g: y for g, (_, y) in groups.items()}, attrs=attrs,
                                 restart=force)
            try:
                with compute_settings(dev, request.precision):
                    _embed_splits(writer, groups, embed, chunk_rows, progress,
                                  f"{request.dataset.label} {bb.arch} corrupted")
            except BaseException:
                writer.close()
                raise
            writer.finalize({"device": device_name(dev),
                             "created_at": datetime.now(timezone.utc).isoformat(
                                 timespec="seconds")})
        status = "resumed" if writer.resumed else "built"
    return CorruptedResult(path, status, pairs, skipped)
