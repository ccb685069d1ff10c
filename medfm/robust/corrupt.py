"""Corrupted test splits: MedMNIST-C's realistic acquisition artifacts, through the `medmnistc`
package (Di Salvo, Doerrich, Ledig 2024), for robustness evaluation.

    from medfm.robust.corrupt import resolve_corruptions, corrupt
    pairs = resolve_corruptions("breastmnist", "medmnist-c", severities=(1, 5))
    images_c = corrupt(images, "breastmnist", "pixelate", 5, seed=0)   # same shape, uint8

What is used, and how it differs from the package's own DatasetManager:
- The corruptions and their five severities are the package's per-dataset registry
  (`medmnistc.corruptions.registry.CORRUPTIONS_DS`), applied image by image as DatasetManager
  applies them: the image as RGB, the corruption, back to grayscale for gray datasets.
- Determinism: every (corruption, severity) is seeded on its own (from the seed and its name),
  so a subset of corruptions gives the same images as the full set; DatasetManager seeds once
  and runs the corruptions in sequence. The global `random` / numpy states medmnistc draws from
  are restored afterwards.
- Size: MedMNIST-C's parameters were designed for 224 px images. medfm applies them at the
  store's own source size; a corruption that cannot apply there (the microscopy ones at 28 px)
  is skipped and named. Figures at other sizes than 224 are therefore not comparable with the
  MedMNIST-C paper's.
- Compatibility: medmnistc 0.1.0's motion blur calls `np.fromstring` on bytes (removed in
  NumPy 2) and mis-decodes gray images at sizes other than 224; two shims fix both without
  changing its result at 224 px (`_numpy2_motion_blur`).

The package needs ImageMagick's MagickWand (Debian: libmagickwand-6.q16-6); it is the optional
extra `medfm[robustness]`. A missing piece is one line naming what to install.
"""

from __future__ import annotations

import hashlib
import random
import types
from collections.abc import Sequence

import numpy as np

from medfm.errors import InvalidArgumentError, MedfmError
from medfm.limits import check_list_length
from medfm.runtime import versions

SEVERITIES = (1, 2, 3, 4, 5)  # MedMNIST-C's five levels (the package indexes them 0..4)
CORRUPTION_SET = "medmnist-c"  # every corruption MedMNIST-C defines for the dataset
INSTALL_HINT = ("pip install 'medfm[robustness]' (medmnistc, wand, opencv, scikit-image) and "
                "ImageMagick's MagickWand (Debian/Ubuntu: apt-get install libmagickwand-6.q16-6)")


def _registry() -> tuple[dict, dict]:
    """medmnistc's (CORRUPTIONS_DS, DATASET_RGB), or one line saying what to install."""
    try:
        from medmnistc.corruptions.registry import CORRUPTIONS_DS, DATASET_RGB
    except ImportError as exc:
        raise MedfmError(f"corrupted test splits need the medmnistc package and its "
                         f"dependencies ({' '.join(str(exc).split())}): {INSTALL_HINT}.") from None
    _numpy2_motion_blur()
    return CORRUPTIONS_DS, DATASET_RGB


def package_version() -> str:
    return versions("medmnistc").get("medmnistc", "")


def _numpy2_motion_blur() -> None:
    """Two shims for medmnistc 0.1.0's MotionBlur, nothing else changed:
    - it decodes with the binary `np.fromstring`, removed in NumPy 2: its module sees numpy with
      `fromstring` mapped to `frombuffer`;
    - it decodes ImageMagick's PNG "unchanged", which is 1-channel for a gray image, then treats
      any image that is not 224 x 224 as 3-channel BGR (indexing the width axis at other
      sizes): its module's cv2.imdecode always decodes to 3-channel BGR, which gives the
      package's own result at 224 px and a correct one at every other size."""
    import cv2
    import medmnistc.corruptions.filter as module

    if module.np is np:
        shim = types.ModuleType("numpy_fromstring_shim")
        shim.__dict__.update(np.__dict__)
        shim.fromstring = np.frombuffer
        module.np = shim
    if module.cv2 is cv2:
        cv2_shim = types.ModuleType("cv2_color_decode_shim")
        cv2_shim.__dict__.update({k: getattr(cv2, k) for k in dir(cv2) if not k.startswith("__")})
        cv2_shim.imdecode = lambda buffer, flags: cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        module.cv2 = cv2_shim


