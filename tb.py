"""TimeBalance's objectives, score and distillation as pure functions of tensors, in the paper's
notation (docs/method.md restates the method section by section).

Notation: every embedding is already L2-normalised, h(u, v) = exp(u . v / tau), tau = 0.1.
  g_a, g_b   (B, D)     sparse (global) clip of each video, augmentations A and B
  L_a, L_b   (B, 4, D)  the sparse clip's 4 temporal slices ("local slices" L_1..L_4)
  G_a, G_b   (B, 4, D)  the 4 dense (local) clips G_1..G_4 tiling the sparse clip's span
"""
import torch
import torch.nn.functional as F


def _nt_xent_rows(z1, z2, tau):
    """NT-Xent per anchor over the second-to-last dim: z1, z2 (..., N, D) -> (..., 2N) losses.
    Anchor i's positive is its partner in the other view; every other one of the 2N is a negative:
        l_i = -log( h(z_i, z~_i) / sum_{k != i} h(z_i, z_k) )
    Every index is made on z's device: an index built on the CPU would be copied to the GPU, waiting
    for it."""
    N = z1.shape[-2]
    z = torch.cat([z1, z2], dim=-2)  # (..., 2N, D)
    sim = z @ z.transpose(-1, -2) / tau  # (..., 2N, 2N): log h(z_i, z_k)
    eye = torch.eye(2 * N, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))  # k != i
    # the partner of i is i + N mod 2N: entries (i, i + N) and (i + N, i), the diagonals at offsets +N and -N
    pos = torch.cat([sim.diagonal(N, -2, -1), sim.diagonal(-N, -2, -1)], dim=-1)  # (..., 2N)
    return torch.logsumexp(sim, dim=-1) - pos


