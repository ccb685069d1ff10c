"""MedMNIST-C on the real BreastMNIST Lite0 store: clean vs corrupted test metrics of the probe.

    python benchmarks/robustness_breast.py [--workdir DIR] [--size 28]

Builds (or reuses) the BreastMNIST store of the pretrained EfficientNet-Lite0 (offline weights;
28 px bilinear-upsampled to 224, as `make demo`), its MedMNIST-C corrupted test splits (every
corruption MedMNIST-C defines for BreastMNIST, severities 1-5, seed 0), probes it at fraction 1.0
(seed 0), and prints per corruption and severity: AUC, ACC, balanced error BE = 1 - balanced
accuracy, and the AUC drop vs clean. The last lines count the corruptions whose severity-5 AUC
is below the clean AUC (the sanity check that corruptions reach the model).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from medfm.extract.extractor import extract_corrupted
from medfm.preprocess import PreprocessRequest
from medfm.probe import probe
from medfm.resolve.store import resolve_store_request
from medfm.store.registry import Registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-robust"))
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--data-root", default=os.environ.get("MEDFM_DATA_ROOT",
                                                              "../shared/data/medmnist"))
    args = parser.parse_args()
    request = resolve_store_request(dataset="breastmnist", size=args.size,
                                    backbone="tf_efficientnet_lite0.in1k",
                                    data_root=args.data_root, preprocess=PreprocessRequest())
    started = time.perf_counter()
    result = extract_corrupted(request, workdir=args.workdir, progress=False)
    print(f"corrupted splits: {result.status} ({len(result.pairs)} sets, "
          f"{time.perf_counter() - started:.0f} s); skipped: {result.skipped or 'none'}")
    report = probe(dataset="breastmnist", size=args.size, fractions=(1.0,), seeds=(0,),
                   workdir=args.workdir, progress=False)
    registry = Registry.in_workdir(args.workdir)
    key = (report.computed or [registry.get(report.skipped[0])])[0].key
    clean = registry.get(key)
    print(f"clean: AUC {100 * clean.auc:.1f} ACC {100 * clean.acc:.1f} "
          f"BE {100 * (1 - clean.balanced_acc):.1f}")
    rows = sorted(registry.evaluations(key), key=lambda e: (e["corruption"], e["severity"]))
    print(f"{'corruption':18s} sev   AUC   ACC    BE  dAUC")
    below = set()
    names = sorted({e["corruption"] for e in rows})
    for e in rows:
        d_auc = 100 * (e["auc"] - clean.auc)
        print(f"{e['corruption']:18s} {e['severity']:3d} {100 * e['auc']:5.1f} "
              f"{100 * e['acc']:5.1f} {100 * (1 - e['balanced_acc']):5.1f} {d_auc:+5.1f}")
        if e["severity"] == 5 and e["auc"] < clean.auc:
            below.add(e["corruption"])
    print(f"severity-5 AUC below clean for {len(below)} of {len(names)} corruptions: "
          f"{', '.join(sorted(below))}")


if __name__ == "__main__":
    main()
