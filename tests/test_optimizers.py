"""GaLore and AdaRankGrad against AdamW, exact SVDs, direct implementations and paper 003's memory formula."""

import pytest
import torch

from lorambo.optimizers import AdaRankGrad, GaLore
from lorambo.optimizers.low_rank import range_finder, smallest_sufficient_rank
from lorambo.results import optimizer_state_bytes


pytestmark = pytest.mark.usefixtures("float64")


def problem(seed=0, shapes=((6, 6), (5, 7), (9, 4))):
    torch.manual_seed(seed)
    weights = [torch.randn(*s, requires_grad=True) for s in shapes]
    bias = torch.randn(3, requires_grad=True)
    targets = [torch.randn(*s) for s in shapes]
    mixers = [torch.randn(s[1], s[1]) for s in shapes]

    def loss():
        total = sum(((w @ mix) - t).pow(2).sum() for w, mix, t in zip(weights, mixers, targets))
        return total + (bias ** 4).sum()

    return weights, bias, loss


def run(optimizer, loss, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()


@pytest.mark.parametrize("adaptive", [True, False])
def test_full_rank_equals_adamw_step_for_step(adaptive):
    w1, b1, loss1 = problem()
    w2, b2, loss2 = problem()
    ours = AdaRankGrad([{"params": w1, "low_rank": True}, {"params": [b1]}], lr=1e-2, weight_decay=0.1, rank=10,
                       eta_th=1e-14, adaptive_rank=adaptive, min_gap=1, max_gap=3)
    reference = torch.optim.AdamW([*w2, b2], lr=1e-2, weight_decay=0.1)
    for _ in range(12):
        run(ours, loss1, 1)
        run(reference, loss2, 1)
        for a, b in zip([*w1, b1], [*w2, b2]):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)


def chosen_rank(G, **options):
    W = torch.zeros_like(G, requires_grad=True)
    opt = AdaRankGrad([{"params": [W], "low_rank": True}], **options)
    W.grad = G.clone()
    opt.step()
    return opt.state[W]["rank"]


def test_threshold_extremes_pick_full_rank_and_minimum_rank():
    torch.manual_seed(1)
    G = torch.randn(12, 7)
    assert chosen_rank(G, rank=7, eta_th=1e-12, rank_min=1) == 7  # everything must be kept: full rank
    assert chosen_rank(G, rank=5, eta_th=1 - 1e-12, rank_min=2) == 2  # nothing must be kept: r_min


def test_range_finder_recovers_the_top_subspace_when_there_is_a_gap():
    torch.manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(40, 40))
    V, _ = torch.linalg.qr(torch.randn(30, 30))
    s = torch.tensor([10.0, 9.0, 8.0] + [1e-6] * 27)
    A = U[:, :30] * s @ V.t()
    Q, S = range_finder(A, 3, torch.Generator().manual_seed(0), power_iterations=0)
    assert torch.allclose(Q @ Q.t(), U[:, :3] @ U[:, :3].t(), atol=1e-6)
    assert torch.allclose(S, s[:3], rtol=1e-6)


@pytest.mark.parametrize("eta", [0.01, 0.1, 0.3, 0.6])
def test_rank_search_is_the_smallest_rank_meeting_the_threshold(eta):
    torch.manual_seed(3)
    for trial in range(10):
        G = torch.randn(20, 3) @ torch.randn(3, 15) + 0.3 * torch.randn(20, 15) * (trial / 10)
        S = torch.linalg.svdvals(G)
        total = float(S.pow(2).sum())
        linear = next((r for r in range(1, 13) if 1 - float(S[:r].pow(2).sum()) / total <= eta), 12)
        assert smallest_sufficient_rank(S.pow(2), total, 1, 12, eta) == linear
        assert chosen_rank(G, rank=12, eta_th=eta, subspace="svd") == linear


