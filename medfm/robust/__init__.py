"""Robustness in one place: MedMNIST-C corruptions of test splits, the corrupted stores that hold
their features, and recorded runs scored on them.

    corrupt.py   generate corrupted images (medmnistc's corruptions, seeded per image)
    stores.py    corrupted test splits beside a feature store (HDF5), found per clean store
    score.py     a fitted probe or a trained model's scores on them, recorded as evaluations

Probe, fine-tune, extract and the grid use this package; none of them imports another stage to
do so. To add a corruption set: `corrupt.py` (its names and severities) and its tests in
tests/test_robustness.py.
"""
