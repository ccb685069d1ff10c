"""Robustness to acquisition artifacts: corrupted-split evaluations (MedMNIST-C) -> tables.

Method. Each stored evaluation scores a run on a corrupted copy of its test split (a
corruption at a severity, 1-5). Balanced error BE = 1 - balanced accuracy (MedMNIST-C's error:
its `eval.py` scores 1 - `balanced_accuracy_score` at the run's own operating point: argmax, or
0.5 for binary and each multi-label label, as medfm's balanced accuracy). Per corruption c, as in
the `medmnistc` package (0.1.0, `medmnistc/eval.py`, `Evaluator.populate_summary`), with BE_c the
mean of BE over severities 1-5 and the AlexNet numbers of `medmnistc/utils/baselines.py`
(`MEDMNISTC_ALEXNET`, one per dataset, copied verbatim):
normalized BE nBE_c = BE_c / BE_c(AlexNet), and relative balanced error
rBE_c = (BE_c - BE_clean) / (BE_c(AlexNet) - BE_clean(AlexNet)): the error the corruption adds,
relative to what it adds to AlexNet (1 = as fragile as AlexNet, 0 = unaffected). Both are
computed per seed, then averaged over seeds; they need all five severities and a baseline for
that dataset and corruption ("—" otherwise); a run's rBE is the mean over its corruptions.
AUC drop = clean AUC - corrupted AUC of the same run, averaged over the corruptions of a family
(`CORRUPTION_FAMILIES`, MedMNIST-C's grouping: digital, noise, blur, color, task-specific) and
over seeds, in percentage points. A variant's *mean BE* (the guideline's robustness score) is
the mean over seeds of its mean BE over the (corruption, severity) pairs that every variant of
that dataset, size and regime was evaluated on.
"""

from __future__ import annotations

import math

import pandas as pd

from medfm.report.tables import PERCENT, Table, ranked_table

