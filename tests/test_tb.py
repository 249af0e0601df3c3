"""tb.py against naive per-element loops and hand-computed values."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import tb


def unit(*shape, seed=0):
    return F.normalize(
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1
    )


def h(u, v, tau):
    return math.exp(float(u @ v) / tau)


def naive_nt_xent(z1, z2, tau):
    """-log(h(z_i, z~_i) / sum_{k != i} h(z_i, z_k)) averaged over the 2N anchors, element by element."""
    z = list(z1) + list(z2)
    N = len(z1)
    total = 0.0
    for i in range(2 * N):
        pos = (i + N) % (2 * N)
        denom = sum(h(z[i], z[k], tau) for k in range(2 * N) if k != i)
        total += -math.log(h(z[i], z[pos], tau) / denom)
    return total / (2 * N)


def test_nt_xent_matches_naive_loop():
    z1, z2 = unit(5, 16, seed=1), unit(5, 16, seed=2)
    for tau in (0.1, 0.5):
        assert tb.nt_xent(z1, z2, tau).item() == pytest.approx(naive_nt_xent(z1, z2, tau), rel=1e-9)


def test_nt_xent_symmetric_and_minimal_for_matching_views():
    z1, z2 = unit(6, 8, seed=3), unit(6, 8, seed=4)
    assert tb.nt_xent(z1, z2).item() == pytest.approx(tb.nt_xent(z2, z1).item(), rel=1e-12)
    assert tb.nt_xent(z1, z1) < tb.nt_xent(z1, z2)


def test_nt_xent_batch_of_one_raises_clearly():
    with pytest.raises(ValueError, match="at least 2 videos"):
        tb.nt_xent(unit(1, 8), unit(1, 8, seed=1))
    with pytest.raises(ValueError, match="views must both be"):
        tb.nt_xent(unit(3, 8), unit(4, 8))


def test_gradients_flow_to_both_views():
    z1 = unit(4, 8, seed=5).requires_grad_()
    z2 = unit(4, 8, seed=6).requires_grad_()
    tb.nt_xent(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    G_a = unit(2, 4, 8, seed=7).requires_grad_()
    G_b = unit(2, 4, 8, seed=8).requires_grad_()
    tb.local_local_loss(G_a, G_b).backward()
    assert G_a.grad.abs().sum() > 0 and G_b.grad.abs().sum() > 0


def test_invariant_loss_matches_naive_sum():
    B, D, tau = 3, 8, 0.2
    g_a, g_b = unit(B, D, seed=1), unit(B, D, seed=2)
    G_a, G_b = unit(B, 4, D, seed=3), unit(B, 4, D, seed=4)
    dense = [G_a[:, p] for p in range(4)] + [G_b[:, p] for p in range(4)]
    expected = naive_nt_xent(g_a, g_b, tau)
    pairs = list(itertools.combinations(range(8), 2))
    assert len(pairs) == 28
    expected += sum(naive_nt_xent(dense[i], dense[j], tau) for i, j in pairs) / 4
    assert tb.invariant_loss(g_a, g_b, G_a, G_b, tau).item() == pytest.approx(expected, rel=1e-9)


def naive_local_local(G_a, G_b, tau):
    """Per video: anchor G_p's positive G~_p, negatives G_q and G~_q (q != p); both directions."""
    B, P, _ = G_a.shape
    total, count = 0.0, 0
    for b in range(B):
        for A, Bv in ((G_a[b], G_b[b]), (G_b[b], G_a[b])):
            for p in range(P):
                pos = h(A[p], Bv[p], tau)
                neg = sum(h(A[p], A[q], tau) + h(A[p], Bv[q], tau) for q in range(P) if q != p)
                total += -math.log(pos / (pos + neg))
                count += 1
    return total / count


def test_local_local_matches_naive_loop_and_batch_of_one():
    G_a, G_b = unit(3, 4, 8, seed=11), unit(3, 4, 8, seed=12)
    assert tb.local_local_loss(G_a, G_b, 0.1).item() == pytest.approx(
        naive_local_local(G_a, G_b, 0.1), rel=1e-9
    )
    one = tb.local_local_loss(G_a[:1], G_b[:1])  # negatives come from the same video: defined for B = 1
    assert torch.isfinite(one) and one.item() == pytest.approx(
        naive_local_local(G_a[:1], G_b[:1], 0.1), rel=1e-9
    )


