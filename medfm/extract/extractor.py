"""Batched frozen inference from MedMNIST npz files into HDF5 feature stores.

    from medfm.extract import extract
    extract(dataset="breastmnist", backbone="tf_efficientnet_lite0.in1k", size=28)

    medfm extract --dataset breastmnist --backbone tf_efficientnet_lite0.in1k --size 28

For each split, a loader thread slices uint8 chunks out of the (possibly memory-mapped) images
while the main thread preprocesses them on the device (preprocess.py), runs the backbone (eval,
inference mode, channels_last, BatchNorm folded into the convs, bf16 autocast on CUDA) and writes
pooled pre-logits chunk by chunk.
Out-of-memory halves the batch and retries. A finished store makes a rerun a no-op; a killed
one resumes from its last complete chunk.
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

from medfm import __version__
from medfm.backbones import Backbone, create_backbone
from medfm.data import SPLITS, data_file, file_md5, get_dataset, load_split
from medfm.errors import InvalidArgumentError, StoreError
from medfm.extract.fold import fold_verified
from medfm.preprocess import DevicePreprocessor, check_resize_policy, resolve_preprocess
from medfm.store.features import (
    FEATURE_KIND,
    STORE_DTYPES,
    FeatureStore,
    StoreKey,
    StoreWriter,
    stores_dir,
)

DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 32}  # images per forward pass, per device type
CHUNK_BATCHES = 8  # batches per stored chunk: the unit of resumption
PREFETCH_CHUNKS = 2  # uint8 chunks the loader thread keeps ready ahead of the model
FOLD_CHECK = 8  # images of the first chunk that check the BatchNorm-folded model


@dataclass(frozen=True)
class ExtractResult:
    """What one extraction did: built a store, resumed one, or found it already done."""

    path: Path  # the finished .h5 store
    status: str  # "built", "resumed" or "exists"
    summary: dict  # FeatureStore.summary()
    images_per_s: float  # end-to-end rate of this call (0 when nothing was computed)


def resolve_device(device: str | None) -> torch.device:
    """`device` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"device {device!r} is not valid; use cpu or cuda.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda asked for, but no CUDA GPU is visible; "
                                   "use --device cpu.")
    return dev


def request_json(dataset: str, size: int, backbone: str, weights: str | None,
                  resize_policy: str | None, input_size: int | None, dtype: str) -> str:
    """What the user asked for, before loading anything: finds a finished store with no model."""
    weights_id = weights
    if weights and weights not in ("random", "none") and Path(weights).exists():
        stat = Path(weights).stat()
        weights_id = f"{Path(weights).resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return json.dumps({"dataset": dataset, "size": size, "backbone": backbone,
                       "weights": weights_id, "resize_policy": resize_policy,
                       "input_size": input_size, "dtype": dtype}, sort_keys=True)


def find_extracted(workdir: str | os.PathLike | None, request: str) -> FeatureStore | None:
    """The finished store built for `request` (see `request_json`), without loading a model."""
    for path in sorted(stores_dir(workdir).glob("*.h5")):
        try:
            store = FeatureStore(path)
        except StoreError:
            continue  # a corrupt store is reported when its own key is asked for
        if store.attrs.get("request_json") == request:
            return store
    return None


def _chunks(images: np.ndarray, start: int, chunk_rows: int, pin: bool):
    """Yield (start, uint8 tensor) chunks from a background thread, PREFETCH_CHUNKS ahead."""
    q: queue.Queue = queue.Queue(maxsize=PREFETCH_CHUNKS)
    stop = threading.Event()

    def load():
        try:
            for lo in range(start, len(images), chunk_rows):
                if stop.is_set():
                    return
                chunk = torch.from_numpy(np.ascontiguousarray(images[lo:lo + chunk_rows]))
                q.put((lo, chunk.pin_memory() if pin else chunk))
            q.put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=load, daemon=True, name="medfm-loader")
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
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


class _Embedder:
    """Frozen backbone + device preprocessing; embeds uint8 chunks, halving the batch on OOM."""

    def __init__(self, backbone: Backbone, prep: DevicePreprocessor, device: torch.device,
                 batch_size: int):
        self.device = device
        self.prep = prep
        self.batch_size = batch_size
        self.model = backbone.model.to(device, memory_format=torch.channels_last).eval()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())
        self.bn_folded: int | None = None  # set on the first chunk (see fold.py)

    @torch.inference_mode()
    def __call__(self, chunk: torch.Tensor) -> np.ndarray:
        if self.bn_folded is None:  # checked on real images, so a wrong fold is never kept
            self.model, self.bn_folded = fold_verified(self.model, self.prep(chunk[:FOLD_CHECK]))
        out = []
        lo = 0
        while lo < len(chunk):
            try:
                batch = chunk[lo:lo + self.batch_size]
                with self.autocast:
                    x = self.prep(batch)  # (B, H, W[, 3]) uint8 -> (B, 3, S, S) float on device
                    feats = self.model.forward_head(self.model.forward_features(x),
                                                    pre_logits=True)  # (B, D)
                out.append(feats.float().cpu().numpy())
                lo += len(batch)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or self.batch_size == 1:
                    raise
                self.batch_size //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                tqdm.write(f"out of memory: retrying with batch size {self.batch_size}")
        return np.concatenate(out)


