"""Full-parameter training with low-rank gradient projection: AdaRankGrad (paper 003, Algorithms 1-3) and
GaLore as its fixed-rank, fixed-gap special case. Plain torch optimizers, usable outside lorambo:

    opt = AdaRankGrad([{"params": matrices, "low_rank": True}, {"params": others}], lr=1e-3, rank=4)

Each low-rank parameter (2-D, or a convolution reshaped to (c_out, c_in*kh*kw)) of shape (n, m) is projected
on its larger side (paper 003 Table 1): for n >= m, Q in R^{n x r} and Adam runs on Q^T G (r x m), so the
state is n r + 2 m r numbers; for n < m, on G Q with Q in R^{m x r}. At rank r >= min(n, m) a projection can
save nothing, and the parameter is updated by plain Adam (this is what makes full rank equal AdamW).
Parameters in groups without `low_rank` get plain AdamW.

AdaRankGrad (METHODS.md section 3):
- rank: the SMALLEST r in [rank_min, rank] whose residual energy ||G - Q_r Q_r^T G||^2 / ||G||^2 <= eta_th
  (the paper's "sup" would always pick the maximum), found by binary search; Q from a randomized range finder
  (Gaussian sketch + QR, the paper's SSRF) followed by the small SVD of Q^T G, so that Q's leading columns
  are the sketch's best directions (without it, a prefix of Q is an arbitrary part of the sketched range);
- refresh: when the projected gradient has converged, ||Q^T G|| <= refresh_ratio * its norm at the last
  refresh, but never before min_gap steps and always after max_gap steps;
- moments on refresh: with R = Q_new^T Q_old, M <- R M and V <- (R * R) V (the diagonal of R diag(V) R^T,
  never negative); `moment_transfer="literal"` is the paper's V <- R V, clamped at zero; "none" keeps them.
GaLore: fixed rank, exact SVD projector every `update_proj_gap` steps, moments kept as they are (as GaLore
does), update scaled by `scale`.
"""

import math

import torch


def range_finder(A: torch.Tensor, r: int, generator: torch.Generator | None = None, power_iterations: int = 1):
    """Orthonormal Q (n x r) approximately spanning A's top-r column space, ordered by importance, and the
    singular values of Q^T A (so ||Q[:, :k]^T A||_F^2 = sum of the first k squared)."""
    omega = torch.randn(A.shape[1], r, generator=generator, dtype=A.dtype, device="cpu").to(A.device)
    Q, _ = torch.linalg.qr(A @ omega)
    for _ in range(power_iterations):  # sharpens the subspace when the spectrum decays slowly
        Q, _ = torch.linalg.qr(A @ (A.t() @ Q))
    U, S, _ = torch.linalg.svd(Q.t() @ A, full_matrices=False)
    return Q @ U, S


def exact_subspace(A: torch.Tensor, r: int):
    U, S, _ = torch.linalg.svd(A, full_matrices=False)
    return U[:, :r], S[:r]


