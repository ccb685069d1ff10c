"""Training subsets by fraction or by shots per class: stratified, seeded, nested, >= 1 per class.

    from medfm.sampling import SubsetSpec, sample
    subset = sample(train_labels, Task.MULTI_CLASS, SubsetSpec(fraction=0.1, seed=1))
    subset.indices  # sorted int64 rows of the train split; subset.digest names them

Probe and finetune both draw their training images here, so "10% seed 1" is the same images in
both. The method:

1. Strata. Binary, multi-class and ordinal: the class. Multi-label (ChestMNIST): the row's rarest
   positive label, rarity being the label's number of positives in the split (ties go to the
   lower label index), or a "no finding" stratum for rows with no positive label. Every row of
   a rare label's stratum carries that label, and every stratum keeps >= 1 row, so each label
   that is the rarest positive of some row keeps positives at any fraction (the rarest label
   always is); a label that is never the rarest in its rows relies on rows shared with rarer
   labels, which in practice (ChestMNIST-like prevalences) carry it at every fraction.
2. Order. Each stratum's rows (ascending) are shuffled by one permutation drawn from
   `numpy.random.default_rng([seed, stratum])`, so a stratum's order depends only on the seed,
   the stratum and its rows.
3. Prefixes. A fraction f takes the first round(f * n_c) rows of each stratum (half rounds up),
   clipped to at least 1 and at most n_c; k shots take the first min(k, n_c). Prefixes of one
   order make subsets NESTED: for one seed, 1% is inside 10% is inside 100%, and 5 shots inside
   10. Fraction 1.0 is the whole split.

Sampler modes (`SubsetSpec.sampler`, recorded in every result key that does not use the default):
`shuffled` is the method above. `first-per-class` is the seed paper's rule (FMMIC SFT/dataset.py
lines 112-127), the same images for every seed: the first n rows of each class in split order
(n = the shots, or round(f * n_c) >= 1 for a fraction f); shots above FIRST_N_WHOLE_SPLIT mean the
whole split, as there. Multi-label (ChestMNIST) has no classes to take from: n x L rows (L
labels; round(f * N) >= 1 for a fraction) drawn without replacement by numpy's legacy
`RandomState(seed).choice`, exactly the rows their `np.random.seed(seed); np.random.choice`
draws. Both are nested too (prefixes of one order).

Few-shot episodes (`SubsetSpec.episode`, medfm.episodes): episode e of seed s draws, from
`numpy.random.default_rng([s, EPISODE_STREAM, e])`, first `ways` of the classes (all of them when
`ways` is None; chosen without replacement, kept in ascending order), then for each chosen class
in ascending order min(k, n_c) of its rows without replacement. Episodes are independent draws
(not nested, unlike the prefixes above): the N-way K-shot tasks of the few-shot literature. An
episode read from a file (`rows`) is those rows, as given.

A subset is identified by its spec and by `digest`, the first 16 hex digits of the SHA-256 of its
indices as little-endian int64, which results record so a run can prove which images it used.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.resolve.defaults import SAMPLER
from medfm.limits import SHOTS_MAX, check_at_most, check_list_length, check_seed

EPISODE_STREAM = 0x45504953  # "EPIS": the rng stream of episodes, apart from strata's
EPISODES_MAX = 10_000  # episodes per seed (--episodes), and episodic runs per call
WAYS_MAX = 1_000  # classes per episode (--ways)
DIGEST_CHARS = 16  # hex digits of the SHA-256 kept as a subset's digest
SAMPLERS = (SAMPLER, "first-per-class")  # sampler modes (module docstring); first: default
FIRST_N_WHOLE_SPLIT = 1000  # first-per-class: more shots than this take the whole split
#                             (the seed paper's `sample_num_per_cls < 1001` test)
# what each parser accepts, quoted in its error messages
_EXAMPLES = {"fractions": "0.01,0.1,1.0", "shots": "1,5,10", "seeds": "0,1,2 or 0-4"}


@dataclass(frozen=True)
class SubsetSpec:
    """Which training subset: a fraction of each class or k shots per class, under one seed."""

    fraction: float | None = None  # in (0, 1]; 1.0 is the whole split
    shots: int | None = None  # images per class (stratum), >= 1
    seed: int = 0  # 0 .. 2^32 - 1; the same seed gives nested subsets across fractions and shots
    sampler: str = SAMPLERS[0]  # one of SAMPLERS
    episode: int | None = None  # few-shot episode number (medfm.episodes), with shots
    ways: int | None = None  # classes per episode (None: every class)
    rows: tuple[int, ...] | None = field(default=None, repr=False)  # an episode's rows as read
    #                                                                  from an episode file

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.shots is None):
            raise InvalidArgumentError(
                f"a subset needs exactly one of fraction and shots; got fraction="
                f"{self.fraction}, shots={self.shots}."
            )
        if self.fraction is not None:
            object.__setattr__(self, "fraction", _check_fraction(self.fraction))
        if self.shots is not None:
            object.__setattr__(self, "shots", check_at_most(self.shots, SHOTS_MAX, "shots",
                                                            minimum=1))
        object.__setattr__(self, "seed", check_seed(self.seed))
        if self.sampler not in SAMPLERS:
            raise InvalidArgumentError(
                f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}.")
        if self.episode is not None or self.ways is not None or self.rows is not None:
            self._check_episode()

    def _check_episode(self) -> None:
        if self.shots is None or self.episode is None or self.sampler != SAMPLERS[0]:
            raise InvalidArgumentError(
                "a few-shot episode needs --shots and an episode number, with the default "
                "sampler (episodes are drawn by their own rule; drop --fractions/--sampler).")
        object.__setattr__(self, "episode", check_at_most(self.episode, EPISODES_MAX - 1,
                                                          "episode", minimum=0))
        if self.ways is not None:
            object.__setattr__(self, "ways", check_at_most(self.ways, WAYS_MAX, "--ways",
                                                           minimum=2))
        if self.rows is not None:
            object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))


@dataclass(frozen=True)
class NoSubset:
    """No training images at all (zero-shot): a run keyed with neither fraction nor shots."""

    fraction: None = None
    shots: None = None
    seed: int = 0
    sampler: str = SAMPLERS[0]
    episode: None = None
    ways: None = None
    rows: None = None


@dataclass(frozen=True)
class Subset:
    """The rows of the train split that a SubsetSpec selects; equal subsets have equal digests."""

    spec: SubsetSpec  # what was asked for
    indices: np.ndarray = field(compare=False, repr=False)  # sorted int64 rows, read-only
    n: int  # len(indices)
    digest: str  # sha256 of indices as little-endian int64, first DIGEST_CHARS hex digits


def _check_fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"fraction {value!r} is not a number in (0, 1].")
    fraction = float(value)
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        hint = f"; for {fraction:g}% write {fraction / 100:g}" if 1.0 < fraction <= 100.0 else ""
        raise InvalidArgumentError(
            f"fraction {value!r} is not in (0, 1]: fractions are proportions of the training "
            f"split{hint}."
        )
    return fraction


def _items(text: str, what: str) -> list[str]:
    """Comma-separated items, stripped; a clear error for an empty list or an empty item."""
    items = [item.strip() for item in str(text).split(",")]
    check_list_length(len(items), what)
    if not any(items) or not all(items):
        raise InvalidArgumentError(
            f"{what} {text!r} has an empty item; give a comma-separated list such as "
            f"{_EXAMPLES[what]}."
        )
    return items


def _unique(values: list, what: str, text: str) -> list:
    if len(set(values)) != len(values):
        raise InvalidArgumentError(f"{what} {text!r} lists a value twice; give each once.")
    return values


def parse_fractions(text: str) -> list[float]:
    """"0.01,0.1,1.0" -> [0.01, 0.1, 1.0]; each in (0, 1] ("1%" and "10" are rejected)."""
    fractions = []
    for item in _items(text, "fractions"):
        if item.endswith("%"):
            raise InvalidArgumentError(
                f"fraction {item!r}: write fractions as proportions in (0, 1], e.g. "
                f"{_percent_as_fraction(item[:-1])} for {item}."
            )
        try:
            value = float(item)
        except ValueError:
            raise InvalidArgumentError(
                f"fraction {item!r} is not a number; give proportions in (0, 1] such as "
                f"{_EXAMPLES['fractions']}."
            ) from None
        fractions.append(_check_fraction(value))
    return _unique(fractions, "fractions", text)


def _percent_as_fraction(percent: str) -> str:
    try:
        return f"{float(percent) / 100:g}"
    except ValueError:
        return "0.01"


def parse_shots(text: str) -> list[int]:
    """"1,5,10" -> [1, 5, 10]; positive integers (images per class)."""
    shots = []
    for item in _items(text, "shots"):
        if not item.isdigit() or int(item) < 1:
            raise InvalidArgumentError(
                f"shots {item!r} is not a positive integer; give images per class such as "
                f"{_EXAMPLES['shots']}."
            )
        shots.append(check_at_most(int(item), SHOTS_MAX, "shots"))
    return _unique(shots, "shots", text)


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; "0-4" -> [0, 1, 2, 3, 4]; items may mix ("0-2,7")."""
    seeds = []
    for item in _items(text, "seeds"):
        low, sep, high = item.partition("-")
        low, high = low.strip(), (high.strip() if sep else low.strip())
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise InvalidArgumentError(
                f"seed {item!r} is not a non-negative integer or an ascending range; give "
                f"{_EXAMPLES['seeds']}."
            )
        check_seed(int(high), "--seeds")
        check_list_length(len(seeds) + int(high) - int(low) + 1, "seeds")  # before expanding
        seeds.extend(range(int(low), int(high) + 1))
    return _unique(seeds, "seeds", text)


