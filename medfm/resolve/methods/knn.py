"""`--method knn`, declared: k, the distance and the vote that enter a result's key (k = 11 as
MedMNIST+). The neighbour search itself is medfm.probe.methods.knn.
"""

from __future__ import annotations

from medfm.resolve.defaults import keyed_later
from medfm.resolve.methods import MethodOption, MethodSpec, declare

KNN_K = 11  # neighbours (MedMNIST+)
KNN_METRICS = ("cosine", "euclidean")
KNN_VOTES = ("fraction", "majority")  # scores: vote fractions, or MedMNIST+'s one-hot majority


def params(options: dict) -> dict:
    """The settings that enter the key; the vote only where it is not the default, so the keys
    of runs before it existed stay (medfm.resolve.defaults.LATER_KEY_FIELDS)."""
    return keyed_later({"k": KNN_K, "metric": options["knn_metric"]}, "vote",
                       options["knn_vote"], scope="knn")


SPEC = declare(MethodSpec(
    name="knn", paradigm="kNN", line_style=":", selections=("none",),
    params=lambda selection, options: params(options),
    select_metric=lambda task, p: "",
    options=(MethodOption("knn_metric", "cosine", KNN_METRICS,
                          "kNN distance (default cosine; k = 11 as MedMNIST+)"),
             MethodOption("knn_vote", KNN_VOTES[0], KNN_VOTES,
                          "kNN scores: vote fractions (default) or the majority class as "
                          "MedMNIST+ (one-hot; ACC as theirs)")),
))