def extract(
    *,
    dataset: str,
    backbone: str,
    size: int,
    resize_policy: str | None = None,
    input_size: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str = "float16",
    weights: str | None = None,
    workdir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    chunk_rows: int | None = None,
) -> ExtractResult:
    """Embed every split of (`dataset`, `size`) with `backbone` into one HDF5 feature store.

    A finished store for the same request is reused without loading the model (`force=True`
    rebuilds it); a partial one from a killed run resumes from its last complete chunk.
    """
    info = get_dataset(dataset)
    if dtype not in STORE_DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}.")
    if resize_policy is not None:
        check_resize_policy(resize_policy)
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"batch size {batch_size} must be at least 1.")
    dev = resolve_device(device)
    npz_path = data_file(info.flag, size, data_root)  # clear error before any model loads
    request = request_json(info.flag, int(size), backbone, weights, resize_policy, input_size,
                            dtype)
    if not force and (done := find_extracted(workdir, request)) is not None:
        return ExtractResult(done.path, "exists", done.summary(), 0.0)

    bb = create_backbone(backbone, weights=weights)
    cfg = resolve_preprocess(bb.data_config, input_size=input_size,
                             resize_policy=resize_policy, source_size=int(size))
    key = StoreKey(dataset=info.flag, size=int(size), arch=bb.arch, tag=bb.tag,
                   weights_digest=bb.weights_digest, resize_policy=cfg.resize_policy,
                   input_size=cfg.input_size, feature_kind=FEATURE_KIND, dtype=dtype)
    path = stores_dir(workdir) / key.filename()
    if path.exists() and not force:
        store = FeatureStore(path)  # same content asked for under another name
        return ExtractResult(path, "exists", store.summary(), 0.0)

    splits = {s: load_split(info.flag, size, s, data_root) for s in SPLITS}
    labels = {s: np.asarray(y) for s, (_, y) in splits.items()}
    attrs = {
        "request_json": request,
        "backbone_name": backbone,
        "arch": bb.arch,
        "tag": bb.tag,
        "weights": bb.weights,
        "weights_digest": bb.weights_digest,
        "preprocess_json": cfg.to_json(),
        "data_config_json": json.dumps(bb.data_config, sort_keys=True, default=str),
        "dataset": info.flag,
        "task": info.task.value,
        "label_names_json": json.dumps(info.label_names),
        "size": int(size),
        "data_file": npz_path.name,
        "data_md5": file_md5(npz_path),
        "data_md5_official": info.md5(int(size)),
        "versions_json": json.dumps(_versions(), sort_keys=True),
    }
    writer = StoreWriter(path, key, dim=bb.feature_dim, labels=labels, attrs=attrs,
                         restart=force)
    batch = batch_size or DEFAULT_BATCH_SIZE[dev.type]
    embed = _Embedder(bb, DevicePreprocessor(cfg, dev), dev, batch)
    rows_per_chunk = chunk_rows or batch * CHUNK_BATCHES
    total = sum(len(y) for y in labels.values())
    already = sum(writer.rows_done(s) for s in SPLITS)
    elapsed = {}
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=already, unit="img", disable=not progress,
               desc=f"{info.flag}@{size} {bb.arch}", dynamic_ncols=True)
    try:
        for split in SPLITS:
            images = splits[split][0]
            ts = time.perf_counter()
            bar.set_postfix_str(split)
            start = writer.rows_done(split)
            for lo, chunk in _chunks(images, start, rows_per_chunk, pin=dev.type == "cuda"):
                writer.write(split, lo, embed(chunk))
                bar.update(len(chunk))
            elapsed[split] = round(time.perf_counter() - ts, 3)
    except BaseException:
        writer.close()
        bar.close()
        raise
    bar.close()
    wall = time.perf_counter() - t0
    computed = total - already
    writer.finalize({
        "device": _device_name(dev),
        "batch_size": embed.batch_size,
        "bn_folded": int(embed.bn_folded or 0),
        "elapsed_s_json": json.dumps(elapsed),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    })
    store = FeatureStore(path)
    status = "resumed" if writer.resumed else "built"
    return ExtractResult(path, status, store.summary(), computed / wall if wall > 0 else 0.0)


def extract_many(*, datasets: list[str], backbones: list[str], sizes: list[int],
                 **kwargs) -> list[ExtractResult]:
    """`extract` for every (dataset, backbone, size), datasets outermost."""
    return [extract(dataset=d, backbone=b, size=s, **kwargs)
            for d in datasets for s in sizes for b in backbones]


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _versions() -> dict:
    import h5py
    import timm

    return {"medfm": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
