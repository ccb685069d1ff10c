"""The throughput table: how fast a stage runs a backbone at an input size on a device.

    from medfm.throughput import lookup_throughput
    figure = lookup_throughput("extract", "resnet50", 224, "NVIDIA H200", "bfloat16")
    figure.seconds(10_000), figure.source          # (overhead + 10k images) and where from

Three sources, in this order (`lookup_throughput`):
1. **measured**: every extraction and fine-tune records what it measured (images/s of its
   compute, seconds of its fixed costs) under `$MEDFM_CACHE/throughput/`, one small JSON file
   per (stage, architecture, input size, device name, precision, compiled) holding its last
   MAX_POINTS measurements; the figure is their total images over their total seconds (so a
   large job weighs more than a small one) and their median fixed seconds. The grid driver
   records its probe jobs (seconds against feature values touched; the figure is the line
   through them).
2. **shipped**: SHIPPED, the figures of docs/benchmarks.md (the H200 run, cpu-2c).
3. **scaled**: a figure of the same stage on the same device (measured first, else shipped)
   for the architecture and input size nearest in forward FLOPs, times the ratio of FLOPs
   (`forward_flops`: counted once per architecture and size on the meta device, no weights,
   and cached). A device with no figure at all borrows those of a device of the same kind
   (any GPU: the H200's), and says so.
Every figure says which source it came from, so a cost estimate can say what it rests on.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace

from medfm.cache import cache_dir, read_json, write_atomic

THROUGHPUT_DIR = "throughput"  # under $MEDFM_CACHE: measured figures
FLOPS_DIR = "flops"  # under $MEDFM_CACHE: forward FLOPs and feature width per (arch, size)
MAX_POINTS = 32  # measurements kept per configuration (probe: per method and device)
CPU_2C = "cpu (2 cores, x86_64)"  # the development machine's name (medfm.runtime.device_name)
H200 = "NVIDIA H200"
TRAIN_FLOPS_FACTOR = 3.0  # a training step ~ 3 forward passes (forward + 2x backward)


@dataclass(frozen=True)
class Measurement:
    """One figure of the table: a stage's compute rate and fixed cost for one configuration."""

    stage: str  # "extract", "probe" or "finetune" (a grid job's kind)
    arch: str  # timm architecture ("resnet50"); for the probe, its method ("logreg")
    input_size: int  # model input side in pixels (0 for the probe)
    device: str  # medfm.runtime.device_name: "NVIDIA H200", "cpu (2 cores, x86_64)"
    precision: str  # "float32" or "bfloat16"
    compiled: bool  # torch.compile-d
    rate: float  # images/s of compute (probe: feature values/s)
    overhead_s: float = 0.0  # fixed seconds per job (model load, fold, compile, setup)
    eval_rate: float = 0.0  # fine-tune: images/s of validation and test passes (0: unknown)
    source: str = "measured"  # "measured", "shipped (...)" or "scaled from ..."
    units: float = 0.0  # measured: images (probe: values) behind `rate`, its weight
    eval_units: float = 0.0  # measured: images behind `eval_rate`

    def key(self) -> str:
        return "|".join(map(str, (self.stage, self.arch, self.input_size, self.device,
                                  self.precision, self.compiled)))

    @property
    def kind(self) -> str:
        """"measured", "shipped" or "scaled": what the figure rests on."""
        return self.source.split(" ")[0]

    def seconds(self, units: float, eval_units: float = 0.0) -> float:
        """Seconds of a job that computes `units` at `rate` and `eval_units` (fine-tune
        validation and test images) at `eval_rate` (a training step's third if unknown)."""
        eval_rate = self.eval_rate or self.rate * TRAIN_FLOPS_FACTOR
        return self.overhead_s + units / self.rate + eval_units / eval_rate