def available(dataset: str) -> list[str]:
    """The corruptions MedMNIST-C defines for `dataset` (a MedMNIST flag), in its order."""
    corruptions, _ = _registry()
    return list(corruptions.get(dataset, {}))


def resolve_corruptions(dataset: str, spec: str | Sequence[str] | None,
                        severities: Sequence[int] = SEVERITIES,
                        base: str | None = None) -> list[tuple[str, int]]:
    """(corruption, severity) pairs asked for: `spec` is "medmnist-c" (all of the dataset's) or
    names from it (comma-separated or a list). `base` is the MedMNIST dataset whose set an
    imported collection uses (its card may name one)."""
    source = base or dataset
    names = available(source)
    if not names:
        raise InvalidArgumentError(
            f"MedMNIST-C defines no corruptions for {dataset!r}; an imported dataset can "
            f"borrow a MedMNIST dataset's set with --corruption-base FLAG.")
    if spec is None or spec == CORRUPTION_SET or spec == [CORRUPTION_SET]:
        chosen = names
    else:
        chosen = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
        unknown = [c for c in chosen if c not in names]
        if unknown or not chosen:
            raise InvalidArgumentError(
                f"corruption(s) {', '.join(unknown) or '(none)'} not defined for {source}; "
                f"use {CORRUPTION_SET} or some of: {', '.join(names)}.")
    levels = sorted({int(s) for s in severities})
    if not levels or any(s not in SEVERITIES for s in levels):
        raise InvalidArgumentError(f"severities {list(severities)} must be within 1..5.")
    return [(c, s) for c in chosen for s in levels]


def parse_severities(text: str) -> tuple[int, ...]:
    """"1..5", "1-5", "3" or "1,3,5" -> severities."""
    text = text.strip()
    for sep in ("..", "-"):
        if sep in text:
            lo, _, hi = text.partition(sep)
            try:
                lo, hi = int(lo), int(hi)
            except ValueError:
                break
            check_list_length(hi - lo + 1, "severities")  # before expanding
            return tuple(range(lo, hi + 1))
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidArgumentError(f"--severities {text!r}: use e.g. 1..5 or 1,3,5.") from None


def pair_seed(seed: int, corruption: str, severity: int) -> int:
    """The seed one (corruption, severity) set is drawn with."""
    digest = hashlib.sha256(f"{seed}|{corruption}|{severity}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class NotApplicable(Exception):
    """A corruption that cannot be applied to images of this size."""


def corrupt(images: np.ndarray, dataset: str, corruption: str, severity: int, *,
            seed: int = 0, base: str | None = None, start: int = 0,
            corrupter=None) -> np.ndarray:
    """`images` (N, H, W) or (N, H, W, 3) uint8 with one corruption at one severity (1..5),
    deterministic under `seed`. `start` is the index of images[0] in the split: image i is
    corrupted with a generator seeded by (seed, corruption, severity, start + i), so any chunking
    gives the same images."""
    from PIL import Image

    corruptions, rgb_sets = _registry()
    source = base or dataset
    corruptor = corrupter or corruptions[source][corruption]
    gray = images.ndim == 3
    out = np.empty_like(images)
    saved = random.getstate(), np.random.get_state()
    try:
        for i, image in enumerate(images):
            image_seed = (pair_seed(seed, corruption, severity) + start + i) % (2 ** 32)
            random.seed(image_seed)
            np.random.seed(image_seed)
            if corruption == "impulse_noise":
                corruptor.rng = np.random.default_rng(image_seed)
            try:
                result = np.asarray(corruptor.apply(Image.fromarray(image).convert("RGB"),
                                                    severity - 1))
            except ValueError as exc:
                raise NotApplicable(f"{corruption} cannot be applied at "
                                    f"{images.shape[1]} px ({exc})") from None
            if gray or not rgb_sets.get(source, True):
                result = np.asarray(Image.fromarray(result.astype(np.uint8)).convert("L"))
                if not gray:
                    result = np.repeat(result[:, :, None], 3, axis=2)
            out[i] = result.astype(np.uint8)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return out
