"""The GPU figures of benchmarks/gpu_check.sh, one stage per call, each appended to a Markdown
report as table rows.

    python benchmarks/gpu_bench.py extract  --report R.md [--images 16384]
    python benchmarks/gpu_bench.py profile  --report R.md
    python benchmarks/gpu_bench.py compile  --report R.md
    python benchmarks/gpu_bench.py busy     --report R.md --data-root DIR
    python benchmarks/gpu_bench.py oom      --report R.md
    python benchmarks/gpu_bench.py finetune --report R.md

extract: for ViT-B/16 (vit_base_patch16_224), ResNet-50 and ConvNeXt-B, random weights,
  (a) model only: pooled pre-logits of ready (B, 3, 224, 224) tensors on the device, as medfm runs
      the model (channels_last, BatchNorm folded, bf16 autocast), after warm-up;
  (b) medfm end to end: `extract` of a synthetic 224 px RGB set (`--images` rows, PathMNIST
      layout, uncompressed npz), from the npz to a finished store, in a process already warmed up
      by an extraction of WARMUP_IMAGES such images with the same model (CUDA context, cuDNN's
      kernel choice for these shapes);
  images/s, (b)/(a), and the peak GPU memory of each.
profile: where an end-to-end extraction's time goes (ViT-B/16, PROFILE_IMAGES images, after a
  warm-up extraction with the model kept loaded): torch.profiler's top operators by their own
  device time (CPU time on a CPU), the calls that make the host wait (synchronizations, pinned
  allocations) and copies, and the GPU-busy share (kernel time / wall).
compile: each model eager vs torch.compile-d, side by side: (a) model only, (b) end to end
  (a warm extraction, the model kept loaded), and the compilation's warm-up seconds.
busy: small stores (the real 28/64 px files of --data-root) through every model at 224 px,
  one after another in one process, (i) a fresh model per store (as before issue 28) and
  (ii) the model kept loaded, then (iii) the grid of the same stores on the local executor
  (one and two jobs per GPU): wall time and GPU-busy share (nvidia-smi's utilization sampled
  every BUSY_SAMPLE_MS over the run).
oom: a ViT-B extraction of OOM_IMAGES such images asked for a batch that does not fit (the
  process may use OOM_GIB of the GPU), so it halves the batch until it fits; its features
  against a run at a batch that fits.
finetune: the same fine-tune (resnet18, real BreastMNIST, seed 0, recipe FINETUNE_RECIPE for 3
  epochs) run twice deterministic and twice not; are the test scores bit-identical?
--smoke runs every stage small, on the CPU too (to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medfm.backbones import create_backbone
from medfm.data import SPLITS, get_dataset
from medfm.extract import extract
from medfm.grid.estimate import actual_seconds
from medfm.extract.fold import fold_batchnorm
from medfm.store.features import FeatureStore
from medfm.synthetic import synthetic_arrays

MODELS = ("vit_base_patch16_224", "resnet50", "convnext_base")  # issue 28's three
SMOKE_MODELS = ("test_vit", "test_resnet", "test_convnext")  # --smoke: the same families, tiny
SIZE = 224  # the synthetic set's source size
BATCH = 256  # medfm's default CUDA batch
TIMED_BATCHES = 20  # model-only batches timed after WARMUP_BATCHES
WARMUP_BATCHES = 3
BASE_IMAGES = 512  # distinct synthetic images, tiled up to --images
WARMUP_IMAGES = 1024  # the warm-up extraction's set
OOM_IMAGES = 4096  # the oom stage's set
OOM_GIB = 3.0  # GPU memory the oom stage may use
OOM_BATCH = 2048  # the batch it asks for (ViT-B at 224 px needs far more than OOM_GIB)
FIT_BATCH = 64  # the batch its reference run uses
FINETUNE_RECIPE = "medfm-v1"  # epochs of batch 64: a short run whose length --epochs fixes
PROFILE_IMAGES = 4096  # the profiled extraction's set
PROFILE_ROWS = 12  # operators listed
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaHostAlloc", "cudaMallocHost", "cudaMemcpyAsync", "Memcpy HtoD", "Memcpy DtoH",
              "aten::item", "aten::_local_scalar_dense")  # counted by the profile stage
BUSY_SAMPLE_MS = 100  # nvidia-smi's utilization sampling period in the busy stage
BUSY_INPUT = 224  # model input of the busy stage's small stores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


class Report:
    """Appends lines to the Markdown report as they come (a stage cut short keeps its rows)."""

    def __init__(self, path: str):
        self.path = path

    def add(self, *lines: str) -> None:
        print(*lines, sep="\n", flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(f"{line}\n" for line in lines))


def write_large_set(root: Path, rows: int) -> Path:
    """A PathMNIST-layout 224 px RGB npz of `rows` images (4/5 train, 1/10 val, 1/10 test),
    tiled from BASE_IMAGES synthetic ones and stored uncompressed."""
    base, labels = synthetic_arrays("pathmnist", SIZE, min(BASE_IMAGES, rows))
    counts = (rows - 2 * (rows // 10), rows // 10, rows // 10)
    arrays = {}
    for split, n in zip(SPLITS, counts, strict=True):
        take = np.arange(n) % len(base)
        arrays[f"{split}_images"] = base[take]
        arrays[f"{split}_labels"] = labels[take]
    root.mkdir(parents=True, exist_ok=True)
    path = root / get_dataset("pathmnist").filename(SIZE)
    np.savez(path, **arrays)
    return path


def model_only(name: str, device: torch.device, batch: int, batches: int,
               compile: bool = False) -> tuple[float, float, float]:
    """(images/s, peak GiB, warm-up seconds) of the model alone on ready tensors at its input
    size, as medfm runs it (`compile`: torch.compile-d; the warm-up holds its compilation)."""
    bb = create_backbone(name, weights="random")
    model = bb.model.eval()
    fold_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)

    def pooled(x):
        return model.forward_head(model.forward_features(x), pre_logits=True)

    forward = torch.compile(pooled, dynamic=False) if compile else pooled
    side = bb.data_config["input_size"][-1]
    x = torch.randn(batch, 3, side, side, device=device).contiguous(
        memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        t0 = time.perf_counter()
        for _ in range(WARMUP_BATCHES):
            forward(x)
        _sync(device)
        warmup = time.perf_counter() - t0
        _reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            forward(x).float()
        _sync(device)
        seconds = time.perf_counter() - t0
    return batches * batch / seconds, _peak_gib(device), warmup


def stage_extract(args, device: torch.device, report: Report) -> None:
    work = Path(args.workdir)
    started = time.perf_counter()
    write_large_set(work / "data", args.images)
    write_large_set(work / "warm-data", args.warmup_images)
    print(f"synthetic {args.images} x {SIZE} px set written in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    report.add("", f"### Extraction, {args.images} synthetic {SIZE} px RGB images, batch "
               f"{args.batch} ({device_label(device)})", "",
               "| model | (a) model only img/s | peak GiB | (b) end to end img/s | peak GiB | "
               "(b)/(a) | store |", "|---|---|---|---|---|---|---|")
    for name in args.models:
        a, a_peak, _ = model_only(name, device, args.batch, args.timed_batches)
        common = dict(dataset="pathmnist", size=SIZE, backbone=name, weights="random",
                      device=str(device), batch_size=args.batch, progress=False, force=True)
        extract(data_root=work / "warm-data", workdir=work / "warm", **common)  # warm-up
        _reset_peak(device)
        result = extract(data_root=work / "data", workdir=work / "stores", **common)
        b_peak = _peak_gib(device)
        store = FeatureStore(result.path)
        line = (f"| {name} | {a:,.0f} | {a_peak:.1f} | {result.images_per_s:,.0f} | "
                f"{b_peak:.1f} | {result.images_per_s / a:.2f} | {store.summary()['rows']} rows, "
                f"{store.request.get('precision', 'float32')}, bn_folded "
                f"{store.attrs['bn_folded']} |")
        report.add(line)


def _profiled_time(event, device: torch.device) -> float:
    """An averaged profiler event's own time in microseconds on the device (CPU: on the host)."""
    if device.type != "cuda":
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or event.self_cuda_time_total