# figures of docs/benchmarks.md (end-to-end rates: what a job's compute costs there)
RUN_8 = "shipped (docs/benchmarks.md, cpu-2c estimate_bench run 8)"
SHIPPED = (
    Measurement("extract", "vit_base_patch16_224", 224, H200, "bfloat16", False, 5956.0, 6.0,
                source="shipped (docs/benchmarks.md, H200 2026-11-28)"),
    Measurement("extract", "resnet50", 224, H200, "bfloat16", False, 8720.0, 6.0,
                source="shipped (docs/benchmarks.md, H200 2026-11-28)"),
    Measurement("extract", "tf_efficientnet_lite0", 224, CPU_2C, "float32", False, 60.7, 2.0,
                source="shipped (docs/benchmarks.md, cpu-2c issue 9)"),
    Measurement("extract", "tf_efficientnet_lite0", 28, CPU_2C, "float32", False, 1165.9, 2.0,
                source="shipped (docs/benchmarks.md, cpu-2c issue 9)"),
    Measurement("finetune", "resnet18", 28, CPU_2C, "float32", False, 430.0, 5.0,
                source="shipped (docs/benchmarks.md, cpu-2c issue 13)"),
    Measurement("finetune", "resnet18", 64, CPU_2C, "float32", False, 140.0, 5.0,
                source="shipped (docs/benchmarks.md, cpu-2c issue 13)"),
    # estimate_bench run 8 (random weights, BreastMNIST-28/PneumoniaMNIST-28 at 64 px input)
    Measurement("extract", "tf_efficientnet_lite0", 64, CPU_2C, "float32", False, 976.0, 0.67,
                source=RUN_8),
    Measurement("extract", "resnet18", 64, CPU_2C, "float32", False, 445.0, 0.38,
                source=RUN_8),
    Measurement("finetune", "tf_efficientnet_lite0", 64, CPU_2C, "float32", False, 123.0, 0.08,
                eval_rate=710.0, source=RUN_8),
    Measurement("finetune", "resnet18", 64, CPU_2C, "float32", False, 108.0, 0.15,
                eval_rate=459.0, source=RUN_8),
    # probe (b) as one grid job (2.1e8 values in 17.4 s, 2026-12-07), plus the mean seconds of
    # estimate_bench's small probe jobs (0.07-2 s: per-row costs the rate does not describe)
    Measurement("probe", "logreg", 0, CPU_2C, "float32", False, 1.2e7, 0.5,
                source="shipped (docs/benchmarks.md, cpu-2c probe (b) 2026-12-07)"),
    Measurement("probe", "logreg", 0, H200, "float32", False, 1.8e7, 1.0,
                source="shipped (docs/benchmarks.md, H200 probe (b))"),
)


def _entry_path(key: str):
    return cache_dir(THROUGHPUT_DIR) / f"{hashlib.sha1(key.encode()).hexdigest()}.json"


def record_throughput(measurement: Measurement) -> None:
    """Add a measurement to its configuration's last MAX_POINTS; a cache that cannot be
    written costs the next estimate this measurement, never the job."""
    if not (measurement.rate > 0 and math.isfinite(measurement.rate)):
        return
    path = _entry_path(measurement.key())
    points = (read_json(path) or {}).get("measurements", [])[-(MAX_POINTS - 1):]
    points.append({**asdict(measurement), "source": "measured", "at": time.time()})
    try:
        write_atomic(path, json.dumps({"key": measurement.key(), "measurements": points}))
    except OSError:
        return


def _combined(points: list[Measurement]) -> Measurement:
    """One figure from a configuration's measurements: total units over total seconds (each
    weighted by its units; unweighted ones count as one unit), the median fixed seconds (one
    run's cold start or a loaded machine does not set every later estimate)."""
    def rate(values: list[tuple[float, float]]) -> float:
        weights = [(w or 1.0, r) for w, r in values if r > 0]
        return (sum(w for w, _ in weights) / sum(w / r for w, r in weights)) if weights else 0.0

    return replace(points[-1],
                   rate=rate([(p.units, p.rate) for p in points]),
                   eval_rate=rate([(p.eval_units, p.eval_rate) for p in points]),
                   overhead_s=statistics.median(p.overhead_s for p in points),
                   units=sum(p.units for p in points),
                   eval_units=sum(p.eval_units for p in points),
                   source=f"measured ({len(points)} run{'s' if len(points) > 1 else ''})")


def record_probe(method: str, device: str, units: float, seconds: float) -> None:
    """Add one probe job's (feature values touched, seconds) to its method's and device's
    points (the last PROBE_POINTS); the figure is the least-squares line through them."""
    key = Measurement("probe", method, 0, device, "float32", False, 1.0).key()
    path = _entry_path(f"{key}|points")
    points = (read_json(path) or {}).get("points", [])[-(MAX_POINTS - 1):]
    points.append([float(units), float(seconds)])
    try:
        write_atomic(path, json.dumps({"key": key, "points": points}))
    except OSError:
        return


def _probe_fit(points: list) -> tuple[float, float] | None:
    """(rate, overhead_s) of the line seconds = overhead + units / rate through `points`;
    one point (or a flat cloud) gives no overhead."""
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = slope / var if n > 1 and var else 0.0
    overhead = my - slope * mx
    if slope <= 0 or overhead < 0:  # not enough spread: all of it is rate
        return (mx / my if my > 0 else math.inf), 0.0
    return 1.0 / slope, overhead


def measured_figures() -> list[Measurement]:
    """Every measured figure in the cache (probe points reduced to their line)."""
    found = []
    names = {f.name for f in Measurement.__dataclass_fields__.values()}
    for path in sorted(cache_dir(THROUGHPUT_DIR).glob("*.json")):
        entry = read_json(path)
        if not isinstance(entry, dict):
            continue
        if "points" in entry:
            stage, method, _, device, *_ = entry["key"].split("|")
            fit = _probe_fit(entry["points"])
            if fit is not None:
                found.append(Measurement(stage, method, 0, device, "float32", False, fit[0],
                                         fit[1], source=f"measured ({len(entry['points'])} "
                                                        f"jobs)"))
            continue
        try:
            points = [Measurement(**{k: v for k, v in m.items() if k in names})
                      for m in entry.get("measurements", [])]
        except TypeError:
            continue
        if points:
            found.append(_combined(points))
    return found