def nt_xent(z1, z2, tau=0.1):
    """SimCLR NT-Xent over the batch (docs/method.md "Temporally-invariant objective"): z1, z2 (N, D) are
    two views of N videos; a view's positive is the other view of its video, negatives are the other
    videos. Mean over the 2N anchors. Needs N >= 2: with one video there is no negative."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: views must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("nt_xent: needs at least 2 videos in the batch (other videos are the negatives)")
    return _nt_xent_rows(z1, z2, tau).mean()


def invariant_loss(g_a, g_b, G_a, G_b, tau=0.1, w_dense=1.0):
    """Temporally-invariant objective (docs/method.md "Temporally-invariant objective"):
        L_I = NTXent(g, g~) + w_dense/4 * sum over unordered pairs of distinct dense clips
              (a, p) != (b, q) of NTXent(G_{a,p}, G_{b,q})
    Dense clips at different times of one video are positives: the features become time-invariant.
    With 2 augmentations x 4 times there are 28 pairs, computed in one batched call. The authors' code sums
    over the 56 ordered pairs, the same NT-Xent twice each: w_dense = 2 (`BALANCE`)."""
    if G_a.shape != G_b.shape or G_a.dim() != 3:
        raise ValueError(f"invariant_loss: dense clips must both be (B, 4, D), got {tuple(G_a.shape)} "
                         f"and {tuple(G_b.shape)}")
    dense = torch.cat([G_a, G_b], dim=1).transpose(0, 1)  # (8, B, D): slots A1..A4, B1..B4
    i, j = torch.triu_indices(8, 8, offset=1, device=dense.device)  # (28,) each: the pairs i < j in order
    L_dense = _nt_xent_rows(dense[i], dense[j], tau).mean(dim=-1).sum()  # (28, B, D) x 2 -> (28, 2B) -> ()
    return nt_xent(g_a, g_b, tau) + w_dense * L_dense / 4


def local_local_loss(G_a, G_b, tau=0.1):
    """TCLR local-local loss L_LL (docs/method.md "Temporally-distinctive objective"): per video, NT-Xent
    whose "batch" is the 4 time slots: anchor G_p's positive is G~_p, its negatives are G_q and G~_q
    for q != p (other times of the same video). Averaged over videos and anchors (the released code
    sums over the batch; averaging keeps the scale independent of the batch size)."""
    return _nt_xent_rows(G_a, G_b, tau).mean()  # (B, 8) -> ()


def global_local_loss(L, G, tau=0.1):
    """TCLR global-local loss L_GL: per video S_pq = L_p . G_q / tau (sparse slice p vs dense clip q),
        L_GL = 1/2 [ CE(S rows, target p) + CE(S columns, target q) ]
    averaged over videos. L, G: (B, 4, D)."""
    S = L @ G.transpose(1, 2) / tau  # (B, 4, 4)
    B, P, _ = S.shape
    target = torch.arange(P, device=S.device).repeat(B)  # (B*4,)
    rows = F.cross_entropy(S.reshape(B * P, P), target)
    cols = F.cross_entropy(S.transpose(1, 2).reshape(B * P, P), target)
    return (rows + cols) / 2


def distinctive_loss(L_a, L_b, G_a, G_b, tau=0.1, w_ll=1.0, w_gl=1.0):
    """Temporally-distinctive objective L_D = w_ll L_LL + w_gl L_GL, L_GL summed over the 4 combinations of
    sparse / dense augmentations (docs/method.md; the released SSL config: both temporal weights 1, but
    its code sums L_LL over the batch and each L_GL over a video's 4 anchors: `BALANCE`). The 4
    combinations go through `global_local_loss` as one batch of 4B videos: the mean over it, times 4, is
    the sum of the 4 means."""
    L = torch.cat([L_a, L_a, L_b, L_b])  # (4B, 4, D)
    G = torch.cat([G_a, G_b, G_a, G_b])  # (4B, 4, D): pairs (L_a, G_a), (L_a, G_b), (L_b, G_a), (L_b, G_b)
    return w_ll * local_local_loss(G_a, G_b, tau) + w_gl * 4 * global_local_loss(L, G, tau)


# The weights of the self-supervised terms, (w_dense, w_ll, w_gl). "mean": every term a mean over its
# anchors and videos. "authors": the balance of the authors' released code at its batch of 40 videos (the
# dense pairs of L_I ordered, L_LL summed over the 40 videos, each L_GL summed over a video's 4 anchors),
# kept fixed at any batch size, so that a batch of another size weighs the terms as the paper's runs did.
BALANCE = {"mean": (1.0, 1.0, 1.0), "authors": (2.0, 40.0, 4.0)}


def similarity_matrix(e_I, e_D):
    """C = (C_I + C_D) / 2 with C_X = e_X e_X^T: the 4x4 cosine similarities between a video's 4 consecutive
    clips, averaged over both SSL encoders (docs/method.md "Temporal similarity score").
    (B, 4, D) -> (B, 4, 4)."""
    return (e_I @ e_I.transpose(1, 2) + e_D @ e_D.transpose(1, 2)) / 2


def temporal_similarity(e_I, e_D):
    """Temporal similarity score s in [0, 1] (docs/method.md "Temporal similarity score"). e_I, e_D
    (B, 4, D): the invariant and distinctive SSL encoders' projected, L2-normalised embeddings of 4
    consecutive non-overlapping clips of each video.
        C = (C_I + C_D) / 2,   C_X = e_X e_X^T  (4x4 cosine similarities)
        c = mean of the 12 off-diagonal entries of C,   s = (c + 1) / 2
    Identical clips give s = 1; clips that differ over time give lower s. The raw score sits in a
    narrow band on small data: `normalize_scores` spreads it over the training videos."""
    C = similarity_matrix(e_I, e_D)  # (B, 4, 4)
    off = ~torch.eye(C.shape[-1], dtype=torch.bool, device=C.device)
    c = C[:, off].mean(dim=1)  # (B,): mean off-diagonal cosine
    return (c + 1) / 2


def normalize_scores(s, method="minmax", decimals=4):
    """Dataset-level normalisation of raw scores (B,) over the training videos (the paper's figure gives no
    mapping to [0, 1]: docs/method.md): "none" keeps s, "minmax" maps min -> 0 and max -> 1, "rank" maps each
    score to its rank / (B - 1), tied scores sharing the mean of their ranks (so no video's weight depends on
    where it sits in the list). For "rank" the scores are first rounded to `decimals`: scores that differ
    only by compression noise (1.0 against 0.999993 for two repetitive videos) are ties, not an order."""
    if method == "none" or s.numel() < 2:
        return s
    if method == "minmax":
        lo, hi = s.min(), s.max()
        return (s - lo) / (hi - lo) if hi > lo else torch.full_like(s, 0.5)
    if method == "rank":
        s = s.round(decimals=decimals)
        rank = s.argsort().argsort().to(s.dtype)  # (B,) 0 .. B-1, ties in list order
        value, group = torch.unique(s, return_inverse=True)  # group: index of each score's distinct value
        mean_rank = torch.zeros(len(value), dtype=s.dtype).index_add_(0, group, rank) / torch.bincount(group)
        return mean_rank[group] / (s.numel() - 1)
    raise ValueError(f"normalize_scores: unknown method {method!r}")


def mix_teachers(p_inv, p_dist, s):
    """Teacher target (docs/method.md "Student"): p_T = s * p_I + (1 - s) * p_D, per video.
    p_inv, p_dist (B, K) probabilities; s (B,) in [0, 1]."""
    s = s.view(-1, 1)  # (B, 1)
    return s * p_inv + (1 - s) * p_dist


def distillation_loss(student_logits, p_teacher, kind="mse"):
    """Distillation from the mixed teachers (docs/method.md "Student"), both averaged over batch x classes
    as the released code does (hence its loss weights 50 / 100 for either):
        "mse": mean_(i,k) (softmax(student)_ik - p_T,ik)^2          (the paper's)
        "kl":  mean_(i,k) p_T,ik (log p_T,ik - log softmax(student)_ik)   (the released alternative,
               `KLDivLoss(reduction="mean")`: KL(p_T || p_S) per video divided by the K classes)"""
    if kind == "mse":
        return F.mse_loss(student_logits.softmax(dim=-1), p_teacher)
    if kind == "kl":
        K = p_teacher.shape[-1]  # torch's reduction="mean" does the same, with a warning that it will change
        return F.kl_div(student_logits.log_softmax(dim=-1), p_teacher, reduction="batchmean") / K
    raise ValueError(f"distillation_loss: unknown kind {kind!r}")


def knn_top1(bank, bank_y, queries, query_y, num_classes, k=20, t=0.07):
    """Weighted k-nearest-neighbour classification (Wu et al. 2018, instance discrimination), the check of an
    encoder before any label is spent: for each query (Q, C) the k bank features (N, C) of highest cosine
    similarity vote for their labels with weight exp(sim / t). Returns top-1 % over the queries."""
    sim = queries @ bank.T  # (Q, N): cosines, the features being unit vectors
    top, j = sim.topk(min(k, bank.shape[0]), dim=1)  # (Q, k)
    votes = torch.zeros(len(queries), num_classes, device=sim.device)  # (Q, K)
    votes.scatter_add_(1, bank_y[j], (top / t).exp())
    return 100 * (votes.argmax(dim=1) == query_y).float().mean().item()