def stage_profile(args, device: torch.device, report: Report) -> None:
    from torch.profiler import ProfilerActivity, profile

    work = Path(args.workdir)
    write_large_set(work / "data", args.profile_images)
    name = args.models[0]
    common = dict(dataset="pathmnist", size=SIZE, backbone=name, weights="random",
                  data_root=work / "data", device=str(device), batch_size=args.batch,
                  progress=False, force=True)
    extract(workdir=work / "warm", **common)  # model loaded, folded and tuned; it stays loaded
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        result = extract(workdir=work / "profiled", **common)
    wall_us = (time.perf_counter() - started) * 1e6
    events = prof.key_averages()
    kernels = sum(_profiled_time(e, device) for e in events) if device.type == "cuda" else 0.0
    report.add("", f"### Profile: end-to-end extraction, {name}, {args.profile_images} synthetic "
               f"{SIZE} px images, batch {args.batch} ({device_label(device)})", "",
               f"{result.images_per_s:,.0f} img/s under the profiler; wall "
               f"{wall_us / 1e6:.2f} s; device busy (own kernel time / wall) "
               f"{100 * kernels / wall_us:.0f}%" if device.type == "cuda" else
               f"{result.images_per_s:,.0f} img/s under the profiler (CPU: no device time)", "",
               "| operator | calls | own time ms | share of wall |", "|---|---|---|---|")
    top = sorted(events, key=lambda e: _profiled_time(e, device), reverse=True)[:PROFILE_ROWS]
    for e in top:
        own = _profiled_time(e, device)
        report.add(f"| {e.key[:60]} | {e.count} | {own / 1e3:,.1f} | {100 * own / wall_us:.1f}% |")
    report.add("", "| host wait or copy | calls | host time ms |", "|---|---|---|")
    for e in events:
        if e.key in HOST_WAITS:
            report.add(f"| {e.key} | {e.count} | {e.cpu_time_total / 1e3:,.1f} |")


