"""Model performance: AUROC, accuracy, precision, recall, F1 (classification); Dice, HD95
(segmentation); MAE, RMSE, R^2, Pearson r and Harrell's C-index (regression, e.g. survival).
These score the model, next to the explanation metrics that score its maps."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch


def _binary_counts(pred: np.ndarray, true: np.ndarray) -> tuple[int, int, int, int]:
    tp = int((pred & true).sum())
    fp = int((pred & ~true).sum())
    fn = int((~pred & true).sum())
    tn = int((~pred & ~true).sum())
    return tp, fp, fn, tn


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def pick_thresholds(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per class, the probability threshold that maximises F1 on (validation) data.

    Candidates are the midpoints between sorted distinct scores; with one class only present the
    threshold stays 0.5.
    """
    thresholds = []
    for k in range(probs.shape[1]):
        p, y = probs[:, k], labels[:, k] > 0.5
        if y.all() or not y.any():
            thresholds.append(0.5)
            continue
        values = np.unique(p)
        candidates = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
        best = max(candidates, key=lambda t: _prf(*_binary_counts(p >= t, y)[:3])[2])
        thresholds.append(float(best))
    return thresholds


def classification_report(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                          thresholds: Sequence[float] | None = None,
                          multilabel: bool = True) -> dict:
    """AUROC per class and macro; accuracy, precision, recall and F1 per class at ``thresholds``
    (multi-label) or of the arg-max class (softmax), with their macro means."""
    from sklearn.metrics import roc_auc_score

    probs, labels = np.asarray(probs, np.float64), np.asarray(labels) > 0.5
    k = probs.shape[1]
    if multilabel:
        thr = np.asarray([np.nan if t is None else t for t in thresholds]
                         if thresholds is not None else [0.5] * k, dtype=np.float64)
        preds = probs >= thr
    else:
        preds = np.eye(k, dtype=bool)[probs.argmax(1)]
    per_class = {}
    for c, name in enumerate(class_names):
        y = labels[:, c]
        auroc = float(roc_auc_score(y, probs[:, c])) if 0 < y.sum() < len(y) else float("nan")
        tp, fp, fn, tn = _binary_counts(preds[:, c], y)
        precision, recall, f1 = _prf(tp, fp, fn)
        accuracy = (tp + tn) / len(y)
        if multilabel and np.isnan(thr[c]):  # no operating point: no decision to count
            accuracy = precision = recall = f1 = float("nan")
        per_class[name] = {"auroc": auroc, "accuracy": accuracy, "precision": precision,
                           "recall": recall, "f1": f1, "positives": int(y.sum())}
    def macro(key: str) -> float:
        vals = [v[key] for v in per_class.values() if not np.isnan(v[key])]
        return float(np.mean(vals)) if vals else float("nan")
    report = {f"macro_{m}": macro(m) for m in ("auroc", "accuracy", "precision", "recall", "f1")}
    report["macro_auroc_ci"] = macro_auroc_interval(probs, labels)
    if not multilabel:
        report["accuracy"] = float((probs.argmax(1) == labels.argmax(1)).mean())
    report.update(decision_balance(preds, labels, class_names, multilabel, thr if multilabel else None))
    report["per_class"] = per_class
    report["n"] = len(probs)
    return report


def _balanced_accuracy(preds: np.ndarray, labels: np.ndarray, multilabel: bool) -> float:
    """Softmax: the mean recall of the classes present; multi-label: the mean over classes with
    both labels of (TPR + TNR) / 2 (chance: 1 / K and 0.5)."""
    values = []
    for c in range(labels.shape[1]):
        y, p = labels[:, c], preds[:, c]
        if not y.any() or (multilabel and y.all()):
            continue
        tpr = (p & y).sum() / y.sum()
        values.append((tpr + (~p & ~y).sum() / (~y).sum()) / 2 if multilabel else tpr)
    return float(np.mean(values)) if values else float("nan")