def naive_global_local(L, G, tau):
    B, P, _ = L.shape
    total = 0.0
    for b in range(B):
        S = [[float(L[b, p] @ G[b, q]) / tau for q in range(P)] for p in range(P)]
        for p in range(P):  # rows: slice p should pick dense clip p
            total += -(S[p][p] - math.log(sum(math.exp(S[p][q]) for q in range(P)))) / (2 * B * P)
        for q in range(P):  # columns: dense clip q should pick slice q
            total += -(S[q][q] - math.log(sum(math.exp(S[p][q]) for p in range(P)))) / (2 * B * P)
    return total


def test_global_local_matches_naive_loop():
    L, G = unit(2, 4, 8, seed=21), unit(2, 4, 8, seed=22)
    assert tb.global_local_loss(L, G, 0.1).item() == pytest.approx(naive_global_local(L, G, 0.1), rel=1e-9)
    # hand value: identical one-hot slices and clips give S = I / tau
    E = torch.eye(4, dtype=torch.float64)[None]
    expected = -(10 - math.log(math.exp(10) + 3))
    assert tb.global_local_loss(E, E, 0.1).item() == pytest.approx(expected, rel=1e-9)


def test_distinctive_loss_is_ll_plus_four_gl():
    L_a, L_b, G_a, G_b = (unit(2, 4, 8, seed=s) for s in range(30, 34))
    expected = naive_local_local(G_a, G_b, 0.1) + sum(
        naive_global_local(L, G, 0.1) for L in (L_a, L_b) for G in (G_a, G_b)
    )
    assert tb.distinctive_loss(L_a, L_b, G_a, G_b).item() == pytest.approx(expected, rel=1e-9)


def authors_ssl_losses(g_a, g_b, L_a, L_b, G_a, G_b, tau):
    """The self-supervised terms as the authors' released code computes them, restated as loops: SimCLR's
    NT-Xent (a mean over the 2N anchors); the dense part of L_I summed over the 56 ordered pairs of distinct
    dense clips, over 4; L_LL per video a mean over its 8 anchors, summed over the videos; L_GL per video
    the cross-entropies of S's 4 rows and 4 columns summed and halved, a mean over the videos, for each of
    the 4 sparse / dense augmentation pairs. Returns (L_I, L_LL, L_GL summed over the pairs)."""
    dense = list(G_a.transpose(0, 1)) + list(G_b.transpose(0, 1))  # 8 slots of (B, D)
    L_I = naive_nt_xent(g_a, g_b, tau) + sum(
        naive_nt_xent(dense[i], dense[j], tau) for i in range(8) for j in range(8) if i != j
    ) / 4
    B = g_a.shape[0]
    L_LL = sum(naive_nt_xent(G_a[v], G_b[v], tau) for v in range(B))
    L_GL = 0.0
    for L in (L_a, L_b):
        for G in (G_a, G_b):
            per_video = []
            for v in range(B):
                S = [[float(L[v, p] @ G[v, q]) / tau for q in range(4)] for p in range(4)]
                rows = sum(-S[p][p] + math.log(sum(math.exp(x) for x in S[p])) for p in range(4))
                cols = sum(-S[q][q] + math.log(sum(math.exp(S[p][q]) for p in range(4))) for q in range(4))
                per_video.append((rows + cols) / 2)
            L_GL += sum(per_video) / B
    return L_I, L_LL, L_GL


@pytest.mark.parametrize("B", [3, 40])
def test_the_authors_balance(B):
    """tb's terms with the weights (w_dense, w_ll, w_gl) = (2, B, 4) are the authors' terms exactly, at any
    batch B; so BALANCE["authors"] = (2, 40, 4) weighs the terms as the authors' code does at its batch of
    40, and the "mean" balance differs from it by 2x in L_I's dense part, B x in L_LL and 4x in L_GL."""
    g_a, g_b = unit(B, 16, seed=40), unit(B, 16, seed=41)
    L_a, L_b, G_a, G_b = (unit(B, 4, 16, seed=s) for s in range(42, 46))
    L_I, L_LL, L_GL = authors_ssl_losses(g_a, g_b, L_a, L_b, G_a, G_b, 0.1)
    assert tb.invariant_loss(g_a, g_b, G_a, G_b, 0.1, w_dense=2).item() == pytest.approx(L_I, rel=1e-9)
    assert B * tb.local_local_loss(G_a, G_b, 0.1).item() == pytest.approx(L_LL, rel=1e-9)
    assert tb.distinctive_loss(L_a, L_b, G_a, G_b, 0.1, w_ll=B, w_gl=4).item() == pytest.approx(
        L_LL + L_GL, rel=1e-9
    )
    L_GL_tb = tb.distinctive_loss(L_a, L_b, G_a, G_b, 0.1, w_ll=0, w_gl=4).item()
    assert L_GL_tb == pytest.approx(L_GL, rel=1e-9)
    if B == 40:
        w_dense, w_ll, w_gl = tb.BALANCE["authors"]
        got = tb.distinctive_loss(L_a, L_b, G_a, G_b, 0.1, w_ll, w_gl) + tb.invariant_loss(
            g_a, g_b, G_a, G_b, 0.1, w_dense
        )
        assert got.item() == pytest.approx(L_I + L_LL + L_GL, rel=1e-9)


