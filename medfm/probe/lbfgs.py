"""L-BFGS with a strong-Wolfe line search on one flat torch vector: torch.optim.LBFGS's step, as a
function.

    x, result = minimize(objective, x0, max_iter=100, max_eval=400, tolerance_grad=1e-4,
                         history_size=10)   # objective(x) -> (loss: float, gradient like x)

The iterates are those of `torch.optim.LBFGS(lr=1, tolerance_change=0, line_search_fn=
"strong_wolfe")` stepped once over parameters whose flattened concatenation is `x` (the same
arithmetic, in the same order, with torch's own `_strong_wolfe`), so a fit is bit for bit what
the optimizer gives. Why not the optimizer itself: constructing any torch Optimizer imports
torch._dynamo (about 2 s of a short probe on a 2-core CPU), and the optimizer re-gathers the
flat gradient from the parameters on every evaluation. Here the objective returns the flat
gradient itself, and the caller learns the gradient at the final point without evaluating it
again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.lbfgs import _strong_wolfe

Objective = Callable[[torch.Tensor], tuple[float, torch.Tensor]]  # x -> (loss, gradient)


@dataclass
class Result:
    """How a minimization ended."""

    loss: float  # objective at the returned point
    grad: torch.Tensor  # gradient at the returned point (flat, like x)
    n_iter: int  # iterations taken (0: the start already met tolerance_grad)
    n_eval: int  # objective evaluations, line searches included


@torch.no_grad()
def minimize(objective: Objective, x0: torch.Tensor, *, max_iter: int, max_eval: int,
             tolerance_grad: float, history_size: int) -> tuple[torch.Tensor, Result]:
    """Minimize `objective` from `x0` (not modified); returns (x, Result).

    Stops when the largest gradient component is <= tolerance_grad, after max_iter iterations,
    after max_eval evaluations, or when a step does not move (torch.optim.LBFGS's rules with
    tolerance_change = 0).
    """
    x = x0.clone()
    loss, flat_grad = objective(x)
    evals = 1
    if flat_grad.abs().max() <= tolerance_grad:
        return x, Result(loss, flat_grad, 0, evals)

    def directional(x_at: torch.Tensor, t: float, d: torch.Tensor):
        return objective(x_at.add(d, alpha=t))  # the point x + t d, as LBFGS's _add_grad makes it

    d = t = prev_flat_grad = None
    old_dirs: list[torch.Tensor] = []
    old_stps: list[torch.Tensor] = []
    ro: list[torch.Tensor] = []
    al: list = [None] * history_size
    H_diag: float | torch.Tensor = 1
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        # the descent direction: the two-loop recursion over the kept (y, s) pairs
        if n_iter == 1:
            d = flat_grad.neg()
        else:
            y = flat_grad.sub(prev_flat_grad)
            s = d.mul(t)
            ys = y.dot(s)
            if ys > 1e-10:
                if len(old_dirs) == history_size:
                    old_dirs.pop(0)
                    old_stps.pop(0)
                    ro.pop(0)
                old_dirs.append(y)
                old_stps.append(s)
                ro.append(1.0 / ys)
                H_diag = ys / y.dot(y)
            q = flat_grad.neg()
            for i in range(len(old_dirs) - 1, -1, -1):
                al[i] = old_stps[i].dot(q) * ro[i]
                q.add_(old_dirs[i], alpha=-al[i])
            d = r = torch.mul(q, H_diag)
            for i in range(len(old_dirs)):
                be_i = old_dirs[i].dot(r) * ro[i]
                r.add_(old_stps[i], alpha=al[i] - be_i)
        if prev_flat_grad is None:
            prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
        else:
            prev_flat_grad.copy_(flat_grad)
        # the step: a strong-Wolfe line search from t = 1 (the first: 1 / |g|_1, at most 1)
        t = min(1.0, 1.0 / flat_grad.abs().sum()) if n_iter == 1 else 1.0
        gtd = flat_grad.dot(d)
        if gtd > 0:  # not a descent direction (tolerance_change = 0)
            break
        loss, flat_grad, t, ls_evals = _strong_wolfe(
            directional, x, t, d, loss, flat_grad, gtd, max_ls=max_eval - evals)
        x.add_(d, alpha=t)
        evals += ls_evals
        if n_iter == max_iter or evals >= max_eval or flat_grad.abs().max() <= tolerance_grad:
            break
        if d.mul(t).abs().max() <= 0:  # the step did not move x
            break
    return x, Result(float(loss), flat_grad, n_iter, evals)