def _strata(labels: np.ndarray, task: Task) -> np.ndarray:
    """(N,) stratum of each row: the class, or for multi-label the rarest positive label
    (L = "no finding")."""
    labels = np.asarray(labels)
    if labels.ndim == 0 or labels.shape[0] == 0:
        raise InvalidArgumentError("cannot sample from an empty label array.")
    if Task(task) is not Task.MULTI_LABEL:
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or labels.min() < 0:
            raise InvalidArgumentError(
                f"{Task(task).value} labels must be non-negative class ids shaped (N,) or "
                f"(N, 1); got {labels.shape}."
            )
        return labels.astype(np.int64)
    if labels.ndim != 2 or not np.isin(labels, (0, 1)).all():
        raise InvalidArgumentError(
            f"multi-label labels must be a (N, L) array of 0/1; got {labels.shape}."
        )
    n_labels = labels.shape[1]
    by_rarity = np.lexsort((np.arange(n_labels), labels.sum(axis=0)))  # rarest label first
    rarity = np.empty(n_labels, dtype=np.int64)
    rarity[by_rarity] = np.arange(n_labels)
    # (N, L) rarity rank of each positive label, L where negative; row min = rarest positive
    rank = np.where(labels == 1, rarity[None, :], n_labels).min(axis=1)
    return np.append(by_rarity, n_labels)[rank]