def decision_balance(preds: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                     multilabel: bool, thresholds: np.ndarray | None = None, resamples: int = 1000,
                     seed: int = 0) -> dict:
    """What the near-chance check reads of the model's decisions: balanced accuracy with its
    percentile-bootstrap interval and its chance level (1 / K for a softmax head, 0.5 per class for
    multi-label), the majority-class rate (softmax), and the classes onto which the decisions
    collapse: a softmax head giving one class to at least 95 % of the cases when the truth is less
    skewed; a multi-label class decided the same way for every case although both labels occur."""
    k = labels.shape[1]
    if multilabel and thresholds is not None:
        usable = ~np.isnan(thresholds)
        preds, labels = preds[:, usable], labels[:, usable]
        class_names = [n for n, u in zip(class_names, usable, strict=True) if u]
    out: dict = {"balanced_accuracy": _balanced_accuracy(preds, labels, multilabel),
                 "chance_balanced_accuracy": 0.5 if multilabel else 1.0 / k}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(preds), len(preds))
        v = _balanced_accuracy(preds[idx], labels[idx], multilabel)
        if not np.isnan(v):
            values.append(v)
    out["balanced_accuracy_ci"] = ([float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]
                                   if values else [float("nan"), float("nan")])
    collapsed = []
    if multilabel:
        for c, name in enumerate(class_names):
            y = labels[:, c]
            if y.any() and not y.all() and (preds[:, c].all() or not preds[:, c].any()):
                collapsed.append(f"{name} {'present' if preds[:, c].all() else 'absent'}")
    elif len(preds):
        truth = labels.argmax(1)
        out["majority_rate"] = float(np.bincount(truth, minlength=k).max() / len(truth))
        shares = np.bincount(preds.argmax(1), minlength=k) / len(preds)
        top = int(shares.argmax())
        if shares[top] >= 0.95 and out["majority_rate"] < 0.95:
            collapsed.append(f"{class_names[top]} ({shares[top]:.0%} of the cases)")
    out["collapsed_onto"] = collapsed
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic: (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos
    the sum of the positives' mid-ranks (ties count one half); NaN without both classes."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc_interval(probs: np.ndarray, labels: np.ndarray, resamples: int = 1000,
                         seed: int = 0, level: float = 0.95) -> list[float]:
    """The percentile bootstrap interval of the macro AUROC over cases (resampled with
    replacement; a class without both labels in a resample is left out of its mean)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels) > 0.5
    rng = np.random.default_rng(seed)
    n, values = len(probs), []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        per = [auroc(probs[idx, c], labels[idx, c]) for c in range(probs.shape[1])]
        per = [v for v in per if not np.isnan(v)]
        if per:
            values.append(float(np.mean(per)))
    if not values:
        return [float("nan"), float("nan")]
    alpha = (1 - level) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def chance_warnings(performance: dict) -> list[str]:
    """Plain sentences for the tasks whose model performs near chance: its macro AUROC interval
    includes 0.5; its balanced accuracy interval does not rise above chance (1 / K, or 0.5 per
    class for multi-label); its accuracy is not above the majority-class rate; its decisions
    collapse onto one class; or its mean Dice interval does not rise above the Dice a random mask
    of the predicted volume would reach. Its explanations then say little about any finding."""
    return [w for warnings in chance_warnings_by_task(performance).values() for w in warnings]


def chance_warnings_by_task(performance: dict) -> dict[str, list[str]]:
    """``chance_warnings`` per "model|dataset" key of the performance file."""
    found = {key: _chance(key, info) for key, info in performance.items()}
    return {key: warnings for key, warnings in found.items() if warnings}


def _chance(key: str, info) -> list[str]:
    """One sentence with every reason the model of ``key`` is near chance, or none."""
    report = info.get("report") if isinstance(info, dict) else None
    report = report if isinstance(report, dict) else {}
    model, dataset = key.split("|", 1) if "|" in key else (key, "")

    def known(values) -> bool:
        return bool(values) and not any(v is None or np.isnan(v) for v in values)

    reasons = []
    dice = report.get("mean_dice_ci")
    if known(dice) and report.get("chance_dice") is not None and dice[0] <= report["chance_dice"]:
        reasons.append(f"mean Dice {report['mean_dice']:.2f} (95% CI {dice[0]:.2f} to {dice[1]:.2f}) "
                       f"is not above a random mask of its predicted volume "
                       f"({report['chance_dice']:.2f})")
    if report.get("collapsed_onto"):
        reasons.append(f"its decisions collapse onto {', '.join(report['collapsed_onto'])}")
    balanced, chance = report.get("balanced_accuracy_ci"), report.get("chance_balanced_accuracy")
    if known(balanced) and chance is not None and balanced[0] <= chance:
        reasons.append(f"balanced accuracy {report['balanced_accuracy']:.2f} (95% CI "
                       f"{balanced[0]:.2f} to {balanced[1]:.2f}) is not above chance ({chance:.2f})")
    majority, accuracy = report.get("majority_rate"), report.get("accuracy")
    if majority is not None and accuracy is not None and accuracy <= majority:
        reasons.append(f"accuracy {accuracy:.2f} is not above the majority-class rate "
                       f"({majority:.2f}), what always answering the most frequent class scores")
    interval = report.get("macro_auroc_ci")
    if known(interval) and interval[0] <= 0.5 <= interval[1]:
        reasons.append(f"macro AUROC {report['macro_auroc']:.2f} (95% CI {interval[0]:.2f} to "
                       f"{interval[1]:.2f}) includes 0.5")
    if not reasons:
        return []
    what = "lesions" if dice else "findings"
    return [f"The model {model} performs near chance on {dataset}: {'; '.join(reasons)}. Its "
            f"explanations say little about the {what}; improve the model first."]


def dice_per_case(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Dice 2|P∩T|/(|P|+|T|) per case and channel, (B, K); 1 when both are empty (BraTS rule)."""
    pred, true = pred.bool().flatten(2), true.bool().flatten(2)
    inter = (pred & true).sum(-1).float()
    total = pred.sum(-1).float() + true.sum(-1).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def hd95_per_case(pred: torch.Tensor, true: torch.Tensor,
                  spacing: Sequence[float] | None = None) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance per case and channel, (B, K), in the units of
    ``spacing`` (voxels if None); NaN where either mask is empty (excluded from means)."""
    from monai.metrics import compute_hausdorff_distance

    out = torch.full(pred.shape[:2], float("nan"))
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated `always_return_as_numpy` to get_mask_edges and
        # warns about it on every call: a warning about MONAI's code, not the user's
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        for b in range(pred.shape[0]):
            for k in range(pred.shape[1]):
                if pred[b, k].any() and true[b, k].any():
                    out[b, k] = compute_hausdorff_distance(
                        pred[b:b + 1, k:k + 1].float(), true[b:b + 1, k:k + 1].float(),
                        percentile=95, spacing=None if spacing is None else list(spacing)).item()
    return out


def segmentation_report(pred: torch.Tensor, true: torch.Tensor, region_names: Sequence[str],
                        spacing: Sequence[float] | None = None) -> dict:
    """Mean Dice and HD95 per region over cases, and their mean over regions."""
    dice = dice_per_case(pred, true)
    hd = hd95_per_case(pred, true, spacing)
    per_region = {}
    for k, name in enumerate(region_names):
        hk = hd[:, k][~torch.isnan(hd[:, k])]
        per_region[name] = {"dice": float(dice[:, k].mean()),
                            "hd95": float(hk.mean()) if len(hk) else float("nan"),
                            "hd95_cases": len(hk)}
    pred_f = pred.bool().flatten(2).float().mean(-1)
    true_f = true.bool().flatten(2).float().mean(-1)
    # a random mask of the predicted volume: expected Dice 2 p q / (p + q) (1 when both are empty)
    chance = torch.where(pred_f + true_f > 0, 2 * pred_f * true_f / (pred_f + true_f).clamp_min(1e-12),
                         torch.ones_like(pred_f))
    per_case = dice.double().mean(1).numpy()
    rng = np.random.default_rng(0)
    boots = [float(per_case[rng.integers(0, len(per_case), len(per_case))].mean())
             for _ in range(1000)]
    return {"mean_dice": float(dice.mean()),
            "mean_dice_ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "chance_dice": float(chance.mean()),
            "mean_hd95": float(np.nanmean([v["hd95"] for v in per_region.values()]))
            if any(v["hd95_cases"] for v in per_region.values()) else float("nan"),
            "per_region": per_region, "n": int(pred.shape[0])}


def concordance_index(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Harrell's C-index with every event observed: over pairs with different observed times, the
    fraction whose predicted times are ordered the same way (ties in prediction count 1/2)."""
    p, t = np.asarray(predicted, float), np.asarray(observed, float)
    dt = np.sign(t[:, None] - t[None, :])
    dp = np.sign(p[:, None] - p[None, :])
    usable = np.triu(dt != 0, 1)
    if not usable.any():
        return float("nan")
    agree = (dt == dp) & (dp != 0)
    ties = dp == 0
    return float((agree[usable].sum() + 0.5 * ties[usable].sum()) / usable.sum())


def regression_report(pred: np.ndarray, true: np.ndarray, names: Sequence[str]) -> dict:
    """MAE, RMSE, R^2, Pearson r and C-index per output, and the first output's at the top level."""
    pred, true = np.atleast_2d(np.asarray(pred, float)), np.atleast_2d(np.asarray(true, float))
    per_output = {}
    for k, name in enumerate(names):
        p, t = pred[:, k], true[:, k]
        err = p - t
        ss_tot = float(((t - t.mean()) ** 2).sum())
        per_output[name] = {
            "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": 1 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            "pearson_r": float(np.corrcoef(p, t)[0, 1]) if p.std() > 0 and t.std() > 0
            else float("nan"),
            "c_index": concordance_index(p, t)}
    first = per_output[names[0]]
    return {**first, "per_output": per_output, "n": int(pred.shape[0])}