def stage_compile(args, device: torch.device, report: Report) -> None:
    work = Path(args.workdir)
    write_large_set(work / "data", args.images)
    report.add("", f"### Eager vs torch.compile, {args.images} synthetic {SIZE} px images, batch "
               f"{args.batch} ({device_label(device)})", "",
               "| model | (a) model only eager / compiled img/s | compile warm-up s | "
               "(b) end to end eager / compiled img/s | extraction warm-up s | (b)/(a) eager / "
               "compiled |", "|---|---|---|---|---|---|")
    from medfm.extract import release_models

    for name in args.compile_models:
        a_eager, _, _ = model_only(name, device, args.batch, args.timed_batches)
        a_comp, _, a_warm = model_only(name, device, args.batch, args.timed_batches,
                                       compile=True)
        rates, warm = {}, 0.0
        for compiled in (False, True):
            common = dict(dataset="pathmnist", size=SIZE, backbone=name, weights="random",
                          data_root=work / "data", device=str(device), batch_size=args.batch,
                          progress=False, force=True, compile=compiled)
            first = extract(workdir=work / f"warm-{compiled}", **common)  # compiles; kept
            if compiled:
                warm = float(FeatureStore(first.path).attrs["compile_warmup_s"])
            rates[compiled] = extract(workdir=work / f"timed-{compiled}", **common).images_per_s
        release_models()
        report.add(f"| {name} | {a_eager:,.0f} / {a_comp:,.0f} ({a_comp / a_eager:.2f}x) | "
                   f"{a_warm:.1f} | {rates[False]:,.0f} / {rates[True]:,.0f} "
                   f"({rates[True] / rates[False]:.2f}x) | {warm:.1f} | "
                   f"{rates[False] / a_eager:.2f} / {rates[True] / a_comp:.2f} |")


class BusySampler:
    """GPU utilization (nvidia-smi, % of time a kernel ran) sampled every BUSY_SAMPLE_MS from
    start to stop; `stop()` gives the mean, or None where nvidia-smi is absent (a CPU)."""

    def __init__(self):
        import shutil
        import subprocess
        import threading

        self.samples: list[float] = []
        self.proc = None
        if shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             "-lms", str(BUSY_SAMPLE_MS), "-i", "0"], stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        return sum(self.samples) / len(self.samples) if self.samples else None


