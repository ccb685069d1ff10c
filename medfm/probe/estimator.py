"""The scikit-learn estimator contract without importing scikit-learn (1.5 s at start-up).

Probes follow scikit-learn's conventions (STYLE.md): `__init__` stores keyword parameters only,
`fit` learns and returns `self`, learned state ends in `_`. `get_params`/`set_params` come from
the `__init__` signature, so `sklearn.base.clone` and `joblib` work on probes as on any
scikit-learn estimator; `score` is MedMNIST ACC.
"""

from __future__ import annotations

import inspect

import numpy as np

from medfm.probe.targets import predict_from_proba


class ProbeEstimator:
    """Base of the probes: parameters from `__init__`, predictions from `predict_proba`."""

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p.name for p in signature.parameters.values()
                if p.name != "self" and p.kind is p.KEYWORD_ONLY]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters, by name (scikit-learn's contract)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> ProbeEstimator:
        """Set constructor parameters by name; unknown names are an error."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r}; "
                                 f"valid: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def predict_proba(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class ids (argmax; binary: P(class 1) > 0.5), or (N, L) 0/1 for multi-label."""
        return predict_from_proba(self.predict_proba(X), self.task_, self.classes_)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """MedMNIST ACC of `predict` (multi-label: mean per-label accuracy at 0.5)."""
        pred = self.predict(X)
        return float(np.mean(pred == np.asarray(y).reshape(pred.shape)))
