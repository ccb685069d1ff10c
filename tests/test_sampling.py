import hashlib
import math
from itertools import pairwise

import numpy as np
import pytest

from medfm.data import Task, load_split
from medfm.errors import InvalidArgumentError
from medfm.sampling import (
    Subset,
    SubsetSpec,
    parse_fractions,
    parse_seeds,
    parse_shots,
    sample,
    sample_fraction,
    sample_shots,
)

FRACTIONS = [0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0]
SHOTS = [1, 2, 5, 10, 50, 1000]
# ChestMNIST train prevalence of its 14 labels (Atelectasis ... Hernia), roughly
CHEST_PREVALENCE = [
    0.10, 0.025, 0.12, 0.18, 0.05, 0.056, 0.012, 0.047, 0.04, 0.02, 0.022, 0.015, 0.03, 0.002
]


def _single_label(counts=(700, 200, 60, 9, 3), seed=0) -> np.ndarray:
    """(N, 1) uint8 labels with imbalanced classes, shuffled."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels).astype(np.uint8)[:, None]


def _chest_like(n=78_468, seed=0) -> np.ndarray:
    """(N, 14) uint8 multi-label matrix with ChestMNIST-like prevalences."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, 14)) < np.array(CHEST_PREVALENCE)).astype(np.uint8)


CASES = {
    Task.BINARY: _single_label((400, 25)),
    Task.MULTI_CLASS: _single_label(),
    Task.ORDINAL: _single_label((500, 120, 80, 40, 2)),
    Task.MULTI_LABEL: _chest_like(n=5000),
}


@pytest.mark.parametrize("task", list(CASES))
def test_fractions_are_nested_for_one_seed(task):
    labels = CASES[task]
    subsets = [set(sample_fraction(labels, task, f, seed=3).indices) for f in FRACTIONS]
    for smaller, larger in pairwise(subsets):
        assert smaller <= larger
    assert len(subsets[0]) < len(subsets[-1])


@pytest.mark.parametrize("task", list(CASES))
def test_shots_are_nested_and_inside_the_first_fraction_prefix(task):
    labels = CASES[task]
    subsets = [set(sample_shots(labels, task, k, seed=3).indices) for k in SHOTS]
    for smaller, larger in pairwise(subsets):
        assert smaller <= larger
    # one shot per stratum is the same image as the >= 1 floor at a tiny fraction
    assert subsets[0] == set(sample_fraction(labels, task, 1e-9, seed=3).indices)


@pytest.mark.parametrize("task", [Task.BINARY, Task.MULTI_CLASS, Task.ORDINAL])
def test_per_class_counts_are_exact_and_at_least_one(task):
    labels = CASES[task][:, 0]
    n_c = np.bincount(labels)
    for fraction in FRACTIONS:
        got = np.bincount(labels[sample_fraction(labels, task, fraction, seed=0).indices],
                          minlength=n_c.size)
        expected = [min(max(math.floor(fraction * n + 0.5), 1), n) for n in n_c]
        assert got.tolist() == expected
    for shots in SHOTS:
        got = np.bincount(labels[sample_shots(labels, task, shots, seed=0).indices],
                          minlength=n_c.size)
        assert got.tolist() == np.minimum(n_c, shots).tolist()


@pytest.mark.parametrize("task", list(CASES))
def test_fraction_one_is_the_whole_split(task):
    labels = CASES[task]
    subset = sample_fraction(labels, task, 1.0, seed=5)
    np.testing.assert_array_equal(subset.indices, np.arange(labels.shape[0]))
    assert subset.indices.dtype == np.int64 and subset.n == labels.shape[0]


@pytest.mark.parametrize("task", list(CASES))
def test_deterministic_per_seed_and_different_across_seeds(task):
    labels = CASES[task]
    a = sample_fraction(labels, task, 0.1, seed=1)
    b = sample_fraction(labels.copy(), task, 0.1, seed=1)
    c = sample_fraction(labels, task, 0.1, seed=2)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a == b and a.digest == b.digest
    assert a.n == c.n and a.digest != c.digest and a != c


def test_multi_label_keeps_positives_of_every_label_at_one_percent():
    labels = _chest_like()
    for seed in range(3):
        subset = sample_fraction(labels, Task.MULTI_LABEL, 0.01, seed=seed)
        assert abs(subset.n - 0.01 * labels.shape[0]) < 20
        assert (labels[subset.indices].sum(axis=0) > 0).all()
    # one image per stratum already covers every label
    one_shot = sample_shots(labels, Task.MULTI_LABEL, 1, seed=0)
    assert (labels[one_shot.indices].sum(axis=0) > 0).all()


