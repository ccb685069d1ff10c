"""Batched L-BFGS: many independent logistic regressions of one training matrix solved together.

    from medfm.probe.batched import BatchedSolver
    solver = BatchedSolver(Z, y, "multinomial", max_iter=100, tol=1e-4, device="cuda")
    solutions = solver.fit_path(C_GRID)     # every C at once: one (N, D) x (D, P * K') product
    solution = solver.fit(1e-3)             # one C, warm-started from the last fit (the walk)

Objective of problem p (scikit-learn's, divided by C_p * n, as medfm.probe.solvers states it):

    f_p(W, b) = mean_i loss_i(Z_i W_p^T + b_p) + ||W_p||^2 / (2 C_p n)

The P problems share Z (N, D), so one evaluation of all of them is two matrix products of Z with
the stacked weights (P * K', D): the logits (N, P * K') and the gradient (P * K', D). That turns
K' = 9 columns of memory-bound work into P * K' columns of compute-bound work on a GPU.

The iteration is L-BFGS (history 10, scipy's and scikit-learn's memory) with a batch dimension:
- per-problem curvature pairs (a pair with y.s <= 1e-10 is kept as a no-op for that problem);
- a backtracking line search on cached logits: for a direction d, the products Z d are
  computed once, and the objective's slope at any step t follows from the logits + t * (Z d),
  with no pass over Z. Candidate steps are LADDER's fractions of the initial step (1, or
  min(1, 1 / |g|_1) before any curvature is known, as torch.optim.LBFGS starts); each problem
  takes the largest whose slope is still <= ARMIJO * g.d. The objective is convex along d, so
  that step also decreases it by at least ARMIJO * t * |g.d| (Armijo's condition), and the test
  reads the slope, a sum of products, rather than a difference of two nearly equal losses, which
  float32 products cannot resolve near the minimum. On a CPU the candidates are tried one after
  the other and the search stops once every problem has its step; on CUDA all LADDER candidates
  are evaluated with no host synchronization. Both choose the same step, and the residual at it
  gives the next gradient. A problem none of whose candidates descends enough does not move and
  restarts: its pairs are forgotten and its next step is scaled steepest descent (y.s / y.y of
  its last pair times -g).
- per-problem convergence: a problem whose largest absolute gradient component is <= tol (the
  stopping rule of the other solvers), whose direction stops descending, or whose line search
  finds no step even from a restart stops moving; the loop ends when all have stopped (asked
  every iteration on a CPU, every CHECK_EVERY on CUDA) or after max_iter iterations.
- on the walk (`fit`, one C after another), the next C starts from the last solution and from
  its curvature pairs: only the penalty differs between two C values, so a pair (s, y) stays
  exact once y gains (lam' - lam) s on the weights, and the first step is quasi-Newton, not
  steepest descent (about 20% fewer iterations on a PathMNIST-shaped store).
- preconditioned (`Preconditioner.wanted`: from PRECONDITION_MIN_WORK rows x features x
  logits, where the rows outnumber the features and the eigendecomposition is small beside an
  iteration, EIGEN_PER_WORK): backbone features are strongly correlated (the
  correlation matrix of a PathMNIST-shaped store spans eigenvalues 0.08 to 60), which is what
  makes L-BFGS take ~100 iterations. The initial inverse Hessian of the two-loop recursion is
  then gamma * M^-1 instead of gamma * I, with M_k = a_k S + lam I per class: S the correlation
  matrix of the standardized features (eigendecomposed once per training matrix, from at most
  PRECONDITION_ROWS evenly spaced rows), a_k the mean p_k (1 - p_k) at the start of the fit
  (the logistic curvature), gamma = y.s / y.M^-1 y from the last pair (L-BFGS's scaling in M's
  metric), and 1 / a_k for the unpenalized intercepts. So the first step is close to Newton's
  and the pairs only correct what M misses: about half the iterations of the plain walk on the
  PathMNIST-shaped store (102 -> 47 at fraction 1.0). M changes only the path to the minimum,
  not the minimum, nor when a problem counts as converged (the same gradient rule).
Each accepted step costs two products (Z d, and the gradient), whatever the line search tried.
The products are float32; logits, residuals and the slope's sums are float64, so the line search
resolves steps far below float32's resolution of a logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medfm.probe.objective import DEFAULT_MAX_ITER, DEFAULT_TOL, LBFGS_HISTORY, Solution
from medfm.runtime import device_type

ARMIJO = 1e-4  # a step t is taken if the slope there is still <= ARMIJO * g.d (the objective
#                being convex, that implies f(x + t d) <= f(x) + ARMIJO * t * g.d: Armijo's rule)
LADDER = (1.0, 0.5, 0.25, 0.125, 1 / 32, 1 / 128, 1 / 1024)  # candidate steps, times the
#   initial step, largest first: L-BFGS takes the first in ~80% of iterations and rarely needs
#   the fourth; the sparse tail covers badly scaled directions at little cost
CHECK_EVERY = 8  # CUDA: iterations between the host checks of "has every problem stopped?"
CURVATURE_EPS = 1e-10  # a curvature pair with y.s at or below this is not used (torch's rule)
PRECONDITION_MIN_WORK = 50_000_000  # rows x features x logits from which a fit is preconditioned:
#   below it the eigendecomposition (~0.3 s for 1280 features on 2 cores) costs more than the
#   iterations it saves (PathMNIST-shaped, 2 cores: fraction 0.1, 9k rows, 1.76 -> 1.05 + 0.36 s)
PRECONDITION_ROWS = 4096  # rows whose correlation matrix gives M's eigenbasis: as good a
#   preconditioner as 16k rows on the PathMNIST-shaped store (47 iterations each), at a third
EIGEN_PER_WORK = 32  # preconditioned only where rows x logits x this >= features^2: PathMNIST
#   fractions 0.1 and 1.0 at 1280 features (81k and 810k rows x logits vs 51k), not a 20k-row
#   binary fit of 4096 features, whose eigendecomposition (~7 s on 2 cores) outweighs it
EIGEN_FLOOR = 1e-3  # S's diagonal gains this fraction of its mean (eigenvalues >= it): M^-1
#   stays bounded where a subsample leaves directions unseen


class BatchedProblems:
    """P logistic problems on one standardized matrix Z: their logits, residuals, gradients and
    penalties. Parameters are flat per problem, x (P, K' * D + K'): weights row-major, then
    intercepts."""

    def __init__(self, Z: torch.Tensor, target: torch.Tensor, kind: str, width: int):
        self.Z, self.kind, self.width = Z, kind, width  # Z (N, D) float32
        self.target = target  # (N,) class ids (multinomial) or (N, K') 0/1 float32
        self.n, self.dim = Z.shape

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (P * K', D), intercepts (P, K')) of flat parameters x (P, F)."""
        k, d = self.width, self.dim
        return x[:, :k * d].reshape(-1, d), x[:, k * d:]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, K') float64 logits of every problem: one float32 product, kept in float64 so
        the line search resolves steps far below float32's resolution of a logit."""
        W, b = self.split(x)
        return (self.Z @ W.T).view(self.n, -1, self.width).double() + b.double()

    def residual(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, P, K') float64 derivative of the summed loss with respect to the logits."""
        if self.kind == "multinomial":  # softmax - one-hot (a scatter: no host sync on CUDA)
            true = self.target.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
            return torch.softmax(logits, dim=2).scatter_add_(
                2, true, torch.full(true.shape, -1.0, dtype=logits.dtype, device=logits.device))
        return torch.sigmoid(logits) - self.target[:, None, :]

    def gradient(self, x: torch.Tensor, residual: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """(P, F) gradient of every objective at x, whose residual is given: one product."""
        P = x.shape[0]
        grad_W = self._residual_products(residual.view(self.n, -1).float()).view(P, -1) / self.n
        #   (P, K' * D)
        W, _ = self.split(x)
        grad_W += lam[:, None] * W.reshape(P, -1)
        return torch.cat([grad_W, residual.sum(dim=0).float() / self.n], dim=1)

    def _residual_products(self, flat: torch.Tensor) -> torch.Tensor:
        """flat^T Z (P * K', D). On a CPU as a batch of row blocks, one per thread, summed: MKL
        does not split a product's long inner dimension among threads, so R^T Z for a 90k x 1280
        Z took 80 ms on 2 cores, and 45 ms as 2 blocks (bmm gives each thread a block)."""
        blocks = torch.get_num_threads() if self.Z.device.type == "cpu" else 1
        rows = self.n // blocks * blocks if self.n >= 64 * blocks else 0
        if blocks < 2 or rows == 0:
            return flat.T @ self.Z
        Z, width = self.Z[:rows].view(blocks, -1, self.dim), flat.shape[1]
        product = torch.bmm(flat[:rows].view(blocks, -1, width).transpose(1, 2), Z).sum(0)
        if rows < self.n:  # the last n % blocks rows
            product += flat[rows:].T @ self.Z[rows:]
        return product

    def penalty_parts(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(W.dW, |dW|^2) per problem, float64: the penalty's slope along x + t d is
        lam * (W.dW + t |dW|^2)."""
        w = self.width * self.dim
        W, dW = x[:, :w].double(), d[:, :w].double()
        return (W * dW).sum(1), (dW * dW).sum(1)


class Preconditioner:
    """M's eigenbasis for one standardized training matrix (module docstring): S = V diag(ev) V^T
    from at most PRECONDITION_ROWS evenly spaced rows of Z."""

    def __init__(self, Z: torch.Tensor):
        rows = Z[::max(1, len(Z) // PRECONDITION_ROWS)][:PRECONDITION_ROWS]
        S = (rows.T @ rows) / len(rows)
        floor = EIGEN_FLOOR * float(S.diagonal().mean().clamp_min(1e-12))
        S.diagonal().add_(floor)  # eigenvalues >= floor: what M^-1 may amplify, and what keeps
        #   the eigensolver converging where S is rank-deficient (fewer rows than features)
        self.V = self.ev = None  # no basis: the plain iteration
        for dtype in (torch.float32, torch.float64):  # float64 costs 1.6x: only if float32 fails
            try:
                ev, V = torch.linalg.eigh(S.to(dtype))
            except torch.linalg.LinAlgError:
                continue
            self.V, self.ev = V.to(Z.dtype), ev.clamp_min(floor).to(Z.dtype)
            break

    @staticmethod
    def wanted(n: int, dim: int, width: int) -> bool:
        """Whether a fit of this shape is preconditioned by default (module docstring): enough
        work, more rows than features, and an eigendecomposition (~dim^3) small beside one
        iteration's products (~n dim width) times the iterations it saves."""
        return (n > dim and n * dim * width >= PRECONDITION_MIN_WORK
                and n * width * EIGEN_PER_WORK >= dim * dim)

    def at(self, problems: BatchedProblems, logits: torch.Tensor):
        """M^-1 as a function of (q (P, F), lam (P,)) for problems whose logits are `logits`:
        their curvature a_k = mean p_k (1 - p_k) there. None where no basis was found."""
        if self.V is None:
            return None
        p = torch.softmax(logits, dim=2) if problems.kind == "multinomial" else torch.sigmoid(
            logits)
        a = (p * (1.0 - p)).mean(dim=0).clamp_min(1e-3).to(self.V.dtype)  # (P, K')
        k, d, V, ev = problems.width, problems.dim, self.V, self.ev

        def apply(q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            qW = q[:, :k * d].reshape(len(q), k, d)
            rW = ((qW @ V) / (a[:, :, None] * ev + lam.to(V.dtype)[:, None, None])) @ V.T
            return torch.cat([rW.reshape(len(q), -1), q[:, k * d:] / a], dim=1)

        return apply


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem dot product of (P, F) tensors, float64."""
    return (a.double() * b.double()).sum(dim=1)


@dataclass
class Memory:
    """The curvature pairs a minimization ended with, to start the next C of a walk from: only
    the penalty differs between two C values, so each pair carries over exactly once its y is
    corrected by (lam' - lam) s on the weights (the intercept is not penalized)."""

    pairs: list  # [s (P, F), y (P, F), rho (P,)], oldest first
    H_diag: torch.Tensor  # (P,) y.s / y.y of the last used pair
    scaled: torch.Tensor  # (P,) bool: whether H_diag comes from a pair
    lam: torch.Tensor  # (P,) 1 / (C n) the pairs were measured under

    def carried(self, lam: torch.Tensor, n_weights: int, precond=None) -> Memory:
        """These pairs for the objectives with penalty `lam` (scaled in `precond`'s metric)."""
        delta = (lam - self.lam).to(self.H_diag.dtype)[:, None]
        pairs, H_diag, scaled = [], self.H_diag.clone(), self.scaled.clone()
        for s, y, _ in self.pairs:
            y = y.clone()
            y[:, :n_weights] += delta * s[:, :n_weights]
            ys = _dot(y, s)
            usable = ys > CURVATURE_EPS
            pairs.append([s, y, torch.where(usable, 1.0 / ys.clamp_min(CURVATURE_EPS),
                                            0.0).to(y.dtype)])
        # each problem's scaling comes from its newest usable pair: newest first, so M^-1 is
        # applied once per walk step, not once per kept pair
        unset = torch.ones_like(scaled)
        for s, y, rho in reversed(pairs):
            usable = unset & (rho > 0)
            if not bool(usable.any()):
                continue
            yy = _dot(y, y if precond is None else precond(y, lam))
            H_diag = torch.where(usable, (_dot(y, s) / yy.clamp_min(1e-300)).to(y.dtype), H_diag)
            scaled, unset = scaled | usable, unset & ~usable
            if not bool(unset.any()):
                break
        return Memory(pairs, H_diag, scaled, lam)


@torch.no_grad()
def minimize(problems: BatchedProblems, x0: torch.Tensor, lam: torch.Tensor, *,
             max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
             history_size: int = LBFGS_HISTORY, sync_free: bool | None = None,
             memory: Memory | None = None, preconditioner: Preconditioner | None = None):
    """Minimize every problem from x0 (P, F) (module docstring).

    `lam` (P,) is 1 / (C n) per problem. `sync_free` (default: on CUDA) evaluates the whole
    ladder of candidate steps and asks the host whether to stop only every CHECK_EVERY
    iterations. `memory` (from the last C of a walk) starts the iteration from its corrected
    pairs instead of steepest descent. `preconditioner` replaces the identity of the recursion's
    initial inverse Hessian by M^-1. Returns (x (P, F), n_iter (P,) int64, converged (P,)
    bool, Memory).
    """
    if sync_free is None:
        sync_free = x0.device.type == "cuda"
    x = x0.clone()
    lam64 = lam.double()
    logits = problems.logits(x)
    current = problems.residual(logits)  # (N, P, K') float64 at x
    g = problems.gradient(x, current, lam)
    P = x.shape[0]
    active = g.abs().amax(dim=1) > tol  # problems still moving
    precond = None if preconditioner is None else preconditioner.at(problems, logits)
    if memory is None:
        memory = Memory([], torch.ones(P, dtype=x.dtype, device=x.device),
                        torch.zeros(P, dtype=torch.bool, device=x.device), lam)
    else:
        memory = memory.carried(lam, problems.width * problems.dim, precond)
    history = memory.pairs  # [s, y, rho] pairs, rho (P,) 0 where not used
    H_diag = memory.H_diag  # y.s / y.y of the last used pair
    scaled = memory.scaled  # whether H_diag comes from a pair
    restart = ~scaled  # steepest descent this iteration
    n_iter = torch.zeros(P, dtype=torch.long, device=x.device)
    d = t = g_prev = None
    for iteration in range(1, max_iter + 1):
        if (not sync_free or iteration % CHECK_EVERY == 1) and not bool(active.any()):
            break
        # the direction: the two-loop recursion over each problem's kept (s, y) pairs
        if iteration > 1:
            y, s = g - g_prev, d * t[:, None]
            ys = _dot(y, s)
            usable = ys > CURVATURE_EPS
            rho = torch.where(usable, 1.0 / ys.clamp_min(CURVATURE_EPS), 0.0).to(x.dtype)
            yy = _dot(y, y if precond is None else precond(y, lam))  # y.M^-1 y
            H_diag = torch.where(usable, (ys / yy.clamp_min(1e-300)).to(x.dtype), H_diag)
            scaled = scaled | usable
            history.append([s, y, rho])
            if len(history) > history_size:
                history.pop(0)
        for pair in history:  # a restarting problem forgets its pairs (keeps its scaling)
            pair[2] = torch.where(restart, 0.0, pair[2])
        q, alphas = -g, []
        for s_i, y_i, rho_i in reversed(history):
            alpha = rho_i * (s_i * q).sum(1)
            q = q - alpha[:, None] * y_i
            alphas.append(alpha)
        d = (q if precond is None else precond(q, lam)) * H_diag[:, None]
        for (s_i, y_i, rho_i), alpha in zip(history, reversed(alphas), strict=True):
            beta = rho_i * (y_i * d).sum(1)
            d = d + (alpha - beta)[:, None] * s_i
        d = d * active[:, None]  # stopped problems do not move
        # the first step, before any curvature is known, is min(1, 1 / |g|_1), as
        # torch.optim.LBFGS's first; after that, or along M^-1's near-Newton direction, 1
        step0 = (torch.ones_like(H_diag) if precond is not None
                 else torch.where(scaled, 1.0, torch.clamp(1.0 / g.abs().sum(1), max=1.0)))
        # the line search on cached logits: logits + t * dz, the penalty a quadratic in t
        dz = problems.logits(d)  # (N, P, K') change of the logits per unit step: one product
        Wd, d2 = problems.penalty_parts(x, d)
        # g.d, from the same float64 terms as the slopes below, so the two compare exactly
        gtd = (current * dz).sum(dim=(0, 2)) / problems.n + lam64 * Wd
        active = active & (gtd < 0)  # not a descent direction: stop, as torch.optim.LBFGS does
        t = torch.zeros(P, dtype=x.dtype, device=x.device)
        residual = torch.zeros_like(logits)  # at the accepted step
        found = ~active
        for fraction in LADDER:
            step = step0 * fraction
            step64 = step.double()
            trial = problems.residual(logits + step64.view(1, -1, 1) * dz)
            slope = ((trial * dz).sum(dim=(0, 2)) / problems.n
                     + lam64 * (Wd + step64 * d2))  # (P,) d/dt of the objective at the step
            # the objective is convex along d: a slope still <= ARMIJO * g.d at t means it
            # fell by at least ARMIJO * t * |g.d| on the way (f(t) <= f(0) + t f'(t))
            accept = ~found & torch.isfinite(slope) & (slope <= ARMIJO * gtd)
            t = torch.where(accept, step, t)
            residual = torch.where(accept.view(1, -1, 1), trial, residual)
            found = found | accept
            if not sync_free and bool(found.all()):
                break
        stuck = active & (t == 0)  # no candidate step kept descending along d
        active = active & ~(stuck & restart)  # not even from a restart: the problem has stalled
        restart = stuck  # the others start again from steepest descent
        n_iter += (active & ~stuck).long()
        moved = (t > 0).view(1, -1, 1)
        x = x + t[:, None] * d
        logits = logits + t.double().view(1, -1, 1) * dz
        current = torch.where(moved, residual, current)
        g_prev = g
        g = torch.where(moved.view(-1, 1), problems.gradient(x, current, lam), g)
        active = active & (g.abs().amax(dim=1) > tol)
    converged = g.abs().amax(dim=1) <= tol
    return x, n_iter, converged, Memory(history, H_diag, scaled, lam)


class BatchedSolver:
    """Logistic regressions of one standardized training matrix, every C at once (`fit_path`)
    or one C warm-started from the last (`fit`, the walk), on torch float32, CPU or CUDA.
    `precondition`: True, False, or None (default) for `Preconditioner.wanted` by its shape;
    `preconditioned` says what was decided (the basis is computed on the first fit)."""

    name = "batched"
    torch_threads = True  # computes on torch's thread pool (on a CPU)

    def __init__(self, X, Y, kind: str, *, max_iter: int = DEFAULT_MAX_ITER,
                 tol: float = DEFAULT_TOL, device: str | None = None,
                 n_classes: int | None = None, precondition: bool | None = None):
        self.device = torch.device(device_type(device) if not isinstance(X, torch.Tensor)
                                   else X.device.type)
        self.device_type = self.device.type
        self.kind, self.max_iter, self.tol = kind, max_iter, tol
        Z = torch.as_tensor(X, device=self.device)
        self.Z = Z if Z.dtype == torch.float32 else Z.float()
        target = torch.as_tensor(Y, device=self.device)  # numpy or a tensor
        if kind == "multinomial":
            target = target.long()
            width = n_classes or int(target.max()) + 1
        else:
            target = target.float().reshape(len(self.Z), -1)
            width = target.shape[1]
        self.problems = BatchedProblems(self.Z, target, kind, width)
        self.width = width
        self.x = torch.zeros(1, width * self.Z.shape[1] + width, device=self.device)
        self.memory: Memory | None = None  # the walk's curvature pairs, carried to the next C
        self.preconditioned = (Preconditioner.wanted(*self.Z.shape, width) if precondition is None
                               else bool(precondition))
        self._preconditioner: Preconditioner | None = None

    @property
    def preconditioner(self) -> Preconditioner | None:
        """M's basis for this matrix, computed once, or None when not preconditioned."""
        if self.preconditioned and self._preconditioner is None:
            self._preconditioner = Preconditioner(self.Z)
        return self._preconditioner

    @property
    def solves_path(self) -> bool:
        """Whether the probe should ask for the whole grid at once (`fit_path`): on CUDA, where
        13 C values cost about one; on a CPU the warm-started walk does less work."""
        return self.device_type == "cuda"

    def _lam(self, Cs: Sequence[float]) -> torch.Tensor:
        return torch.tensor([1.0 / (float(C) * len(self.Z)) for C in Cs], device=self.device)

    def _solutions(self, x: torch.Tensor, n_iter: torch.Tensor, converged: torch.Tensor):
        W, b = self.problems.split(x)
        W = W.view(x.shape[0], self.width, -1).double().cpu().numpy()
        b = b.double().cpu().numpy()
        n_iter, converged = n_iter.cpu().numpy(), converged.cpu().numpy()
        return [Solution(W[p], b[p], int(n_iter[p]), bool(converged[p]))
                for p in range(x.shape[0])]

    def fit_path(self, Cs: Sequence[float]) -> list[Solution]:
        """Every C of `Cs` solved together from zero weights."""
        x0 = torch.zeros(len(Cs), self.x.shape[1], device=self.device)
        x, n_iter, converged, _ = minimize(self.problems, x0, self._lam(Cs),
                                           max_iter=self.max_iter, tol=self.tol,
                                           preconditioner=self.preconditioner)
        return self._solutions(x, n_iter, converged)

    def fit(self, C: float, init: Solution | None = None) -> Solution:
        """One C, started from `init` or from the last solution and its curvature pairs (the
        warm-started walk)."""
        if init is not None:
            self.x = torch.cat([torch.as_tensor(init.coef, dtype=torch.float32).reshape(-1),
                                torch.as_tensor(init.intercept, dtype=torch.float32)])[None]
            self.x, self.memory = self.x.to(self.device), None
        x, n_iter, converged, self.memory = minimize(
            self.problems, self.x, self._lam([C]), max_iter=self.max_iter, tol=self.tol,
            memory=self.memory, preconditioner=self.preconditioner)
        self.x = x
        return self._solutions(x, n_iter, converged)[0]
