"""Import throughput: `medfm import` of a PNG folder at 224 px, beside a plain PIL loop.

    python benchmarks/import_bench.py                 # 2,000 images of 512 x 512
    python benchmarks/import_bench.py --n 500 --side 1024

The source collection is built once from real PneumoniaMNIST images (28 px, upsampled bicubic to
--side, saved as 8-bit grayscale PNG in two class folders). Both sides decode every PNG and
resize it to 224 with Pillow's bicubic filter into a uint8 array; the import also hashes every
file, splits, writes the npz (uncompressed) and the card, in a fresh data root each time.
Printed: images/s of each and their ratio (import / loop), measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medfm.imported import import_dataset


def build_source(folder: Path, n: int, side: int, data_root: Path) -> list[Path]:
    marker = folder / f".built-{n}-{side}"
    if marker.exists():
        return sorted(folder.rglob("*.png"))
    shutil.rmtree(folder, ignore_errors=True)
    with np.load(data_root / "pneumoniamnist.npz") as npz:
        images, labels = npz["train_images"], npz["train_labels"][:, 0]
    for i in range(n):
        target = folder / f"class{labels[i % len(labels)]}" / f"{i:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(images[i % len(images)]).resize((side, side),
                                                              Image.Resampling.BICUBIC)
        image.save(target)
    marker.touch()
    return sorted(folder.rglob("*.png"))


def pil_loop(files: list[Path], size: int) -> float:
    """Seconds to decode and resize every file into one preallocated array, one thread."""
    out = np.empty((len(files), size, size), dtype=np.uint8)
    start = time.perf_counter()
    for i, path in enumerate(files):
        with Image.open(path) as image:
            out[i] = np.asarray(image.convert("L").resize((size, size),
                                                          Image.Resampling.BICUBIC))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-import"))
    parser.add_argument("--data-root", default=os.environ.get("MEDFM_DATA_ROOT",
                                                              "../shared/data/medmnist"))
    args = parser.parse_args()
    work = Path(args.workdir)
    files = build_source(work / "src", args.n, args.side, Path(args.data_root))
    loop_s = pil_loop(files, 224)
    out = work / "root"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    import_dataset("bench", work / "src", sizes=(224,), data_root=out, progress=False)
    import_s = time.perf_counter() - start
    cores = len(os.sched_getaffinity(0))
    print(f"{len(files)} PNG {args.side}x{args.side} -> 224 px, {cores} cores")
    print(f"plain PIL loop (1 thread)  {len(files) / loop_s:8.1f} img/s  ({loop_s:.1f} s)")
    print(f"medfm import (threads)     {len(files) / import_s:8.1f} img/s  ({import_s:.1f} s, "
          f"hash + split + npz + card included)")
    print(f"import_vs_loop {loop_s / import_s:.2f}")


if __name__ == "__main__":
    main()