def _busy_cell(share: float | None) -> str:
    return "n/a (no nvidia-smi)" if share is None else f"{share:.0f}%"


def stage_busy(args, device: torch.device, report: Report) -> None:
    from medfm.data import resolve_datasets
    from medfm.extract import release_models
    from medfm.grid import run_grid, spec_from_dict
    from medfm.grid.executors.local import LocalExecutor

    refs, _ = resolve_datasets(args.busy_datasets, (28, 64), args.data_root)
    stores = [(ref.name, ref.size) for ref in refs]
    images = sum(sum(get_dataset(n).n_samples.values()) for n, _ in stores)
    report.add("", f"### Small stores: {len(stores)} real files "
               f"({', '.join(f'{n}@{s}' for n, s in stores)}; {images:,} images) x "
               f"{len(args.busy_models)} model(s) at {args.busy_input} px "
               f"({device_label(device)})", "",
               "| how | stores | wall s | GPU busy |", "|---|---|---|---|")
    work = Path(args.workdir)
    for keep in (False, True):
        release_models()
        sampler, started = BusySampler(), time.perf_counter()
        for name in args.busy_models:
            for flag, size in stores:
                extract(dataset=flag, size=size, backbone=name, weights="random",
                        input_size=args.busy_input, data_root=args.data_root,
                        device=str(device),
                        workdir=work / f"serial-{keep}", progress=False, force=True)
                if not keep:
                    release_models()
        wall, share = time.perf_counter() - started, sampler.stop()
        how = "one process, model kept loaded" if keep else "one process, fresh model per store"
        report.add(f"| {how} | {len(stores) * len(args.busy_models)} | {wall:.1f} | "
                   f"{_busy_cell(share)} |")
    release_models()
    for jobs_per_gpu in (1, 2):
        spec = spec_from_dict({
            "datasets": args.busy_datasets, "sizes": [28, 64],
            "backbones": list(args.busy_models),
            "weights": "random", "input_size": args.busy_input, "fractions": [1.0], "seeds": [0],
            "methods": ["logreg"], "data_root": str(args.data_root)})
        executor = LocalExecutor(jobs_per_gpu=jobs_per_gpu)
        try:
            sampler, started = BusySampler(), time.perf_counter()
            result = run_grid(spec, workdir=work / f"grid-{jobs_per_gpu}", executor=executor,
                              progress=False)
            wall, share = time.perf_counter() - started, sampler.stop()
        finally:
            executor.close()
        report.add(f"| grid, local executor, {jobs_per_gpu} job(s) per GPU (extract + logreg; "
                   f"{len(result.failed)} failed) | {len(stores) * len(args.busy_models)} | "
                   f"{wall:.1f} | {_busy_cell(share)} |")
        if result.estimate is not None:
            report.add(f"| ({result.estimate.versus(actual_seconds(result.outcomes))}) | | | |")


def stage_oom(args, device: torch.device, report: Report) -> None:
    work = Path(args.workdir)
    write_large_set(work / "data", args.oom_images)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.set_per_process_memory_fraction(min(1.0, OOM_GIB * 2**30 / total), index)
    common = dict(dataset="pathmnist", size=SIZE, backbone=args.models[0], weights="random",
                  data_root=work / "data", device=str(device), progress=False, force=True)
    started = time.perf_counter()
    halved = extract(workdir=work / "oom", batch_size=args.oom_batch, **common)
    seconds = time.perf_counter() - started
    reference = extract(workdir=work / "fits", batch_size=FIT_BATCH, **common)
    a, b = FeatureStore(halved.path), FeatureStore(reference.path)
    gap = max(float(np.abs(a.features(s) - b.features(s)).max()) for s in SPLITS)
    scale = max(float(np.abs(b.features(s)).max()) for s in SPLITS)
    report.add("", "### Out of memory", "", "| what | outcome | check |", "|---|---|---|",
               f"| {args.models[0]}, {args.oom_images} images, batch {args.oom_batch} asked "
               f"within {OOM_GIB:g} GiB | finished at batch {a.attrs['batch_size']} in "
               f"{seconds:.1f} s | max abs difference from a batch-{FIT_BATCH} run {gap:.3g} "
               f"(features up to {scale:.3g}) |")


