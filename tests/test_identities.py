"""Every backbone format and dataset source gives the identities, weights digests, data configs
and features that the code before their registries gave (recorded by tests/pinned_identities.py
from commit 30b6896): store names and run keys are built from them, so a work directory written
then is found again with nothing recomputed."""

from __future__ import annotations

import json

import huggingface_hub
import numpy as np
import pytest

from tests.pinned_identities import FIXTURES, IDENTITIES, compute, hub_cache

FEATURE_TOLERANCE = 1e-5  # recorded rounded to 6 decimals


@pytest.fixture(scope="module")
def pinned() -> dict:
    return json.loads(IDENTITIES.read_text())


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    hub_cache(cache)
    return cache


@pytest.fixture(scope="module")
def now(hub, real_root, tmp_path_factory) -> dict:
    """What this checkout makes of the recorded names (offline, from the test's hub cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_HUB_CACHE", str(hub))
        mp.setenv("HF_HUB_OFFLINE", "1")
        return compute(real_root, tmp_path_factory.mktemp("work"), FIXTURES)


def test_every_backbone_format_keeps_its_identity_digest_and_features(pinned, now):
    assert sorted(now["backbones"]) == sorted(pinned["backbones"])
    for key, then in pinned["backbones"].items():
        got = dict(now["backbones"][key])
        features = got.pop("features", None)
        expected = dict(then)
        recorded = expected.pop("features", None)
        assert got == expected, key
        if recorded is not None:
            np.testing.assert_allclose(features, recorded, rtol=FEATURE_TOLERANCE,
                                       atol=FEATURE_TOLERANCE, err_msg=key)


def test_every_dataset_source_keeps_its_digest(pinned, now):
    assert now["datasets"] == pinned["datasets"]
