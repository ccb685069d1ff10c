"""`--method simpleshot`, declared: nearest class centroid (SimpleShot, Wang et al. 2019) and the
feature transform that enters a result's key. The centroids are medfm.probe.methods.simpleshot.
"""

from __future__ import annotations

from medfm.resolve.methods import MethodOption, MethodSpec, declare

NORMS = ("cl2n", "l2n", "un")  # the paper's feature transforms; the first is the default

SPEC = declare(MethodSpec(
    name="simpleshot", paradigm="SimpleShot", line_style="-.", selections=("none",),
    params=lambda selection, options: {"norm": options["simpleshot_norm"]},
    select_metric=lambda task, params: "",
    options=(MethodOption("simpleshot_norm", NORMS[0], NORMS,
                          "SimpleShot features: cl2n (centre on the training subset, L2-"
                          "normalize; default), l2n, or un (unnormalized)"),),
))
