"""A light classifier on fingerprints: logistic regression fitted on example tiles (and random
background tiles as extra negatives), then scored over every tile of the store through the
search engine (:class:`~pipeline.search.scorers.LinearScorer`, the same map and reductions).

Training set: the positives (label 1), the negatives (label 0) and ``background`` tiles drawn at
random from the store's searchable tiles, away from every example (label 0: most of an archive is
not what one hunts for). Features: fingerprints after the store's post-processing (what the
index searches). scikit-learn's ``LogisticRegression(class_weight="balanced")``. The reported
quality is the average precision of out-of-fold probabilities (stratified k-fold, k up to 5)
over that training set.

A saved model (JSON) carries the coefficients and the scoring signature of the store it was
fitted on (model, weights, preprocessing, post-processing): loading it into a store whose
fingerprints differ is refused.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SearchError
from pipeline.search.kernels import ExampleSet, overlaps
from pipeline.search.scorers import LinearScorer

FORMAT = "aerial-search logistic regression v1"


@dataclass
class Classifier:
    """Coefficients on post-processed fingerprints, and where they come from."""

    coef: np.ndarray  # (dim,)
    intercept: float
    signature: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def scorer(self) -> LinearScorer:
        return LinearScorer(self.coef[None, :].astype(np.float32), np.array([self.intercept], np.float64))

    def query_of(self, query: dict[str, Any]) -> dict[str, Any]:
        """The description of the example set it was fitted on, as the query of this model."""
        return {**query, "type": "classifier", "cv_average_precision": self.info.get("cv_average_precision"),
                "label": f"classifier on {query['label']}"}  # fmt: skip

    def save(self, path: str | Path) -> None:
        doc = {"format": FORMAT, "coef": self.coef.tolist(), "intercept": self.intercept,
               "signature": self.signature, **self.info}  # fmt: skip
        Path(path).write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Classifier:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            coef = np.asarray(doc.pop("coef"), dtype=np.float64)
            return cls(coef, float(doc.pop("intercept")), doc.pop("signature"), doc)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SearchError(f"--load {p} is not a model saved by `aerial-search classify --save` ({e})") from None

    def check(self, signature: dict[str, Any], where: str) -> None:
        """Refuse scoring fingerprints unlike those the model was fitted on."""
        diff = {k: (self.signature.get(k), v) for k, v in signature.items() if self.signature.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: model {a!r} vs store {b!r}" for k, (a, b) in diff.items())
            raise SearchError(
                f"{where} was fitted on other fingerprints than this store's ({detail}); refit it here with "
                f"`aerial-search classify --store STORE --examples FILE --save MODEL`"
            )


def background_rows(index: Any, es: ExampleSet, n: int, seed: int = 0) -> np.ndarray:
    """Slots of ``n`` random searchable tiles that overlap no example."""
    ds = index.ds
    valid = ds["valid"].values.copy()
    image = ds["image"].values
    if index.usable is not None:
        valid &= (image >= 0) & index.usable[np.clip(image, 0, None)]
    rows, cols = ds["row"].values, ds["col"].values
    lon, lat = ds["lon"].values, ds["lat"].values
    half = index.half_m[np.clip(image, 0, None)]
    for q in (es.positives, es.negatives):
        for j in range(len(q)):
            valid &= ~overlaps(image, rows, cols, lon, lat, half,
                               q.image[j], q.row[j], q.col[j], q.lon[j], q.lat[j], q.half_m[j])  # fmt: skip
    pool = np.flatnonzero(valid)
    if not len(pool):
        return pool
    return np.sort(np.random.default_rng(seed).choice(pool, min(n, len(pool)), replace=False))


def fit(index: Any, es: ExampleSet, background: int = 200, seed: int = 0) -> Classifier:
    """Fit on the example set's positives and negatives and ``background`` random tiles."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if not len(es.positives):
        raise SearchError("classify needs at least one positive example (label 'positive')")
    t = index.postprocess
    rows = background_rows(index, es, background, seed)
    bg = t.apply(index.fingerprints_at(rows)) if len(rows) else np.zeros((0, index.ds.sizes["feature"]), np.float32)
    neg = t.apply(es.negatives.fingerprints) if len(es.negatives) else bg[:0]
    x = np.concatenate([t.apply(es.positives.fingerprints), neg, bg]).astype(np.float64)
    y = np.concatenate([np.ones(len(es.positives)), np.zeros(len(neg) + len(bg))])
    if (y == 0).sum() == 0:
        raise SearchError("classify needs negatives: give negative examples or --background N > 0")
    model = LogisticRegression(class_weight="balanced", max_iter=2000)
    model.fit(x, y)
    folds = int(min(5, (y == 1).sum(), (y == 0).sum()))
    cv_ap = None
    if folds >= 2:
        proba = cross_val_predict(
            LogisticRegression(class_weight="balanced", max_iter=2000), x, y,
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba",
        )[:, 1]  # fmt: skip
        cv_ap = float(average_precision_score(y, proba))
    info = {
        "positives": int(len(es.positives)), "negatives": int(len(neg)), "background": int(len(bg)),
        "cv_folds": folds, "cv_average_precision": cv_ap,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    return Classifier(model.coef_[0].astype(np.float64), float(model.intercept_[0]), index.scoring_signature(), info)