def naive_similarity(e_I, e_D):
    out = []
    for b in range(e_I.shape[0]):
        vals = [
            (float(e_I[b, i] @ e_I[b, j]) + float(e_D[b, i] @ e_D[b, j])) / 2
            for i in range(4)
            for j in range(4)
            if i != j
        ]
        out.append((sum(vals) / 12 + 1) / 2)
    return out


def test_temporal_similarity():
    same = unit(1, 1, 8).expand(1, 4, 8)
    assert tb.temporal_similarity(same, same).item() == pytest.approx(1.0)
    # s drops as the clips drift apart
    base, drift = unit(1, 1, 8, seed=1), unit(1, 4, 8, seed=2)
    scores = [
        tb.temporal_similarity(
            F.normalize(base + a * drift, dim=-1), F.normalize(base + a * drift, dim=-1)
        ).item()
        for a in (0.0, 0.5, 1.0, 3.0)
    ]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0) and scores[-1] < 0.9
    # opposite clips: c = -1/3 for 4 vectors +v, -v, +v, -v -> s = (c + 1) / 2
    v = unit(1, 8, seed=3)
    alt = torch.stack([v, -v, v, -v], dim=1)  # (1, 4, 8)
    assert tb.temporal_similarity(alt, alt).item() == pytest.approx((-1 / 3 + 1) / 2)
    e_I, e_D = unit(5, 4, 8, seed=4), unit(5, 4, 8, seed=5)
    assert tb.temporal_similarity(e_I, e_D).tolist() == pytest.approx(naive_similarity(e_I, e_D), rel=1e-9)
    C = tb.similarity_matrix(e_I, e_D)
    for b in range(5):  # each entry: the mean of the two encoders' cosines of clips i and j
        for i in range(4):
            for j in range(4):
                want = (float(e_I[b, i] @ e_I[b, j]) + float(e_D[b, i] @ e_D[b, j])) / 2
                assert float(C[b, i, j]) == pytest.approx(want, abs=1e-6)


def test_normalize_scores():
    s = torch.tensor([0.9, 0.95, 0.8, 0.85])
    assert tb.normalize_scores(s, "minmax").tolist() == pytest.approx([2 / 3, 1.0, 0.0, 1 / 3])
    assert tb.normalize_scores(s, "rank").tolist() == pytest.approx([2 / 3, 1.0, 0.0, 1 / 3])
    assert torch.equal(tb.normalize_scores(s, "none"), s)
    tied = torch.tensor([1.0, 0.5, 1.0, 0.7, 1.0])  # ranks 2, 3, 4 shared by the three 1.0s -> 3 each
    assert tb.normalize_scores(tied, "rank").tolist() == pytest.approx([3 / 4, 0.0, 3 / 4, 1 / 4, 3 / 4])
    noisy = torch.tensor([1.0, 0.5, 0.999993, 0.7, 0.99998])  # the same three ties, up to compression noise
    assert tb.normalize_scores(noisy, "rank").tolist() == pytest.approx([3 / 4, 0.0, 3 / 4, 1 / 4, 3 / 4])
    assert tb.normalize_scores(noisy, "rank", decimals=6).tolist() == pytest.approx(
        [1.0, 0.0, 3 / 4, 1 / 4, 2 / 4]
    )
    with pytest.raises(ValueError, match="unknown method"):
        tb.normalize_scores(s, "zscore")


def test_mix_teachers_per_video():
    p_I = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    p_D = torch.tensor([[0.0, 1.0], [0.6, 0.4]])
    s = torch.tensor([0.25, 1.0])
    assert torch.allclose(tb.mix_teachers(p_I, p_D, s), torch.tensor([[0.25, 0.75], [0.2, 0.8]]))


def test_distillation_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # softmax = [0.25, 0.75]
    p_T = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    assert tb.distillation_loss(logits, p_T, "mse").item() == pytest.approx((0.25**2 + 0.25**2) / 2)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(p_T || p_S) of the one video
    assert tb.distillation_loss(logits, p_T, "kl").item() == pytest.approx(kl / 2)  # over its 2 classes
    with pytest.raises(ValueError, match="unknown kind"):
        tb.distillation_loss(logits, p_T, "l1")