def _take_prefixes(strata: np.ndarray, spec: SubsetSpec) -> np.ndarray:
    """Sorted int64 rows: a prefix of each stratum's seeded permutation, sized by the spec."""
    chosen = []
    for stratum in np.unique(strata):
        rows = np.flatnonzero(strata == stratum)
        order = np.random.default_rng([spec.seed, int(stratum)]).permutation(rows)
        if spec.fraction is not None:
            count = min(max(math.floor(spec.fraction * rows.size + 0.5), 1), rows.size)
        else:
            count = min(spec.shots, rows.size)
        chosen.append(order[:count])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _first_per_class(labels: np.ndarray, task: Task, spec: SubsetSpec) -> np.ndarray:
    """Sorted int64 rows of the `first-per-class` sampler (module docstring)."""
    strata = _strata(labels, task)  # validates the labels
    if spec.shots is not None and spec.shots > FIRST_N_WHOLE_SPLIT:
        return np.arange(len(strata), dtype=np.int64)
    if Task(task) is Task.MULTI_LABEL:
        n, n_labels = len(strata), np.asarray(labels).shape[1]
        count = (spec.shots * n_labels if spec.shots is not None
                 else max(math.floor(spec.fraction * n + 0.5), 1))
        if count >= n:
            return np.arange(n, dtype=np.int64)
        rows = np.random.RandomState(spec.seed).choice(n, size=count, replace=False)
        return np.sort(rows).astype(np.int64)
    chosen = []
    for stratum in np.unique(strata):
        rows = np.flatnonzero(strata == stratum)  # split order
        if spec.fraction is not None:
            count = min(max(math.floor(spec.fraction * rows.size + 0.5), 1), rows.size)
        else:
            count = min(spec.shots, rows.size)
        chosen.append(rows[:count])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def check_episodic(task: Task) -> None:
    """One line for a multi-label dataset: an episode draws k images per class."""
    if Task(task) is Task.MULTI_LABEL:
        raise InvalidArgumentError(
            "few-shot episodes draw k images per class, and this dataset is multi-label (no "
            "single class per image); use --shots without --episodes, or --fractions.")