def smallest_sufficient_rank(captured_sq: torch.Tensor, total_sq: float, rank_min: int, rank_max: int,
                             eta_th: float) -> int:
    """Binary search for the smallest r in [rank_min, rank_max] with residual fraction
    1 - sum_{j<=r} captured_sq_j / total_sq <= eta_th (non-increasing in r); rank_max if none qualifies."""
    cumulative = torch.cumsum(captured_sq, 0)

    def ok(r):
        return total_sq <= 0 or 1.0 - float(cumulative[r - 1]) / total_sq <= eta_th

    lo, hi = rank_min, rank_max
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class AdaRankGrad(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=4, rank_min=1,
                 eta_th=0.1, adaptive_rank=True, refresh_ratio=0.5, min_gap=10, max_gap=200, scale=1.0,
                 moment_transfer="squared", subspace="randomized", power_iterations=1, seed=0):
        if moment_transfer not in ("squared", "literal", "none"):
            raise ValueError(f"moment_transfer must be squared, literal or none, not {moment_transfer}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, rank_min=rank_min,
                        eta_th=eta_th, adaptive_rank=adaptive_rank, refresh_ratio=refresh_ratio, min_gap=min_gap,
                        max_gap=max_gap, scale=scale, moment_transfer=moment_transfer, subspace=subspace,
                        power_iterations=power_iterations, low_rank=False)
        super().__init__(params, defaults)
        self.generator = torch.Generator().manual_seed(seed)

    # the range finder's random stream is part of the state: a resumed run draws the same sketches
    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        if "generator" in state_dict:
            self.generator.set_state(state_dict.pop("generator").cpu())  # a host generator; accelerate moves the
            # whole state dict to the device first
        super().load_state_dict(state_dict)

    # --- subspace selection (Block 1) and moment transfer (Block 2)
    def _select(self, G: torch.Tensor, group) -> tuple[torch.Tensor | None, int]:
        """Q (None: identity, plain Adam) and rank for the gradient matrix G (oriented so Q acts on its rows)."""
        full = min(G.shape)
        r_max = min(group["rank"], full)
        if not group["adaptive_rank"] and r_max >= full:
            return None, full
        if group["subspace"] == "svd":
            Q, S = exact_subspace(G, r_max)
        else:
            Q, S = range_finder(G, r_max, self.generator, group["power_iterations"])
        r = r_max
        if group["adaptive_rank"]:
            r = smallest_sufficient_rank(S.pow(2), float(G.pow(2).sum()), min(group["rank_min"], r_max), r_max,
                                         group["eta_th"])
        return (None, full) if r >= full else (Q[:, :r].contiguous(), r)

    @staticmethod
    def _transfer(state, Q_new, Q_old, rows: int, mode: str) -> None:
        if mode == "none" or "exp_avg" not in state:
            if "exp_avg" not in state or state["exp_avg"].shape[0] != (rows if Q_new is None else Q_new.shape[1]):
                state["exp_avg"] = state["exp_avg_sq"] = None  # recreated as zeros below
            return
        eye = lambda: torch.eye(rows, dtype=state["exp_avg"].dtype, device=state["exp_avg"].device)
        R = (eye() if Q_new is None else Q_new).t() @ (eye() if Q_old is None else Q_old)  # r_new x r_old
        state["exp_avg"] = R @ state["exp_avg"]
        if mode == "squared":
            state["exp_avg_sq"] = (R * R) @ state["exp_avg_sq"]
        else:
            state["exp_avg_sq"] = (R @ state["exp_avg_sq"]).clamp_min(0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                state["step"] += 1
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                low_rank = group["low_rank"] and p.dim() >= 2
                G = p.grad.reshape(p.shape[0], -1) if low_rank else p.grad
                transposed = low_rank and G.shape[0] < G.shape[1]  # project the larger side
                if transposed:
                    G = G.t()
                if low_rank:
                    self._maybe_refresh(state, G, group)
                    Q = state["projector"]
                    g = G if Q is None else Q.t() @ G
                else:
                    g = G
                if state.get("exp_avg") is None:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                direction = (m / bias1) / ((v / bias2).sqrt() + group["eps"])
                if low_rank:
                    if Q is not None:
                        direction = Q @ direction
                    if transposed:
                        direction = direction.t()
                    p.add_(direction.reshape(p.shape), alpha=-group["lr"] * group["scale"])
                else:
                    p.add_(direction, alpha=-group["lr"])
        return loss

    def _maybe_refresh(self, state, G, group) -> None:
        since = state["step"] - state.get("refreshed_at", -math.inf)
        due = "projector" not in state or since >= group["max_gap"]
        if not due and since >= group["min_gap"] and group["adaptive_rank"]:
            Q = state["projector"]
            norm = float((G if Q is None else Q.t() @ G).norm())
            due = norm <= group["refresh_ratio"] * state["norm_at_refresh"]
        if not due:
            return
        Q_new, r = self._select(G, group)
        self._transfer(state, Q_new, state.get("projector"), G.shape[0], group["moment_transfer"])
        state["projector"], state["rank"], state["refreshed_at"] = Q_new, r, state["step"]
        state["norm_at_refresh"] = float((G if Q_new is None else Q_new.t() @ G).norm())
        state["refreshes"] = state.get("refreshes", 0) + 1

    def projection_ranks(self) -> dict[int, int]:
        """Current rank of each low-rank parameter's projection, by id(param)."""
        return {id(p): self.state[p]["rank"] for g in self.param_groups for p in g["params"]
                if "rank" in self.state.get(p, {})}


class GaLore(AdaRankGrad):
    """GaLore: fixed rank, projector from the exact SVD of the gradient every `update_proj_gap` steps."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=4,
                 update_proj_gap=200, scale=0.25, moment_transfer="none"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, rank_min=rank,
                         adaptive_rank=False, min_gap=update_proj_gap, max_gap=update_proj_gap, scale=scale,
                         moment_transfer=moment_transfer, subspace="svd")