SEVERITIES = (1, 2, 3, 4, 5)  # MedMNIST-C's levels; BE_c averages over all of them
CORRUPTION_FAMILIES = {  # corruption -> family (MedMNIST-C's grouping of its corruptions)
    "pixelate": "digital", "jpeg_compression": "digital",
    "gaussian_noise": "noise", "speckle_noise": "noise", "impulse_noise": "noise",
    "shot_noise": "noise",
    "defocus_blur": "blur", "motion_blur": "blur", "zoom_blur": "blur", "gaussian_blur": "blur",
    "brightness_up": "color", "brightness_down": "color", "contrast_up": "color",
    "contrast_down": "color", "saturate": "color", "gamma_corr_up": "color",
    "gamma_corr_down": "color",
    "stain_deposit": "task-specific", "bubble": "task-specific", "black_corner": "task-specific",
    "characters": "task-specific",
}
OTHER_FAMILY = "other"  # a corruption MedMNIST-C does not name
GROUP = ["dataset", "size", "regime", "variant"]  # one candidate on one condition
# medmnistc 0.1.0, medmnistc/utils/baselines.py (BASELINES), verbatim: AlexNet's balanced error
MEDMNISTC_ALEXNET = {  # dataset -> (clean BE, {corruption: BE averaged over severities})
    "bloodmnist": (0.018369282094266692, {
        "pixelate": 0.05975618949678589,
        "jpeg_compression": 0.13976187053705183,
        "defocus_blur": 0.22399795597780647,
        "motion_blur": 0.1845192137218041,
        "brightness_up": 0.06946294328845175,
        "brightness_down": 0.0790077546902872,
        "contrast_up": 0.05215362284240639,
        "contrast_down": 0.07966068499560328,
        "saturate": 0.03478558170020538,
        "stain_deposit": 0.18536119379858546,
        "bubble": 0.12898833684644578,
    }),
    "breastmnist": (0.14536340852130336, {
        "pixelate": 0.46127819548872184,
        "jpeg_compression": 0.2986215538847118,
        "speckle_noise": 0.38709273182957393,
        "motion_blur": 0.25902255639097743,
        "brightness_up": 0.3197994987468672,
        "brightness_down": 0.21127819548872181,
        "contrast_down": 0.15864661654135334,
    }),
    "chestmnist": (0.2839064387513035, {
        "pixelate": 0.44895070087295996,
        "jpeg_compression": 0.34575690815860566,
        "gaussian_noise": 0.47688317292098203,
        "speckle_noise": 0.45687894795025785,
        "impulse_noise": 0.48553631547337917,
        "shot_noise": 0.4926966815396587,
        "gaussian_blur": 0.3176801263607164,
        "brightness_up": 0.2993721457134663,
        "brightness_down": 0.29711530406534037,
        "contrast_up": 0.28751004051276824,
        "contrast_down": 0.2954742427570406,
        "gamma_corr_up": 0.287462117104012,
        "gamma_corr_down": 0.2891642074561852,
    }),
    "dermamnist": (0.3985775597242611, {
        "pixelate": 0.5105118313063095,
        "jpeg_compression": 0.47716296678659287,
        "gaussian_noise": 0.770161396521756,
        "speckle_noise": 0.7688784860204994,
        "impulse_noise": 0.7995552265467947,
        "shot_noise": 0.8391552104792783,
        "defocus_blur": 0.7008318467374395,
        "motion_blur": 0.6266414682428412,
        "zoom_blur": 0.5277668583085878,
        "brightness_up": 0.4473990148869178,
        "brightness_down": 0.5772968080812169,
        "contrast_up": 0.430415384126964,
        "contrast_down": 0.5398210493891896,
        "black_corner": 0.7591457853547467,
        "characters": 0.4461917314736283,
    }),
    "octmnist": (0.20199999999999996, {
        "pixelate": 0.3124,
        "jpeg_compression": 0.29640000000000005,
        "speckle_noise": 0.386,
        "defocus_blur": 0.3084,
        "motion_blur": 0.4892,
        "contrast_down": 0.4196,
    }),
    "organamnist": (0.050053710403475504, {
        "pixelate": 0.07589728744538755,
        "jpeg_compression": 0.10233182799848468,
        "gaussian_noise": 0.558867512509986,
        "speckle_noise": 0.5008977196696448,
        "impulse_noise": 0.6005122792556206,
        "shot_noise": 0.5704549211261293,
        "gaussian_blur": 0.23340661727240267,
        "brightness_up": 0.14763547790322412,
        "brightness_down": 0.2646445055204496,
        "contrast_up": 0.10977873034814234,
        "contrast_down": 0.1268424696095805,
        "gamma_corr_up": 0.10360009998047674,
        "gamma_corr_down": 0.10577092296366888,
    }),
    "organcmnist": (0.07596783210891289, {
        "pixelate": 0.12161270665759313,
        "jpeg_compression": 0.10754481922990186,
        "gaussian_noise": 0.5736544084235357,
        "speckle_noise": 0.5130960298987614,
        "impulse_noise": 0.5997780092763433,
        "shot_noise": 0.5492477253691926,
        "gaussian_blur": 0.316895537101905,
        "brightness_up": 0.16011849294420644,
        "brightness_down": 0.2324271692594097,
        "contrast_up": 0.09991836613387597,
        "contrast_down": 0.15327395964015147,
        "gamma_corr_up": 0.1426418229218433,
        "gamma_corr_down": 0.12390902424472901,
    }),
    "organsmnist": (0.24300485476777922, {
        "pixelate": 0.31259415418134306,
        "jpeg_compression": 0.26996994867350865,
        "gaussian_noise": 0.5889124203738291,
        "speckle_noise": 0.5450100158501043,
        "impulse_noise": 0.6010108858901404,
        "shot_noise": 0.5519125643755777,
        "gaussian_blur": 0.4466645657200248,
        "brightness_up": 0.3598501969979232,
        "brightness_down": 0.3592866403894267,
        "contrast_up": 0.2871702451645464,
        "contrast_down": 0.3128243336438499,
        "gamma_corr_up": 0.30253196514691594,
        "gamma_corr_down": 0.3116016263827458,
    }),
    "pathmnist": (0.08839299601334816, {
        "pixelate": 0.20934201922262957,
        "jpeg_compression": 0.24709267033930377,
        "defocus_blur": 0.4621259742146214,
        "motion_blur": 0.3689076534699618,
        "brightness_up": 0.41551581022730166,
        "brightness_down": 0.2811688318161528,
        "contrast_up": 0.2338925659881773,
        "contrast_down": 0.13718687818913905,
        "saturate": 0.3341143518079194,
        "stain_deposit": 0.24930831751137275,
        "bubble": 0.10818301335634566,
    }),
    "pneumoniamnist": (0.10085470085470083, {
        "pixelate": 0.22102564102564104,
        "jpeg_compression": 0.2798290598290598,
        "gaussian_noise": 0.4414529914529915,
        "speckle_noise": 0.3457264957264957,
        "impulse_noise": 0.4581196581196581,
        "shot_noise": 0.4106837606837607,
        "gaussian_blur": 0.2730769230769231,
        "brightness_up": 0.14649572649572645,
        "brightness_down": 0.2782051282051282,
        "contrast_up": 0.09529914529914527,
        "contrast_down": 0.23743589743589744,
        "gamma_corr_up": 0.09606837606837607,
        "gamma_corr_down": 0.16641025641025642,
    }),
    "retinamnist": (0.5582064849927977, {
        "pixelate": 0.6017003263074344,
        "jpeg_compression": 0.6795223564688244,
        "gaussian_noise": 0.7040832524914012,
        "speckle_noise": 0.6135258841167651,
        "defocus_blur": 0.6882905018079196,
        "motion_blur": 0.7075760943057883,
        "brightness_down": 0.5844791133844842,
        "contrast_down": 0.6092882382338243,
    }),
    "tissuemnist": (0.3917787199385978, {
        "pixelate": 0.49272908707597907,
        "jpeg_compression": 0.508070087070269,
        "impulse_noise": 0.7970869222746931,
        "gaussian_blur": 0.4805143361974326,
        "brightness_up": 0.4618274173802247,
        "brightness_down": 0.51981943234386,
        "contrast_up": 0.5026233641102424,
        "contrast_down": 0.5369342652194591,
    }),
}