def test_moment_transfer_with_unchanged_subspace_is_identity_and_never_negative():
    torch.manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(10, 3))
    state = {"exp_avg": torch.randn(3, 5), "exp_avg_sq": torch.rand(3, 5)}
    before = {k: v.clone() for k, v in state.items()}
    AdaRankGrad._transfer(state, Q, Q, 10, "squared")
    assert torch.allclose(state["exp_avg"], before["exp_avg"]) and torch.allclose(state["exp_avg_sq"],
                                                                                 before["exp_avg_sq"])
    Q2, _ = torch.linalg.qr(torch.randn(10, 4))
    for mode in ("squared", "literal"):
        s = {k: v.clone() for k, v in before.items()}
        AdaRankGrad._transfer(s, Q2, Q, 10, mode)
        assert s["exp_avg_sq"].shape == (4, 5) and (s["exp_avg_sq"] >= 0).all()
    # the paper's literal V <- R V, unclamped, goes negative when the subspace rotates: why squared is the default
    Q_old = torch.eye(3)[:, :2]
    Q_new = torch.tensor([[1.0], [-1.0], [0.0]]) / 2 ** 0.5
    V = torch.tensor([[0.0], [1.0]])
    assert float((Q_new.t() @ Q_old) @ V) < 0
    state = {"exp_avg": torch.zeros(2, 1), "exp_avg_sq": V.clone()}
    AdaRankGrad._transfer(state, Q_new, Q_old, 3, "squared")
    assert float(state["exp_avg_sq"]) == pytest.approx(0.5)  # diag(R diag(V) R^T)


@pytest.mark.parametrize("n,m,r", [(20, 8, 3), (8, 20, 3), (16, 16, 5)])
def test_state_bytes_match_paper_table_1(n, m, r):
    W = torch.zeros(n, m, requires_grad=True)
    opt = AdaRankGrad([{"params": [W], "low_rank": True}], rank=r, adaptive_rank=False)
    W.grad = torch.randn(n, m)
    opt.step()
    big, small = max(n, m), min(n, m)
    assert optimizer_state_bytes(opt) == (big * r + 2 * small * r) * 8  # n r + 2 m r for n >= m, float64


def test_galore_matches_a_direct_implementation():
    weights, bias, loss = problem(5, shapes=((12, 6), (5, 9)))
    ref_weights, ref_bias, ref_loss = problem(5, shapes=((12, 6), (5, 9)))
    lr, rank, gap, scale, (b1, b2), eps = 1e-2, 2, 3, 0.5, (0.9, 0.999), 1e-8
    galore = GaLore([{"params": weights, "low_rank": True}, {"params": [bias]}], lr=lr, rank=rank,
                    update_proj_gap=gap, scale=scale)
    adam_bias = torch.optim.Adam([ref_bias], lr=lr)
    direct = [{"m": None, "v": None, "P": None} for _ in ref_weights]
    for t in range(1, 11):
        run(galore, loss, 1)
        adam_bias.zero_grad()
        for w in ref_weights:
            w.grad = None
        ref_loss().backward()
        adam_bias.step()
        with torch.no_grad():
            for w, st in zip(ref_weights, direct):
                G = w.grad if w.shape[0] >= w.shape[1] else w.grad.t()
                if (t - 1) % gap == 0:
                    st["P"] = torch.linalg.svd(G, full_matrices=False)[0][:, :rank]
                g = st["P"].t() @ G
                st["m"] = g * (1 - b1) if st["m"] is None else b1 * st["m"] + (1 - b1) * g
                st["v"] = g * g * (1 - b2) if st["v"] is None else b2 * st["v"] + (1 - b2) * g * g
                update = st["P"] @ ((st["m"] / (1 - b1 ** t)) / ((st["v"] / (1 - b2 ** t)).sqrt() + eps))
                w -= lr * scale * (update if w.shape[0] >= w.shape[1] else update.t())
        for a, b in zip([*weights, bias], [*ref_weights, ref_bias]):
            assert torch.allclose(a, b, atol=1e-10), t


def test_refresh_waits_for_convergence_within_bounded_gaps():
    torch.manual_seed(6)
    W = torch.zeros(10, 8, requires_grad=True)
    opt = AdaRankGrad([{"params": [W], "low_rank": True}], rank=3, min_gap=3, max_gap=7, refresh_ratio=0.5)
    direction = torch.randn(10, 8)
    refreshes = []
    for t in range(1, 40):
        W.grad = direction * (0.8 ** (t % 11))  # shrinking gradients, restarted every 11 steps
        opt.step()
        if opt.state[W]["refreshed_at"] == t:
            refreshes.append(t)
    gaps = [b - a for a, b in zip(refreshes, refreshes[1:])]
    assert gaps and all(3 <= g <= 7 for g in gaps)
    assert any(g < 7 for g in gaps)  # some refreshes were triggered by convergence, not by the bound