def _episode(labels: np.ndarray, task: Task, spec: SubsetSpec) -> np.ndarray:
    """Sorted int64 rows of a few-shot episode (module docstring)."""
    check_episodic(task)
    strata = _strata(labels, task)
    if spec.rows is not None:
        rows = np.asarray(spec.rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(strata)):
            raise InvalidArgumentError(
                f"episode {spec.episode} names rows outside the training split (0 .. "
                f"{len(strata) - 1}); the episode file is for another dataset or split.")
        return np.unique(rows)
    classes = np.unique(strata)
    rng = np.random.default_rng([spec.seed, EPISODE_STREAM, spec.episode])
    if spec.ways is not None:
        if spec.ways > classes.size:
            raise InvalidArgumentError(
                f"--ways {spec.ways} asks for more classes than the dataset has "
                f"({classes.size}); give at most {classes.size}.")
        classes = np.sort(rng.choice(classes, size=spec.ways, replace=False))
    chosen = []
    for c in classes:
        rows = np.flatnonzero(strata == c)
        chosen.append(rng.choice(rows, size=min(spec.shots, rows.size), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def indices_digest(indices: np.ndarray) -> str:
    """The first DIGEST_CHARS hex digits of the sha256 of `indices` as little-endian int64."""
    return hashlib.sha256(np.asarray(indices).astype("<i8").tobytes()).hexdigest()[:DIGEST_CHARS]


def episode_params(spec: SubsetSpec) -> dict:
    """What an episodic subset adds to a run key's params (nothing for any other subset, so
    every earlier key stays): the episode number, the ways, the digest of rows read from a file."""
    params = {}
    if spec.episode is not None:
        params["episode"] = spec.episode
    if spec.ways is not None:
        params["ways"] = spec.ways
    if spec.rows is not None:
        params["episode_rows"] = indices_digest(np.unique(np.asarray(spec.rows, dtype=np.int64)))
    return params


def sample(labels: np.ndarray, task: Task, spec: SubsetSpec) -> Subset:
    """The training subset `spec` selects from a split with these labels (see module docstring)."""
    if isinstance(spec, NoSubset):
        indices = np.zeros(0, dtype=np.int64)
    elif spec.episode is not None:
        indices = _episode(labels, task, spec)
    elif spec.sampler == "first-per-class":
        indices = _first_per_class(labels, task, spec)
    else:
        indices = _take_prefixes(_strata(labels, task), spec)
    indices.setflags(write=False)
    return Subset(spec=spec, indices=indices, n=int(indices.size), digest=indices_digest(indices))


def expand_subsets(fractions: Sequence[float] | None, shots: Sequence[int] | None,
                   seeds: Sequence[int], default_fractions: Sequence[float] = (1.0,),
                   sampler: str = SAMPLERS[0]) -> list[SubsetSpec]:
    """Every fraction under every seed, then every shot count under every seed; with neither
    fractions nor shots given, `default_fractions` (the whole training split)."""
    if not fractions and not shots:
        fractions = default_fractions
    specs = [SubsetSpec(fraction=f, seed=s, sampler=sampler) for f in fractions or ()
             for s in seeds]
    return specs + [SubsetSpec(shots=k, seed=s, sampler=sampler) for k in shots or ()
                    for s in seeds]


def expand_episodes(shots: Sequence[int] | None, seeds: Sequence[int], episodes: int,
                    ways: int | None = None) -> list[SubsetSpec]:
    """`episodes` few-shot episodes per (shots, seed): every shot count under every seed."""
    if not shots:
        raise InvalidArgumentError("--episodes draws k images per class: give --shots (e.g. "
                                   "--shots 1,5,10 --episodes 20), not --fractions.")
    count = check_at_most(episodes, EPISODES_MAX, "--episodes", minimum=1)
    check_at_most(len(shots) * len(seeds) * count, EPISODES_MAX, "shots x seeds x episodes")
    return [SubsetSpec(shots=k, seed=s, episode=e, ways=ways) for k in shots for s in seeds
            for e in range(count)]


def sample_fraction(labels: np.ndarray, task: Task, fraction: float, seed: int) -> Subset:
    """round(fraction * n_c) rows of each class (>= 1), nested across fractions for one seed."""
    return sample(labels, task, SubsetSpec(fraction=fraction, seed=seed))


def sample_shots(labels: np.ndarray, task: Task, shots: int, seed: int) -> Subset:
    """`shots` rows of each class (all of a smaller class), nested across shots for one seed."""
    return sample(labels, task, SubsetSpec(shots=shots, seed=seed))