def corruption_family(corruption: str) -> str:
    """MedMNIST-C's family of a corruption, or OTHER_FAMILY."""
    return CORRUPTION_FAMILIES.get(corruption, OTHER_FAMILY)


def corrupted_runs(clean: pd.DataFrame, corrupted: pd.DataFrame) -> pd.DataFrame:
    """One record per stored evaluation, labelled like its clean run.

    `clean` is the annotated clean rows (tables.annotate), `corrupted` the registry's corrupted
    rows (to_dataframe(corruptions=True) with a corruption). Columns: GROUP, regime_order,
    fraction, method, seed, digest, corruption, family, severity, be, be_ci_low, be_ci_high,
    clean_be, auc_drop (fractions).
    """
    labels = clean[[*GROUP, "regime_order", "fraction", "method", "seed", "digest",
                    "balanced_acc", "auc"]]
    scored = corrupted[["digest", "corruption", "severity", "balanced_acc",
                        "balanced_acc_ci_low", "balanced_acc_ci_high", "auc"]]
    runs = scored.merge(labels, on="digest", suffixes=("", "_clean"))
    return runs.assign(
        family=runs["corruption"].map(corruption_family),
        severity=runs["severity"].astype(int),
        be=1.0 - runs["balanced_acc"],
        be_ci_low=1.0 - runs["balanced_acc_ci_high"],
        be_ci_high=1.0 - runs["balanced_acc_ci_low"],
        clean_be=1.0 - runs["balanced_acc_clean"],
        auc_drop=runs["auc_clean"] - runs["auc"],
    )


def _ordered(frame: pd.DataFrame, *extra: str) -> pd.DataFrame:
    order = frame["regime_order"].map(lambda o: o[0] * 1e9 + o[1])
    return frame.assign(_order=order).sort_values(
        ["dataset", "size", "_order", *extra, "variant"]).drop(columns="_order")


def severity_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per candidate, corruption and severity: seed mean (and std) of BE, mean BE CI bounds,
    clean BE and AUC drop. Columns: GROUP, regime_order, corruption, family, severity, n_seeds,
    be_mean, be_std, be_ci_low, be_ci_high, clean_be, auc_drop."""
    keys = [*GROUP, "corruption", "family", "severity"]
    summary = runs.groupby(keys, sort=False).agg(
        regime_order=("regime_order", "first"), n_seeds=("seed", "nunique"),
        be_mean=("be", "mean"), be_std=("be", "std"), be_ci_low=("be_ci_low", "mean"),
        be_ci_high=("be_ci_high", "mean"), clean_be=("clean_be", "mean"),
        auc_drop=("auc_drop", "mean"),
    ).reset_index()
    return _ordered(summary, "corruption", "severity").reset_index(drop=True)


def relative_errors(runs: pd.DataFrame) -> pd.DataFrame:
    """Per candidate and corruption: BE_c, nBE_c and rBE_c (module docstring), seed means.
    Columns: GROUP, regime_order, corruption, family, be_c, nbe, rbe (NaN without all five
    severities or without an AlexNet baseline)."""
    records = []
    for (*group, corruption, seed), cell in runs.groupby(
            [*GROUP, "corruption", "seed"], sort=False):
        baseline = MEDMNISTC_ALEXNET.get(group[0])
        complete = set(cell["severity"]) >= set(SEVERITIES)
        be_c = cell.loc[cell["severity"].isin(SEVERITIES), "be"].mean() if complete else math.nan
        nbe = rbe = math.nan
        if complete and baseline is not None and corruption in baseline[1]:
            alexnet_clean, alexnet_c = baseline[0], baseline[1][corruption]
            nbe = be_c / alexnet_c
            rbe = (be_c - cell["clean_be"].iloc[0]) / (alexnet_c - alexnet_clean)
        records.append({**dict(zip(GROUP, group, strict=True)), "corruption": corruption,
                        "seed": seed, "regime_order": cell["regime_order"].iloc[0],
                        "family": cell["family"].iloc[0], "be_c": be_c, "nbe": nbe, "rbe": rbe})
    per_seed = pd.DataFrame(records)
    summary = per_seed.groupby([*GROUP, "corruption"], sort=False).agg(
        regime_order=("regime_order", "first"), family=("family", "first"),
        be_c=("be_c", "mean"), nbe=("nbe", "mean"), rbe=("rbe", "mean")).reset_index()
    return _ordered(summary, "corruption").reset_index(drop=True)


def mean_be(runs: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: `be_mean`, the seed mean of its mean BE over the (corruption, severity)
    pairs every variant of its (dataset, size, regime) has, and `n_pairs`, how many."""
    rows = []
    for _, cell in runs.groupby(["dataset", "size", "regime"], sort=False):
        pairs = [set(zip(v["corruption"], v["severity"], strict=True))
                 for _, v in cell.groupby("variant")]
        shared = set.intersection(*pairs)
        kept = cell[[p in shared for p in zip(cell["corruption"], cell["severity"],
                                              strict=True)]]
        per_seed = kept.groupby([*GROUP, "seed"], sort=False)["be"].mean().reset_index()
        means = per_seed.groupby(GROUP, sort=False)["be"].mean().reset_index()
        rows.append(means.rename(columns={"be": "be_mean"}).assign(n_pairs=len(shared)))
    return pd.concat(rows, ignore_index=True)


