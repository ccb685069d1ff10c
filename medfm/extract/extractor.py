"""Batched frozen inference from MedMNIST npz files into HDF5 feature stores.

    from medfm.extract import extract
    extract(dataset="breastmnist", backbone="tf_efficientnet_lite0.in1k", size=28)

    medfm extract --dataset breastmnist --backbone tf_efficientnet_lite0.in1k --size 28
    medfm extract --backbone convnext_base --size 224      # every MedMNIST dataset at 224

The request (dataset file, backbone and weights, preprocessing, dtype, precision) is resolved
first (medfm.request); its store is found by name, so a finished store makes a rerun a no-op
that loads no model, and a killed one resumes from its last complete chunk. For each split, a
loader thread slices uint8 chunks out of the (possibly memory-mapped) images and, on CUDA,
copies each into pinned memory and onto the GPU on a side stream, so the copy of the next chunk
overlaps the model's work on this one. The main thread preprocesses the chunk on the device in
float32 (preprocess.py), runs the backbone (eval, inference mode, channels_last, BatchNorm
folded into the convs (fold.py), in the request's precision: bf16 autocast, or float32 with
TF32 off; cuDNN picks its fastest kernels on CUDA) and writes pooled pre-logits chunk by chunk.
Out-of-memory halves the batch and retries.
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
from medfm.corrupt import SEVERITIES
from medfm.data import SPLITS, get_dataset, load_split
from medfm.errors import InvalidArgumentError
from medfm.extract.fold import check_batch, fold_verified
from medfm.limits import check_batch_size, check_seed
from medfm.preprocess import DevicePreprocessor, PreprocessRequest
from medfm.request import StoreRequest, resolve_store_request
from medfm.runtime import device_name, resolve_device, versions
from medfm.store.features import (FeatureStore, StoreWriter, disk_full_is_one_line,
                                  store_lock, stores_dir)

DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 32}  # images per forward pass, per device type
CHUNK_BATCHES = 8  # batches per stored chunk: the unit of resumption
PREFETCH_CHUNKS = 2  # uint8 chunks the loader thread keeps ready ahead of the model
PAD_DEVICES = ("cuda",)  # device types whose partial batches are padded to a full one (below)


@dataclass(frozen=True)
class ExtractResult:
    """What one extraction did: built a store, resumed one, or found it already done."""

    path: Path  # the finished .h5 store
    status: str  # "built", "resumed" or "exists"
    summary: dict  # FeatureStore.summary()
    images_per_s: float  # end-to-end rate of this call (0 when nothing was computed)


def _chunks(images: np.ndarray, start: int, chunk_rows: int, device: torch.device):
    """Yield (start, uint8 tensor) chunks from a background thread, PREFETCH_CHUNKS ahead; on
    CUDA already on the GPU, copied from pinned memory on a side stream (the consumer's stream
    waits for each copy, so the copy overlaps the model's work on the chunk before)."""
    q: queue.Queue = queue.Queue(maxsize=PREFETCH_CHUNKS)
    stop = threading.Event()
    cuda = device.type == "cuda"

    def load():
        try:
            copies = torch.cuda.Stream(device) if cuda else None
            for lo in range(start, len(images), chunk_rows):
                if stop.is_set():
                    return
                rows = images[lo:lo + chunk_rows]  # (N, H, W[, 3]) uint8, maybe memory-mapped
                done = None
                if cuda:  # read straight into pinned memory, then onto the GPU asynchronously
                    host = torch.empty(rows.shape, dtype=torch.uint8, pin_memory=True)
                    host.numpy()[...] = rows
                    with torch.cuda.stream(copies):
                        chunk = host.to(device, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(copies)
                else:
                    chunk = torch.from_numpy(np.array(rows))  # a writable copy
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
    """Frozen backbone + device preprocessing; embeds uint8 chunks, halving the batch on OOM."""

    def __init__(self, backbone: Backbone, prep: DevicePreprocessor, device: torch.device,
                 batch_size: int, precision: str):
        self.device = device
        self.prep = prep
        self.batch_size = batch_size
        self.model = backbone.model.to(device, memory_format=torch.channels_last).eval()
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                         if precision == "bfloat16" else contextlib.nullcontext())
        self.bn_folded: int | None = None  # set on the first chunk (see fold.py)
        # cuDNN benchmarks every new input shape (compute_settings), about 4 s for Lite0 on an
        # H200, and each split's last batch would be one: on CUDA it is padded to a full batch
        self.pad_batches = device.type in PAD_DEVICES

    @torch.inference_mode()
    def __call__(self, chunk: torch.Tensor) -> np.ndarray:
        if self.bn_folded is None:  # checked once, in float64, on real images and noise
            self.model, self.bn_folded = fold_verified(self.model, self.prep(check_batch(chunk)))
        out = []
        lo = 0
        while lo < len(chunk):
            try:
                batch = chunk[lo:lo + self.batch_size]
                x = self.prep(pad_batch(batch, self.batch_size) if self.pad_batches else batch)
                # (B, H, W[, 3]) uint8 -> (B, 3, S, S) float32 on device
                with self.autocast:
                    feats = self.model.forward_head(self.model.forward_features(x),
                                                    pre_logits=True)  # (B, D)
                out.append(feats[:len(batch)].float())  # on the device: one copy back per chunk
                lo += len(batch)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or self.batch_size == 1:
                    raise
                self.batch_size //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                tqdm.write(f"out of memory: retrying with batch size {self.batch_size}")
        return torch.cat(out).cpu().numpy()


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
) -> ExtractResult:
    """Embed every split of (`dataset`, `size`) with `backbone` into one HDF5 feature store.

    Resolves the request (medfm.request.resolve_store_request; `precision` None: bfloat16
    autocast on CUDA, float32 elsewhere), then `extract_request`.
    """
    request = resolve_store_request(
        dataset=dataset, size=size, backbone=backbone, weights=weights, dtype=dtype,
        preprocess=PreprocessRequest(resize_policy, input_size, normalize), data_root=data_root,
        precision=precision, device=device)
    return extract_request(request, batch_size=batch_size, device=device, workdir=workdir,
                           force=force, progress=progress, chunk_rows=chunk_rows)