def stage_finetune(args, device: torch.device, report: Report) -> None:
    from medfm.finetune import finetune_job
    from medfm.resolve.finetune import resolve_finetune
    from medfm.resolve.recipes import resolve_recipe
    from medfm.sampling import SubsetSpec

    recipe = resolve_recipe(FINETUNE_RECIPE, epochs=args.epochs, batch_size=64,
                            resize_policy="native")
    request = resolve_finetune(dataset="breastmnist", size=28, backbone=args.finetune_backbone,
                               weights="random", spec=SubsetSpec(fraction=args.fraction, seed=0),
                               recipe=recipe, data_root=args.data_root)
    report.add("", f"### Fine-tune determinism: {args.finetune_backbone}, BreastMNIST 28 px "
               f"(fraction {args.fraction:g}), {args.epochs} epoch(s), seed 0, twice each "
               f"({device_label(device)})", "",
               "| mode | runs bit-identical | max abs score difference | test ACC / AUC | "
               "s per run |", "|---|---|---|---|---|")
    for deterministic in (True, False):
        scores, rows, seconds = [], [], []
        for run in range(2):
            started = time.perf_counter()
            workdir = Path(args.workdir) / f"finetune-{deterministic}-{run}"
            row, s, _ = finetune_job(request, device=str(device), workdir=workdir,
                                     progress=False, deterministic=deterministic)
            seconds.append(time.perf_counter() - started)
            scores.append(s)
            rows.append(row)
        same = bool(np.array_equal(scores[0], scores[1]))
        line = (f"| {'deterministic' if deterministic else 'default'} | {same} | "
                f"{float(np.abs(scores[0] - scores[1]).max()):.3g} | "
                f"{100 * rows[0].acc:.1f} / {100 * rows[0].auc:.1f} | "
                f"{np.mean(seconds):.1f} |")
        report.add(line)


def device_label(device: torch.device) -> str:
    from medfm.runtime import device_name

    return device_name(device)


STAGES = {"extract": stage_extract, "profile": stage_profile, "compile": stage_compile,
          "busy": stage_busy, "oom": stage_oom, "finetune": stage_finetune}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--report", required=True, help="Markdown file the rows are appended to")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-gpu"))
    parser.add_argument("--data-root", default=os.environ.get("MEDFM_DATA_ROOT"),
                        help="where breastmnist.npz is (the finetune stage)")
    parser.add_argument("--images", type=int, default=16384, help="rows of the 224 px set")
    parser.add_argument("--smoke", action="store_true", help="every stage small (any device)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch, args.timed_batches = BATCH, TIMED_BATCHES
    args.oom_batch, args.epochs, args.models = OOM_BATCH, 3, MODELS
    args.warmup_images, args.oom_images = WARMUP_IMAGES, OOM_IMAGES
    args.finetune_backbone, args.fraction = "resnet18", 1.0
    args.profile_images, args.compile_models = PROFILE_IMAGES, MODELS
    args.busy_datasets, args.busy_input = None, BUSY_INPUT  # None: every file present
    args.busy_models = MODELS
    if args.smoke:
        args.images, args.batch, args.timed_batches = 64, 8, 2
        args.oom_batch, args.epochs, args.models = 16, 1, SMOKE_MODELS
        args.warmup_images, args.oom_images = 16, 32
        args.finetune_backbone, args.fraction = "test_resnet", 0.1
        args.profile_images, args.compile_models = 64, SMOKE_MODELS[1:2]  # one compile: CPU
        args.busy_datasets, args.busy_input = ["breastmnist"], 32
        args.busy_models = SMOKE_MODELS[1:2]
    STAGES[args.stage](args, device, Report(args.report))


if __name__ == "__main__":
    main()
