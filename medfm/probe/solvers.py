"""Solvers of one L2-regularized logistic regression, behind one interface: sklearn, torch, cuml.

Objective, identical in every solver (scikit-learn's):

    C * sum_i loss_i(W, b) + 0.5 * ||W||_F^2          (intercept b not penalized)

with loss_i the logistic loss of one logit (binary), the softmax cross-entropy over K logits
(multinomial), or the sum of L independent logistic losses (multilabel: L separate binary
problems; torch solves them jointly since they share nothing, sklearn and cuml one by one).
Every solver minimizes it divided by C * n (the same minimizer; scikit-learn's scaling) with
L-BFGS; sklearn and torch stop when the largest absolute gradient component is below `tol`
(scipy's gtol, as scikit-learn uses it) or after `max_iter` iterations, cuML by its own rule
(relative to the objective: medfm.probe.cuml_solver); `converged` says which.

- `sklearn`: LogisticRegression(solver="lbfgs", warm_start=True), float64, CPU.
- `torch`: L-BFGS (torch.optim.LBFGS's step as a function, medfm.probe.lbfgs: strong-Wolfe line
  search, history 10) on float32 tensors, full batch, CPU or CUDA: two (B, D) x (D, K) matmuls
  per block of B rows per evaluation.
- `batched`: L-BFGS with a batch dimension (medfm.probe.batched): every C of the grid solved
  together from zero, one (N, D) x (D, 13 K') product per evaluation, no host synchronization
  inside the iterations; or, on a CPU, the walk with its line search on cached logits (two
  products per iteration, whatever the search tries). float32 tensors, CPU or CUDA.
- `cuml`: cuML's quasi-Newton LogisticRegression on a GPU. cuML averages the loss over samples
  and, with penalty_normalized=True, divides the penalty by n too, which is exactly the scaled
  objective above: the same C is the same problem. cuML has no warm start; each C starts cold
  (its arguments by release, and the data uploaded once: medfm.probe.cuml_solver).
- `auto` (`resolve_solver`): on a GPU, batched (cuML stays a choice by name); on a CPU, sklearn
  for small problems and batched from TORCH_MIN_WORK on (rows x features x logits: float32
  L-BFGS in torch is 2-4x faster per fit there, and worth its 3 s import). `medfm probe`
  decides once per call, for its largest problem, so one call never imports both.

A solver that computes on torch's CPU thread pool says so (`torch_threads`): the probe then
holds numpy's BLAS to one thread while it fits (medfm.probe.methods.logreg).

A solver is a way to compute, not part of what is computed: every solver minimizes the same
objective to the same tolerance, so a result's key does not name it; its row does (`solver`,
`device`). A solver is built once per training matrix and then walked along a C grid: `fit(C)`
starts from the previous solution (warm start) unless given `init`. A solver that can solve
the whole grid at once says so (`solves_path`: the batched solver on CUDA) and is asked
`fit_path(Cs)` instead.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np

from medfm.errors import InvalidArgumentError
from medfm.probe.objective import (  # noqa: F401 - KINDS and the defaults are read from here too
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    KINDS,
    LBFGS_HISTORY,
    Solution,
)
from medfm.resolve.defaults import SOLVERS
from medfm.runtime import device_type

TORCH_MIN_WORK = 2_000_000  # auto on a CPU: torch from this many rows x features x logits up
EVALS_PER_ITER = 4  # torch: function evaluations allowed per iteration (line search included)
BLOCK_ROWS = 8192  # torch: rows per block of an evaluation (logits and gradient while cached)


def cuml_available() -> bool:
    """Whether cuML imports here (it needs a CUDA GPU and RAPIDS)."""
    if importlib.util.find_spec("cuml") is None:
        return False
    try:
        import cuml  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken RAPIDS install fails in many ways
        return False
    return True


def resolve_solver(solver: str, *, device: str | None = None, work: int | None = None) -> str:
    """The concrete solver for `solver` (module docstring); an unavailable explicit choice is
    an error saying what to use. `work` (rows x features x logits) sizes the CPU choice."""
    if solver not in SOLVERS:
        raise InvalidArgumentError(
            f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}.")
    if solver == "auto":
        if device_type(device) == "cuda":
            return "batched"
        large = work is not None and work >= TORCH_MIN_WORK
        return "batched" if large and importlib.util.find_spec("torch") else "sklearn"
    if solver == "cuml" and not cuml_available():
        raise InvalidArgumentError("solver cuml asked for, but cuML does not import here; install "
                                   "RAPIDS cuML on a CUDA machine, or use --solver torch.")
    if solver in ("torch", "batched") and importlib.util.find_spec("torch") is None:
        raise InvalidArgumentError(f"solver {solver} asked for, but torch is not installed; "
                                   "use --solver sklearn.")
    return solver


class SklearnSolver:
    """scikit-learn's lbfgs LogisticRegression, warm-started along the grid (one per label for
    multilabel)."""

    name, device_type = "sklearn", "cpu"
    solves_path = False  # walks the grid one C at a time
    torch_threads = False  # computes through numpy/scipy's BLAS

    def __init__(self, X: np.ndarray, Y: np.ndarray, kind: str, *, max_iter: int, tol: float):
        self.X, self.Y, self.kind = X, Y, kind
        self.max_iter, self.tol = max_iter, tol
        columns = Y.shape[1] if kind == "multilabel" else 1
        self.models = [self._model() for _ in range(columns)]

    def _model(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(solver="lbfgs", warm_start=True, max_iter=self.max_iter,
                                  tol=self.tol)

    def fit(self, C: float, init: Solution | None = None) -> Solution:
        from sklearn.exceptions import ConvergenceWarning

        targets = ([self.Y[:, j] for j in range(self.Y.shape[1])] if self.kind == "multilabel"
                   else [self.Y])
        coefs, intercepts, iters = [], [], []
        for j, (model, y) in enumerate(zip(self.models, targets, strict=True)):
            if init is not None:  # warm start from a given solution
                rows = slice(j, j + 1) if self.kind == "multilabel" else slice(None)
                model.coef_, model.intercept_ = init.coef[rows].copy(), init.intercept[rows].copy()
            model.set_params(C=C)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as `converged`
                model.fit(self.X, y)
            coefs.append(model.coef_)
            intercepts.append(model.intercept_)
            iters.append(int(np.max(model.n_iter_)))
        return Solution(np.concatenate(coefs).astype(np.float64),
                        np.concatenate(intercepts).astype(np.float64),
                        max(iters), max(iters) < self.max_iter)


class TorchSolver:
    """Full-batch L-BFGS in torch on float32, CPU or CUDA, warm-started along the grid."""

    name = "torch"
    solves_path = False  # walks the grid one C at a time
    torch_threads = True  # computes on torch's thread pool (on a CPU)

    def __init__(self, X: np.ndarray, Y: np.ndarray, kind: str, *, max_iter: int, tol: float,
                 device: str | None = None, n_classes: int | None = None):
        import torch

        self.torch = torch
        self.device = torch.device(device_type(device))
        self.device_type = self.device.type
        self.kind, self.max_iter, self.tol = kind, max_iter, tol
        self.X = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=self.device)
        if kind == "multinomial":
            self.Y = torch.as_tensor(Y, dtype=torch.long, device=self.device)
            width = n_classes or int(Y.max()) + 1
        else:
            self.Y = torch.as_tensor(Y.reshape(len(Y), -1), dtype=torch.float32,
                                     device=self.device)
            width = self.Y.shape[1]
        self._block_rows = torch.arange(min(BLOCK_ROWS, len(X)), device=self.device)
        self._minus_one = torch.tensor(-1.0, device=self.device)
        self.W = torch.zeros(X.shape[1], width, device=self.device)  # (D, K')
        self.b = torch.zeros(width, device=self.device)  # (K',)

    def _objective(self, W, b, C: float):
        """(mean loss + ||W||^2 / (2 C n), dW, db): the objective divided by C * n.

        Rows go through in blocks of BLOCK_ROWS, each block's logits and gradient product
        computed while it is in cache, so X crosses memory once per evaluation instead of twice;
        the gradient is written out so the big product is G^T X (X^T G is ~10x slower).
        """
        torch, n = self.torch, len(self.X)
        width = W.shape[1]
        grad_t = torch.zeros(width, W.shape[0], device=self.device)  # (K', D)
        grad_b = torch.zeros(width, device=self.device)
        # reduce in float64: a float32 sum cannot resolve the last decreases the line search needs
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        rows, minus_one = self._block_rows, self._minus_one  # softmax - one-hot, per block
        for lo in range(0, n, BLOCK_ROWS):
            X, Y = self.X[lo:lo + BLOCK_ROWS], self.Y[lo:lo + BLOCK_ROWS]
            logits = torch.addmm(b, X, W)  # (B, K')
            if self.kind == "multinomial":
                log_norm = torch.logsumexp(logits, dim=1)  # (B,)
                loss += (log_norm - logits.gather(1, Y[:, None])[:, 0]).double().sum()
                residual = logits.sub_(log_norm[:, None]).exp_()  # softmax (B, K), in place
                residual.index_put_((rows[:len(Y)], Y), minus_one, accumulate=True)
            else:  # logistic loss per column, summed over labels
                loss += (torch.nn.functional.softplus(logits) - Y * logits).double().sum()
                residual = torch.sigmoid(logits) - Y  # (B, K')
            grad_t.addmm_(residual.T, X)
            grad_b += residual.sum(dim=0)
        grad_W = grad_t.T / n + W / (C * n)  # (D, K')
        loss = loss / n + (W.double() ** 2).sum() / (2.0 * C * n)
        return loss, grad_W.contiguous(), grad_b / n

    def fit(self, C: float, init: Solution | None = None) -> Solution:
        from medfm.probe.lbfgs import minimize  # torch: only for this solver

        torch = self.torch
        if init is not None:
            self.W = torch.as_tensor(init.coef.T, dtype=torch.float32, device=self.device)
            self.b = torch.as_tensor(init.intercept, dtype=torch.float32, device=self.device)
        shape, size = self.W.shape, self.W.numel()  # (D, K'); x = [W row-major, b]

        def objective(x):
            loss, grad_W, grad_b = self._objective(x[:size].view(shape), x[size:], C)
            return loss.item(), torch.cat([grad_W.reshape(-1), grad_b])

        x, result = minimize(objective, torch.cat([self.W.reshape(-1), self.b]),
                             max_iter=self.max_iter, max_eval=EVALS_PER_ITER * self.max_iter,
                             tolerance_grad=self.tol, history_size=LBFGS_HISTORY)
        self.W, self.b = x[:size].view(shape), x[size:]
        largest = result.grad.abs().max().item()
        return Solution(self.W.T.double().cpu().numpy(), self.b.double().cpu().numpy(),
                        result.n_iter, largest <= self.tol)


def make_solver(solver: str, X: np.ndarray, Y: np.ndarray, kind: str, *,
                max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
                device: str | None = None, n_classes: int | None = None,
                precondition: bool | None = None):
    """A solver for standardized X (N, D) (numpy, or a torch tensor the batched solver keeps on
    its device) and targets Y: (N,) 0/1 (binary), (N,) class index
    (multinomial, `n_classes` columns) or (N, L) 0/1 (multilabel); `solver` may be "auto".
    `precondition` is the batched solver's (None: by the problem's size; medfm.probe.batched)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    width = n_classes if kind == "multinomial" else (Y.shape[1] if Y.ndim == 2 else 1)
    solver = resolve_solver(solver, device=device, work=int(np.prod(X.shape)) * (width or 1))
    if solver != "batched" and not isinstance(X, np.ndarray):  # a tensor on a device
        X = X.cpu().numpy()
    if solver == "sklearn":
        return SklearnSolver(X, Y, kind, max_iter=max_iter, tol=tol)
    if solver == "torch":
        return TorchSolver(X, Y, kind, max_iter=max_iter, tol=tol, device=device,
                           n_classes=n_classes)
    if solver == "batched":
        from medfm.probe.batched import BatchedSolver  # torch is imported only to fit with it

        return BatchedSolver(X, Y, kind, max_iter=max_iter, tol=tol, device=device,
                             n_classes=n_classes, precondition=precondition)
    from medfm.probe.cuml_solver import CumlSolver  # cuML's version gates live there

    return CumlSolver(X, Y, kind, max_iter=max_iter, tol=tol)