def extract_request(
    request: StoreRequest,
    *,
    batch_size: int | None = None,
    device: str | None = None,
    workdir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    chunk_rows: int | None = None,
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
    if path.exists() and not force:
        store = FeatureStore(path)  # a corrupt store is reported here, by name
        return ExtractResult(path, "exists", store.summary(), 0.0)
    # one writer per store: a second extraction of this request waits here, then finds it built
    with store_lock(path, label=f"{request.dataset.label} {request.backbone.id}"):
        if path.exists() and not force:
            return ExtractResult(path, "exists", FeatureStore(path).summary(), 0.0)
        return _build(request, path, dev, batch_size=batch_size, force=force,
                      progress=progress, chunk_rows=chunk_rows)


def _build(request: StoreRequest, path: Path, dev: torch.device, *, batch_size: int | None,
           force: bool, progress: bool, chunk_rows: int | None) -> ExtractResult:
    """Embed every split into the store at `path` (resuming its partial file), under its lock."""
    bb = create_backbone(request.backbone)
    resolved = request.backbone.data_config()  # what the request was resolved against
    if bb.data_config["input_size"] != resolved["input_size"] or (
            tuple(bb.data_config["mean"]) != resolved["mean"]):
        raise RuntimeError(f"{request.backbone.id}: the created model's data config "
                           f"{bb.data_config} differs from the resolved one; a medfm bug")
    splits = {s: load_split(request.dataset.name, request.dataset.size, s,
                            request.dataset.path.parent) for s in SPLITS}
    labels = {s: np.asarray(y) for s, (_, y) in splits.items()}
    embed = _Embedder(bb, DevicePreprocessor(request.preprocess, dev), dev,
                      batch_size or DEFAULT_BATCH_SIZE[dev.type], request.precision)
    with disk_full_is_one_line(path):
        writer = StoreWriter(path, request.identity(), dim=bb.feature_dim, labels=labels,
                             attrs=_provenance(request, bb), restart=force)
        try:
            with compute_settings(dev, request.precision):
                computed, elapsed, wall = _embed_splits(writer, splits, embed, chunk_rows,
                                                        progress,
                                                        f"{request.dataset.label} {bb.arch}")
        except BaseException:
            writer.close()  # the partial file stays, ready to resume
            raise
        writer.finalize({
            "device": device_name(dev),
            "batch_size": embed.batch_size,
            "bn_folded": int(embed.bn_folded or 0),
            "elapsed_s_json": json.dumps(elapsed),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
        })
    store = FeatureStore(path)
    status = "resumed" if writer.resumed else "built"
    return ExtractResult(path, status, store.summary(), computed / wall if wall > 0 else 0.0)


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
                  progress: bool, desc: str) -> tuple[int, dict, float]:
    """Embed every split's remaining rows into `writer`; (rows computed, seconds per split,
    wall seconds)."""
    rows_per_chunk = chunk_rows or embed.batch_size * CHUNK_BATCHES
    total = sum(len(images) for images, _ in splits.values())
    already = sum(writer.rows_done(s) for s in splits)
    elapsed = {}
    t0 = time.perf_counter()
    with tqdm(total=total, initial=already, unit="img", disable=not progress, desc=desc,
              dynamic_ncols=True) as bar:
        for split in splits:
            ts = time.perf_counter()
            bar.set_postfix_str(split)
            for lo, chunk in _chunks(splits[split][0], writer.rows_done(split), rows_per_chunk,
                                     embed.device):
                writer.write(split, lo, embed(chunk))
                bar.update(len(chunk))
            elapsed[split] = round(time.perf_counter() - ts, 3)
    return total - already, elapsed, time.perf_counter() - t0


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
        from medfm.corrupt import corrupt

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
    """Embed the request's test split under MedMNIST-C corruptions (medfm.corrupt) into a
    sibling of its store (medfm.store.corrupted), building the store first if needed.

    `corruptions`: "medmnist-c" / None (every corruption defined for the dataset) or names;
    `severities` 1..5; `seed` makes the corrupted images reproducible; `base` lends an imported
    dataset a MedMNIST dataset's corruption set. A corruption that cannot be applied at the
    store's size is skipped and named in the result.
    """
    from medfm.corrupt import NotApplicable, corrupt, package_version, resolve_corruptions
    from medfm.store.corrupted import corrupted_identity, corrupted_path, group_name

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
        from medfm.store.corrupted import CorruptedStore

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
            from medfm.store.corrupted import CorruptedStore

            done = CorruptedStore(path)
            return CorruptedResult(path, "exists", done.pairs, done.skipped)
        bb = create_backbone(request.backbone)
        dev = resolve_device(device)
        groups = {group_name(c, s): (_CorruptedImages(images, dataset, c, s, seed, base),
                                     np.asarray(labels)) for c, s in pairs}
        embed = _Embedder(bb, DevicePreprocessor(request.preprocess, dev), dev,
                          batch_size or DEFAULT_BATCH_SIZE[dev.type], request.precision)
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