def test_multi_label_strata_are_the_rarest_positive_label():
    # label 2 is the rarest (1 positive), then label 1 (2), then label 0 (3); row 5 has none
    labels = np.array(
        [[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=np.uint8
    )
    # strata: row 0 -> label 0, row 1 -> label 1, row 2 -> label 2, rows 3-5 -> no finding
    one_each = sample_shots(labels, Task.MULTI_LABEL, 1, seed=0).indices
    assert one_each[:3].tolist() == [0, 1, 2] and one_each.size == 4
    assert sample_shots(labels, Task.MULTI_LABEL, 3, seed=0).n == 6


def test_digest_is_sha256_of_little_endian_indices_and_stable():
    labels = _single_label()
    subset = sample(labels, Task.MULTI_CLASS, SubsetSpec(fraction=0.1, seed=1))
    expected = hashlib.sha256(subset.indices.astype("<i8").tobytes()).hexdigest()[:16]
    assert subset.digest == expected
    # pinned: a change here changes which images "10% seed 1" means in every stored result
    assert subset.digest == "00577533d5f24a98"
    assert sample_shots(labels, Task.MULTI_CLASS, 5, seed=0).digest == "2a292fd19631820e"


@pytest.mark.slow
def test_breastmnist_ten_percent_seed_one_is_pinned(real_root):
    _, labels = load_split("breastmnist", 28, "train", data_root=real_root)
    subset = sample_fraction(labels, Task.BINARY, 0.1, seed=1)
    assert subset.n == 55 and np.bincount(labels[subset.indices, 0]).tolist() == [15, 40]
    assert subset.digest == "b273d8cf76ab75d4"


def test_subset_indices_are_read_only_and_compare_by_digest():
    subset = sample_fraction(_single_label(), Task.MULTI_CLASS, 0.5, seed=0)
    with pytest.raises(ValueError):
        subset.indices[0] = 1
    assert isinstance(subset, Subset) and hash(subset) == hash(
        sample_fraction(_single_label(), Task.MULTI_CLASS, 0.5, seed=0)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": 0},  # neither fraction nor shots
        {"fraction": 0.1, "shots": 5},  # both
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"fraction": float("nan")},
        {"shots": 0},
        {"shots": 2.5},
        {"fraction": 0.1, "seed": -1},
    ],
)
def test_bad_specs_raise_a_user_error(kwargs):
    with pytest.raises(InvalidArgumentError):
        SubsetSpec(**kwargs)


def test_bad_labels_raise_a_user_error():
    with pytest.raises(InvalidArgumentError):
        sample_fraction(np.zeros((0, 1)), Task.BINARY, 0.1, seed=0)
    with pytest.raises(InvalidArgumentError):
        sample_fraction(np.zeros((10, 14)), Task.MULTI_CLASS, 0.1, seed=0)
    with pytest.raises(InvalidArgumentError):
        sample_fraction(np.full((10, 14), 2), Task.MULTI_LABEL, 0.1, seed=0)


def test_parsers_accept_lists_and_ranges():
    assert parse_fractions("0.01, 0.1,1.0") == [0.01, 0.1, 1.0]
    assert parse_fractions("1") == [1.0]
    assert parse_shots("1,5,10") == [1, 5, 10]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]


@pytest.mark.parametrize(
    "parser, text, message",
    [
        (parse_fractions, "1%", "0.01 for 1%"),
        (parse_fractions, "10", "for 10% write 0.1"),
        (parse_fractions, "0", r"not in \(0, 1\]"),
        (parse_fractions, "-0.1", r"not in \(0, 1\]"),
        (parse_fractions, "abc", "not a number"),
        (parse_fractions, "", "empty item"),
        (parse_fractions, "0.1,,0.2", "empty item"),
        (parse_fractions, "0.1,0.1", "twice"),
        (parse_shots, "0", "positive integer"),
        (parse_shots, "1.5", "positive integer"),
        (parse_shots, "-1", "positive integer"),
        (parse_seeds, "-1", "non-negative"),
        (parse_seeds, "3-1", "ascending range"),
        (parse_seeds, "a", "non-negative"),
        (parse_seeds, "0-2,2", "twice"),
    ],
)
def test_parse_errors_say_what_to_write(parser, text, message):
    with pytest.raises(InvalidArgumentError, match=message):
        parser(text)