def forward_flops(arch: str, input_size: int) -> tuple[float, int] | None:
    """(FLOPs of one image's pooled forward pass, feature width) of a timm architecture at
    `input_size`, counted on the meta device (no weights, no memory) and cached; None when
    timm cannot build it so."""
    path = cache_dir(FLOPS_DIR) / f"{arch}@{input_size}.json"
    cached = read_json(path)
    if isinstance(cached, dict):
        return (cached["flops"], cached["dim"]) if cached.get("flops") else None
    try:
        import timm
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
            x = torch.empty(1, 3, input_size, input_size)
            with FlopCounterMode(display=False) as counter:
                out = model.forward_head(model.forward_features(x), pre_logits=True)
        flops, dim = float(counter.get_total_flops()), int(out.shape[-1])
    except Exception:  # noqa: BLE001 - any model timm cannot build at this size: no figure
        flops, dim = 0.0, 0
    write_atomic(path, json.dumps({"flops": flops, "dim": dim}))
    return (flops, dim) if flops else None


def _device_kind(device: str) -> str:
    return "cpu" if device.startswith("cpu") else "cuda"


def lookup_throughput(stage: str, arch: str, input_size: int, device: str, precision: str,
                      compiled: bool = False,
                      measured: list[Measurement] | None = None) -> Measurement | None:
    """The figure for this configuration (module docstring: measured, shipped, scaled), or
    None when neither this device nor one of its kind has any figure of the stage.
    `measured` saves re-reading the cache when many figures are looked up."""
    measured = measured_figures() if measured is None else measured
    wanted = Measurement(stage, arch, input_size, device, precision, compiled, 1.0)
    for table in (measured, SHIPPED):
        for figure in table:
            if figure.key() == wanted.key():
                return figure
    if compiled:  # no compiled figure: the eager one (compilation never slows a model down)
        eager = lookup_throughput(stage, arch, input_size, device, precision, False, measured)
        if eager is not None:
            return replace(eager, compiled=True, source=f"{eager.source}, eager")
    same_stage = [f for f in (*measured, *SHIPPED) if f.stage == stage]
    pool = [f for f in same_stage if f.device == device]
    borrowed = ""
    if not pool:  # borrow a device of the same kind
        pool = [f for f in same_stage if _device_kind(f.device) == _device_kind(device)]
        borrowed = " on another device"
    if not pool:
        return None
    if stage == "probe":  # feature values/s: no architecture to scale by
        pool = [f for f in pool if f.arch == arch] or pool
        best = pool[0]
        return replace(best, device=device, source=f"{best.source}{borrowed}")
    target = forward_flops(arch, input_size)
    if target is None:
        best = pool[0]
        return replace(best, arch=arch, input_size=input_size, device=device,
                       source=f"scaled from {best.arch}@{best.input_size}{borrowed} "
                              f"(FLOPs unknown, unscaled)")
    refs = [(f, forward_flops(f.arch, f.input_size)) for f in pool]
    refs = [(f, flops[0]) for f, flops in refs if flops is not None]
    if not refs:
        return None
    ref, ref_flops = min(refs, key=lambda r: abs(math.log(r[1] / target[0])))
    scale = ref_flops / target[0]
    return replace(ref, arch=arch, input_size=input_size, device=device, compiled=compiled,
                   rate=ref.rate * scale, eval_rate=ref.eval_rate * scale,
                   source=f"scaled from {ref.arch}@{ref.input_size} "
                          f"({ref.source.split(' ')[0]}{borrowed}) by FLOPs")


GRID_RUNS_FILE = "grid-runs.jsonl"  # in the work directory: one line per grid run's cost
GRID_RUNS_KEPT = 1000  # lines read back (the newest)


def record_grid_run(workdir, *, device: str, estimated: dict[str, float],
                    actual: dict[str, float], jobs: dict[str, int], failed: int) -> None:
    """Append one grid run's estimated and actual job seconds per stage to the work
    directory's GRID_RUNS_FILE (the report's "cost" section reads it back)."""
    from pathlib import Path

    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device,
                       "estimated_s": {k: round(v, 3) for k, v in estimated.items()},
                       "actual_s": {k: round(v, 3) for k, v in actual.items()},
                       "jobs": jobs, "failed": failed}, sort_keys=True)
    with open(Path(workdir) / GRID_RUNS_FILE, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def grid_runs(workdir) -> list[dict]:
    """The grid runs recorded in the work directory, oldest first (the newest GRID_RUNS_KEPT);
    a line that does not parse (a run killed mid-write) is skipped."""
    from pathlib import Path

    path = Path(workdir) / GRID_RUNS_FILE
    if not path.is_file():
        return []
    runs = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines()[-GRID_RUNS_KEPT:]:
        try:
            run = json.loads(text)
        except ValueError:
            continue
        if isinstance(run, dict) and isinstance(run.get("estimated_s"), dict) and \
                isinstance(run.get("actual_s"), dict):
            runs.append(run)
    return runs