def _pct(value: float) -> str:
    return "—" if pd.isna(value) else f"{value * PERCENT:.1f}"


def be_table(severities: pd.DataFrame, clean: pd.DataFrame) -> Table:
    """Rows (dataset, size, regime, corruption, severity) x variant: BE in %, seed mean ± std,
    a "clean" row first per condition; lowest per row in bold. `clean` is the seed summary."""
    clean_rows = clean[clean["variant"].isin(severities["variant"])].assign(
        corruption="clean", severity="—", family="",
        be_mean=1.0 - clean["balanced_acc_mean"], be_std=clean["balanced_acc_std"])
    both = pd.concat([clean_rows[severities.columns.intersection(clean_rows.columns)],
                      severities.assign(severity=severities["severity"].astype(str))],
                     ignore_index=True)
    both = both.assign(_clean=both["corruption"] != "clean")
    both = _ordered(both, "_clean", "corruption", "severity")

    def cell(r) -> str:
        std = "" if pd.isna(r["be_std"]) else f" ± {r['be_std'] * PERCENT:.1f}"
        return _pct(r["be_mean"]) + ("" if pd.isna(r["be_mean"]) else std)

    return ranked_table(
        "robustness_be", "Balanced error BE = 1 - balanced accuracy (%) on corrupted test "
        "splits, mean ± std over seeds; lowest per row in bold", both,
        ["dataset", "size", "regime", "corruption", "severity"], value="be_mean", cell=cell,
        lower_is_better=True)


def rbe_table(relative: pd.DataFrame) -> Table:
    """Rows (dataset, size, regime, corruption) x variant: rBE (MedMNIST-C), then the mean over
    corruptions with a baseline; lowest per row in bold."""
    means = relative.groupby(GROUP, sort=False).agg(
        regime_order=("regime_order", "first"), rbe=("rbe", "mean")).reset_index()
    both = pd.concat([relative, means.assign(corruption="mean rBE", family="")],
                     ignore_index=True)
    both = both.assign(_mean=both["corruption"] == "mean rBE")
    both = _ordered(both, "_mean", "corruption")
    return ranked_table(
        "robustness_rbe", "Relative balanced error rBE (MedMNIST-C: (BE_c - BE_clean) / "
        "(AlexNet BE_c - AlexNet BE_clean), BE_c over severities 1-5; 1 = as fragile as "
        "AlexNet); lowest per row in bold", both, ["dataset", "size", "regime", "corruption"],
        value="rbe", cell=lambda r: "—" if pd.isna(r["rbe"]) else f"{r['rbe']:.2f}",
        lower_is_better=True)


def auc_drop_table(severities: pd.DataFrame) -> Table:
    """Rows (dataset, size, regime, family, severity) x variant: mean AUC drop vs clean in
    percentage points over the family's corruptions; smallest per row in bold."""
    drops = severities.groupby([*GROUP, "family", "severity"], sort=False).agg(
        regime_order=("regime_order", "first"), auc_drop=("auc_drop", "mean")).reset_index()
    drops = _ordered(drops, "family", "severity")
    return ranked_table(
        "robustness_auc_drop", "Mean AUC drop vs clean (pp) per corruption family and "
        "severity, averaged over the family's corruptions and seeds; smallest per row in bold",
        drops, ["dataset", "size", "regime", "family", "severity"], value="auc_drop",
        cell=lambda r: _pct(r["auc_drop"]), lower_is_better=True)
