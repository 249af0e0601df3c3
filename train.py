"""Every stage of TimeBalance (docs/method.md). The method is three commands (README):

  python train.py --stage invariant     self-supervised pretraining with L_I          -> OUT/invariant.pt
  python train.py --stage distinctive   self-supervised pretraining, L_D = L_LL + L_GL -> OUT/distinctive.pt
  python train.py --stage semisup       every step not done yet, in order:
                                          (--student-init both: L_I + L_LL + L_GL     -> OUT/both.pt)
                                          both encoders fine-tuned on the labeled videos -> OUT/teacher_*.pt
                                          temporal similarity scores                  -> OUT/scores.json
                                          the student, distilled from the per-video mix -> OUT/student.pt

Finer stages: `finetune` runs semisup's teacher steps by hand, `both` the extra first step of
`--student-init both`; `supervised` is the baseline (labeled subset only, from scratch); `eval --ckpt F`
tests a classifier, `predict --ckpt F VIDEO ...` names the top-5 classes of each video; `ablation` runs the
method, the baseline and the fixed-mix student for each of --seeds and prints mean, spread and paired
differences (docs/results.md); `--demo` does that on the toy set.

Reading order: the constants, then each stage's loop (batch -> forward -> loss -> optimize), evaluation,
the commands; the plumbing (Meter, Run, checkpoints, JSON files, the command line) comes last.
Multi-GPU / multi-process: `torchrun --nproc_per_node=N train.py ...` (NCCL on GPUs, gloo on CPU).
"""
import argparse
import contextlib
import json
import math
import os
import pickle
import statistics
import sys
import time
import warnings

# torch warns on import where NumPy is missing; this project does not use NumPy (README)
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.distributed as dist
import torch.nn.functional as F

import data
import tb
from models import BACKBONE, R3D, load_backbone

DEFAULT_TOY = "data/toy"
SSL_STAGES = ("invariant", "distinctive", "both")
ENCODERS = ("invariant", "distinctive")  # the two self-supervised encoders that become the teachers
STAGES = SSL_STAGES + ("finetune", "supervised", "semisup", "eval", "predict", "ablation")
# Per-stage defaults at toy CPU scale; --epochs / --lr / --batch-size override them.
EPOCHS = {"invariant": 16, "distinctive": 20, "both": 8, "finetune": 15, "supervised": 15, "semisup": 25}
LR = {"invariant": 1e-3, "distinctive": 1e-3, "both": 1e-3, "finetune": 3e-4, "supervised": 1e-3,
      "semisup": 5e-4}
BATCH = {"invariant": 8, "distinctive": 8, "both": 8, "finetune": 16, "supervised": 16, "semisup": 8}


class StageError(Exception):
    """A stage cannot start: missing input checkpoint, mismatched model, bad flag (exit code 2)."""


# ----------------------------------------------------------------------------------------------
# Self-supervised pretraining: invariant (L_I), distinctive (L_D = L_LL + L_GL), both


def train_ssl(run, stage, resume):
    a = run.args
    torch.manual_seed(a.seed)  # initialisation: the same alone or inside --stage semisup
    epochs, lr, bs = hparams(a, stage)
    ds = run.dataset(run.train, "ssl")  # all training videos; no labels are used
    model = run.model(proj_dim=128)
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=a.weight_decay)
    start = run.resume(stage, model, opt, resume)
    net = run.wrap(model)
    steps = len(ds) // (bs * run.world)
    if steps == 0:
        raise StageError(f"--batch-size {bs}: {len(ds)} training videos give no full batch")
    loader, meter = run.loader(ds, bs), Meter(run, stage, opt, lr, epochs, steps, start)
    for epoch in range(start, epochs):
        net.train()
        # x (10B, 3, T, S, S): the 10 clips of B videos, clip-major
        for step, (x, _, _, failed) in enumerate(run.batches(loader, epoch, clip_major=True)):
            meter.begin(epoch, step, failed)
            terms = ssl_terms(net, x, stage, a.tau, run.autocast)
            optimize(opt, terms)
            meter.add(terms, x.shape[0])
        meter.end_epoch(model)
    knn_check(run, stage, model)


def ssl_terms(net, x, stage, tau, autocast=contextlib.nullcontext):
    """The self-supervised losses of `stage` on one batch. x (10B, 3, T, S, S): B videos' 10 clips each,
    clip-major (clip c of every video together), the clips in the order of `data.SSL_CLIPS`."""
    B = x.shape[0] // 10
    with autocast():
        g, L = net(x, out="ssl")  # (10B, D), (10B, 4, D)
    g, L = g.float().view(10, B, -1), L.float().view(10, B, 4, -1)  # (10, B, D), (10, B, 4, D)
    c = data.SSL_CLIPS
    g_a, g_b = g[c["sparse_A"]], g[c["sparse_B"]]  # the sparse clip under augmentations A and B: (B, D)
    L_a, L_b = L[c["sparse_A"]], L[c["sparse_B"]]  # its 4 temporal slices L_1..L_4: (B, 4, D)
    G_a = g[c["dense_A"]].transpose(0, 1)  # the 4 dense clips G_1..G_4 under A: (B, 4, D)
    G_b = g[c["dense_B"]].transpose(0, 1)  # and under B
    terms = {}
    if stage in ("invariant", "both"):
        terms["L_I"] = tb.invariant_loss(g_a, g_b, G_a, G_b, tau)
    if stage in ("distinctive", "both"):
        terms["L_D"] = tb.distinctive_loss(L_a, L_b, G_a, G_b, tau)
    return terms


# ----------------------------------------------------------------------------------------------
# Classifiers on the labeled subset: the two teachers (finetune) and the supervised baseline


def train_classifier(run, name, resume, init=None):
    """Cross-entropy on the labeled clips. `init`: an SSL checkpoint whose backbone is loaded strictly
    (its projection head is skipped, and said so). Saves OUT/<name>.pt and records its test top-1."""
    a = run.args
    stage = "finetune" if init else "supervised"
    epochs, lr, bs = hparams(a, stage)
    torch.manual_seed(a.seed)  # initialisation and dropout: the same alone or inside --stage semisup
    model = run.model(num_classes=len(run.classes), dropout=0.5)
    if init is not None:
        skipped = load_backbone(model, init["model"], source=f"{name} init")
        run.log(f"{name}: loaded the SSL backbone, skipped {len(skipped)} head keys ({skipped[0]} ...)")
    # the teachers' backbones learn at --finetune-backbone-lr times the rate of the new classifier
    backbone = [p for k, p in model.named_parameters() if k.startswith(BACKBONE)]
    head = [p for k, p in model.named_parameters() if not k.startswith(BACKBONE)]
    scale = a.finetune_backbone_lr if init is not None else 1.0
    opt = torch.optim.Adam([{"params": backbone, "scale": scale}, {"params": head, "scale": 1.0}], lr,
                           weight_decay=a.weight_decay)
    start = run.resume(name, model, opt, resume)
    net = run.wrap(model)
    # an epoch shows as many clips as there are training videos: the labeled subset repeated (each
    # repeat with its own augmentation), so epochs mean the same amount of work in every stage
    ds = run.dataset(run.labeled * max(1, len(run.train) // len(run.labeled)), "train")
    bs = min(bs, len(ds) // run.world)
    steps = len(ds) // (bs * run.world)
    loader, meter = run.loader(ds, bs), Meter(run, name, opt, lr, epochs, steps, start, steps_lines=False)
    for epoch in range(start, epochs):
        net.train()
        for step, (x, y, _, failed) in enumerate(run.batches(loader, epoch)):  # x (B, 3, T, S, S)
            meter.begin(epoch, step, failed)
            terms = classifier_terms(net, x, y, run.autocast)
            optimize(opt, terms)
            meter.add(terms, x.shape[0])
        meter.end_epoch(model)
    evaluate_and_record(run, name, model)


def classifier_terms(net, x, y, autocast=contextlib.nullcontext):
    """Cross-entropy of the classifier on one labeled batch, x (B, 3, T, S, S), y (B,)."""
    with autocast():
        logits = net(x).float()  # (B, K)
    return {"CE": F.cross_entropy(logits, y)}


# ----------------------------------------------------------------------------------------------
# Temporal similarity scores and the student


def compute_scores(run):
    """s for every training video, once, cached in OUT/scores.json keyed by video path (docs/method.md
    "Temporal similarity score"): 4 consecutive clips embedded by both SSL encoders' projection heads.
    Returns ({path: raw s}, {path: C as 4x4 lists}); the cache keeps both, and each encoder's own score
    ({path: [s_I, s_D]}, "each": s from C_I or C_D alone), which shows which encoder makes the split."""
    path = os.path.join(run.args.out, "scores.json")
    inv, dis = run.need("invariant", "invariant", "ssl"), run.need("distinctive", "distinctive", "ssl")
    source = {k: os.path.getmtime(run.path(k)) for k in ENCODERS}
    try:
        cached = read_json(path)
    except ValueError as e:  # a cache: recomputed, never fatal
        if run.rank == 0:
            print(f"warning: {e}: recomputing the scores", file=sys.stderr, flush=True)
        cached = {}
    raw, C, each = cached.get("raw"), cached.get("C"), cached.get("each")
    if (cached.get("source") == source and all(isinstance(d, dict) for d in (raw, C, each))
            and all(isinstance(raw.get(p), float) and p in C and p in each for p, _ in run.train)):
        return raw, C
    encoders = []
    with torch.random.fork_rng():  # building the encoders must not move the global RNG: the student's
        for ckpt in (inv, dis):  # initialisation would then depend on whether the scores were cached
            m = run.model(proj_dim=128)
            m.load_state_dict(ckpt["model"], strict=True)
            encoders.append(m.eval())
    ds = run.dataset(run.train[run.rank :: run.world], "score")
    raw, C, each, bad = {}, {}, {}, data.BadVideos()
    with torch.no_grad():
        for x, _, idx, failed in run.batches(run.loader(ds, 8, shuffle=False), 0):  # x (B*4, 3, T, S, S)
            bad.add(failed)
            B = len(idx)
            # float32 on every device, never under autocast: bf16 scores would differ from the CPU's and
            # break the ties that --score-norm rank relies on
            e_I, e_D = (enc(x, out="ssl")[0].view(B, 4, -1) for enc in encoders)  # (B, 4, D)
            C_b = tb.similarity_matrix(e_I, e_D)  # (B, 4, 4)
            s = tb.score_from_matrix(C_b)  # (B,): tb.temporal_similarity, with C computed once
            # (B, 2): the score from C_I alone and from C_D alone
            s_each = torch.stack([tb.temporal_similarity(e, e) for e in (e_I, e_D)], dim=1)
            for i, s_i, C_i, e_i in zip(idx.tolist(), s.tolist(), C_b.tolist(), s_each.tolist()):
                p = ds.items[i][0]
                raw[p], C[p], each[p] = s_i, [[round(v, 5) for v in row] for row in C_i], e_i
    if run.world > 1:
        parts = [None] * run.world
        dist.all_gather_object(parts, (raw, C, each))
        raw, C, each = ({k: v for part in parts for k, v in part[j].items()} for j in range(3))
    if run.rank == 0:
        write_json(path, {"source": source, "raw": raw, "C": C, "each": each})
    run.log(f"scores: {len(raw)} videos, raw s in [{min(raw.values()):.3f}, {max(raw.values()):.3f}]"
            + (f", {len(bad)} unreadable" if len(bad) else ""))
    run.barrier()
    return raw, C


def draw_scores(run, raw, C, norm, P=64):
    """OUT/scores.png (`data.score_picture`): per class, its median-score training video: the middle frame
    of each of its 4 score clips, the 4x4 cosine matrix C, raw and normalised s."""
    a, rows = run.args, []
    for c in range(len(run.classes)):
        videos = sorted((raw[p], p) for p, y in run.train if y == c)
        if not videos:
            continue
        p = videos[len(videos) // 2][1]  # the median score of the class
        try:
            n = data.count_frames(os.path.join(a.root, p))
            middles = [clip[len(clip) // 2] for clip in data.score_indices(n, a.frames)]
            frames = data.load_frames(os.path.join(a.root, p), middles, P)  # (4, h, w, 3), short side P
            frames = data.center_crop(frames, P).permute(1, 2, 3, 0)  # (4, P, P, 3)
        except data.VideoError:  # unreadable now: grey frames, the scores still show
            frames = torch.full((4, P, P, 3), 128, dtype=torch.uint8)
        rows.append((frames, C[p], raw[p], norm[p]))
    data.write_png(os.path.join(a.out, "scores.png"), data.score_picture(rows, P))
    run.log(f"wrote {os.path.join(a.out, 'scores.png')}: per class, the median-score video's 4 score clips, "
            "C, raw and normalised s")


def normalized_scores(raw, paths, method):
    """{path: s} for the training videos `paths`, normalised over them (`tb.normalize_scores`)."""
    return dict(zip(paths, tb.normalize_scores(torch.tensor([raw[p] for p in paths]), method).tolist()))


def train_semisup(run, name="student"):
    """The TimeBalance student (docs/method.md "Student"): per step a labeled and an unlabeled batch go
    through the student in one forward; frozen teachers give p_T = s p_I + (1 - s) p_D on the same clips;
        loss = CE(student, y) + w_l MSE(p_S, p_T) on labeled + w_u MSE(p_S, p_T) on unlabeled."""
    a = run.args
    epochs, lr, bs = hparams(a, "semisup")
    init = run.need(a.student_init, a.student_init, "ssl")
    teachers = [teacher(run, k) for k in ENCODERS]
    frozen = [sum(p.double().sum().item() for p in t.parameters()) for t in teachers]
    raw, C = compute_scores(run)
    paths = [p for p, _ in run.train]
    norm = normalized_scores(raw, paths, a.score_norm)
    if run.rank == 0:
        draw_scores(run, raw, C, norm)
    s_of = norm if a.mix == "similarity" else dict.fromkeys(paths, 0.5)
    unl_ds = run.dataset(run.unlabeled, "train")
    steps = len(unl_ds) // (bs * run.world)
    if steps == 0:
        raise StageError(f"--batch-size {bs}: {len(unl_ds)} unlabeled videos give no full batch")
    bs_l = min(bs, len(run.labeled) // run.world)
    # the small labeled subset repeated (each repeat with its own augmentation) to give one labeled
    # batch per unlabeled batch: one labeled loader per epoch, not one per pass over the subset
    repeats = math.ceil(steps * bs_l * run.world / len(run.labeled))
    lab_ds = run.dataset(run.labeled * repeats, "train", stream=1)
    s_lab = torch.tensor([s_of[p] for p, _ in lab_ds.items], device=run.device)
    s_unl = torch.tensor([s_of[p] for p, _ in run.unlabeled], device=run.device)

    torch.manual_seed(a.seed)  # initialisation and dropout: the same alone or inside --demo
    model = run.model(num_classes=len(run.classes), dropout=0.5)
    load_backbone(model, init["model"], source=run.path(a.student_init))  # L_D, or L_I + L_LL + L_GL (paper)
    run.log(f"{name}: starts from the backbone of {run.path(a.student_init)}")
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=a.weight_decay)
    start = run.resume(name, model, opt, a.resume)
    net = run.wrap(model)
    # --workers split between the two loaders in proportion to the clips each gives per step; the labeled
    # sampler draws exactly the batches the steps take
    w_l = min(a.workers - 1, max(1, round(a.workers * bs_l / (bs + bs_l)))) if a.workers > 1 else 0
    unl_loader = run.loader(unl_ds, bs, workers=a.workers - w_l)
    lab_loader = run.loader(lab_ds, bs_l, workers=w_l, length=steps * bs_l)
    meter = Meter(run, name, opt, lr, epochs, steps, start)
    for epoch in range(start, epochs):
        net.train()
        batches = zip(run.batches(unl_loader, epoch), run.batches(lab_loader, epoch))
        for step, ((x_u, _, i_u, failed), (x_l, y_l, i_l, failed_l)) in enumerate(batches):
            meter.begin(epoch, step, failed + failed_l)
            s = torch.cat([s_lab[i_l], s_unl[i_u]])  # (B_l + B_u,): each video's temporal similarity score
            terms = student_terms(net, teachers, x_l, y_l, x_u, s, a, run.autocast)
            optimize(opt, terms)
            meter.add(terms, x_l.shape[0] + x_u.shape[0])
        meter.end_epoch(model)
    # the teachers are frozen: their weights must not have moved
    now = [sum(p.double().sum().item() for p in t.parameters()) for t in teachers]
    assert frozen == now, "teacher changed"
    evaluate_and_record(run, name, model)


def student_terms(net, teachers, x_l, y_l, x_u, s, a, autocast=contextlib.nullcontext):
    """The student's loss on a labeled batch x_l (B_l, 3, T, S, S), y_l (B_l,) and an unlabeled batch x_u
    (B_u, 3, T, S, S), both through the student in one forward; s (B_l + B_u,) the videos' scores. The
    frozen teachers see the same clips: p_T = s p_I + (1 - s) p_D (`tb.mix_teachers`), and
        loss = CE(student, y) + w_l D(p_S, p_T) on labeled + w_u D(p_S, p_T) on unlabeled, D = --distill."""
    n_l = x_l.shape[0]
    x = torch.cat([x_l, x_u])  # (B_l + B_u, 3, T, S, S)
    with torch.no_grad(), autocast():
        p_I, p_D = (t(x).float().softmax(dim=-1) for t in teachers)  # (B_l + B_u, K) each
    p_T = tb.mix_teachers(p_I, p_D, s)
    with autocast():
        logits = net(x).float()  # (B_l + B_u, K)
    return {"CE": F.cross_entropy(logits[:n_l], y_l),
            "distill_l": a.w_labeled * tb.distillation_loss(logits[:n_l], p_T[:n_l], a.distill),
            "distill_u": a.w_unlabeled * tb.distillation_loss(logits[n_l:], p_T[n_l:], a.distill)}


# ----------------------------------------------------------------------------------------------
# Evaluation: K clips per test video, centre crop, softmax averaged; a kNN check of an encoder; predict


@torch.no_grad()
def evaluate(run, model):
    """Top-1 (%) over ALL test videos: an unreadable video counts as wrong. Each rank takes every
    world-th video (no padding, nothing counted twice). Returns (top1, per-class %, unreadable count,
    videos counted)."""
    model.eval()
    if run.world > 1:  # DDP copies rank 0's BN statistics into the others at each forward, so after the
        for b in model.buffers():  # last step they differ by one update: evaluate every rank with rank 0's
            dist.broadcast(b, 0)  # (the saved ones)
    K = len(run.classes)
    # every count lives on the device: nothing waits for the GPU per batch, and the all-reduce runs on the
    # device's own backend
    correct, total = torch.zeros(K, device=run.device), torch.zeros(K, device=run.device)
    bad = data.BadVideos()
    ds = run.dataset(run.test[run.rank :: run.world], "test")
    for x, y, idx, failed in run.batches(run.loader(ds, 4, shuffle=False), 0):  # x (B*n, 3, T, S, S)
        bad.add(failed)
        B = y.shape[0]
        n = x.shape[0] // B
        with run.autocast():
            logits = model(x).float()  # (B*n, K)
        p = logits.softmax(dim=-1).view(B, n, K).mean(dim=1)  # (B, K): softmax averaged over clips
        hit = (p.argmax(dim=1) == y).float()  # (B,)
        if failed:  # an unreadable video counts as wrong
            unreadable = {i for i, _ in failed}
            hit *= torch.tensor([float(i not in unreadable) for i in idx.tolist()], device=run.device)
        correct.index_add_(0, y, hit)
        total.index_add_(0, y, torch.ones_like(hit))
    n_bad = torch.tensor(float(len(bad)), device=run.device)
    if run.world > 1:
        for t in (correct, total, n_bad):
            dist.all_reduce(t)
    per_class = (100 * correct / total.clamp(min=1)).tolist()
    return 100 * correct.sum().item() / total.sum().item(), per_class, int(n_bad), int(total.sum())


def evaluate_and_record(run, name, model):
    m = model.module if hasattr(model, "module") else model
    top1, per_class, n_bad, n = evaluate(run, m)
    run.record_result(name, top1)
    if run.rank == 0:
        path = os.path.join(run.args.out, "per_class.json")
        per = read_json(path)
        per[name] = dict(zip(run.classes, [round(v, 1) for v in per_class]))
        write_json(path, per)
    unreadable = f" ({n_bad} unreadable, counted wrong)" if n_bad else ""
    run.log(f"{name}: test top-1 {top1:.2f}% over {n} videos{unreadable}")
    return top1


@torch.no_grad()
def clip_average(run, fn, items):
    """fn of each video's test clips (centre crop, as in evaluation), averaged over its clips: (N, ...) on
    the device, in item order. fn maps a batch of clips (B*n, 3, T, S, S) to (B*n, ...)."""
    out = []
    loader = run.loader(run.dataset(items, "test"), 4, shuffle=False)
    for x, y, _, _ in run.batches(loader, 0):  # x (B*n, 3, T, S, S)
        B = y.shape[0]
        with run.autocast():
            v = fn(x).float()  # (B*n, ...)
        out.append(v.view(B, -1, *v.shape[1:]).mean(dim=1))  # (B, ...)
    return torch.cat(out)


def features(run, model, items):
    """Pooled backbone features of `items` (N, C), each video's test clips averaged, L2-normalised."""
    model.eval()
    return F.normalize(clip_average(run, lambda x: model.features(x).mean(dim=(2, 3, 4)), items), dim=-1)


def knn_top1(bank, bank_y, queries, query_y, num_classes, k=20, t=0.07):
    """Weighted k-nearest-neighbour classification (Wu et al. 2018, instance discrimination): for each query
    (Q, C) the k bank features (N, C) of highest cosine similarity vote for their labels with weight
    exp(sim / t); the class with the most weight wins. Returns top-1 % over the queries."""
    sim = queries @ bank.T  # (Q, N): cosines, the features being unit vectors
    top, j = sim.topk(min(k, bank.shape[0]), dim=1)  # (Q, k)
    votes = torch.zeros(len(queries), num_classes, device=sim.device)  # (Q, K)
    votes.scatter_add_(1, bank_y[j], (top / t).exp())
    return 100 * (votes.argmax(dim=1) == query_y).float().mean().item()


def knn_check(run, stage, model):
    """Whether pretraining learned anything before a label is spent on it: kNN top-1 of the encoder's
    backbone features, the labeled subset as the memory bank, the test split as queries. Recorded as
    knn_<stage>; costs one no-grad pass over those videos."""
    if run.rank == 0:
        t0 = time.time()
        bank, queries = features(run, model, run.labeled), features(run, model, run.test)
        label = lambda items: torch.tensor([y for _, y in items], device=run.device)  # noqa: E731
        top1 = knn_top1(bank, label(run.labeled), queries, label(run.test), len(run.classes))
        run.record_result(f"knn_{stage}", top1)
        run.log(f"{stage}: kNN top-1 {top1:.2f}% ({len(run.labeled)} labeled videos as the bank, "
                f"{len(run.test)} test videos; {time.time() - t0:.1f} s)")
    run.barrier()


def predict(args):
    """`--stage predict --ckpt F VIDEO ...`: each video's top-5 classes by name, the softmax averaged over
    its --test-clips clips as in evaluation; the classes, model and clips come from the checkpoint. An
    unreadable video gets one line naming it and the others are still answered (exit 1 if any was)."""
    ckpt = load_checkpoint(args.ckpt, "classifier")
    saved = {**vars(args), **{k: ckpt["args"][k] for k in CLIP_FLAGS if k in ckpt["args"]}}
    device = pick_device(args)
    model = R3D(saved["width"], saved["layers"], num_classes=ckpt["arch"]["num_classes"]).to(device)
    model.load_state_dict(ckpt["model"], strict=True)
    model.eval()
    amp = device.type == "cuda" and not args.no_amp
    ds = data.VideoDataset([(v, -1) for v in args.videos], "", "test", saved["frames"], saved["stride"],
                           saved["size"], args.test_clips)
    failed = 0
    for i, video in enumerate(args.videos):
        clips, params, _, _, bad = ds[i]
        if bad:
            print(f"{video}: unreadable ({bad[0][1]})", flush=True)
            failed += 1
            continue
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            x = data.finish(clips.to(device), params.to(device))  # (K, 3, T, S, S)
            p = model(x).float().softmax(dim=-1).mean(dim=0)  # (num_classes,): softmax averaged over clips
        top = p.topk(min(5, len(p)))
        print(f"{video}: " + ", ".join(f"{ckpt['classes'][c]} {100 * v:.1f}%"
                                      for v, c in zip(top.values.tolist(), top.indices.tolist())), flush=True)
    if failed:
        sys.exit(1)


def print_results(out):
    """Every figure of OUT/results.json, as a table."""
    results = read_json(os.path.join(out, "results.json"))
    print(f"\n{out}/results.json\n{'figure':<28}{'top-1 %':>10}")
    for k, v in results.items():
        print(f"{k:<28}{v:>10.2f}")


# ----------------------------------------------------------------------------------------------
# Commands: a stage, semisup's steps, the seed ablation (and demo)


def run_stage(args, stage):
    if stage == "eval":  # the model and its clips as the checkpoint was trained, the data as given
        ckpt = load_checkpoint(args.ckpt, "classifier")
        saved = {k: ckpt["args"][k] for k in CLIP_FLAGS if k in ckpt["args"]}
        args = argparse.Namespace(**{**vars(args), **saved})
    run = Run(args, stage)
    if stage in SSL_STAGES:
        train_ssl(run, stage, args.resume)
    elif stage == "finetune":
        inits = {k: run.need(k, k, "ssl") for k in ENCODERS}  # both present before any work
        for k, init in inits.items():
            train_classifier(run, f"teacher_{k}", args.resume, init=init)
    elif stage == "supervised":
        train_classifier(run, "supervised", args.resume)
    elif stage == "semisup":
        semisup(run)
    elif stage == "eval":  # recorded as eval_<name>: a training stage's own figure stays
        model = load_classifier(run, ckpt, args.ckpt)
        evaluate_and_record(run, "eval_" + os.path.basename(args.ckpt).removesuffix(".pt"), model)
    return run


def semisup(run):
    """`--stage semisup`: the whole method downstream of the two self-supervised encoders, each step that is
    not done yet, in order: with `--student-init both` the student's initial encoder (L_I + L_LL + L_GL),
    both teachers, then the scores and the student. A finished step is reused, an unfinished one resumed
    from its last epoch."""
    inits = {k: run.need(k, k, "ssl") for k in ENCODERS}  # both present before any work
    steps = []  # (name, checkpoint kind, what it is, train(resume))
    if run.args.student_init == "both":
        steps.append(("both", "ssl", "L_I + L_LL + L_GL, the student's initial encoder",
                      lambda resume: train_ssl(run, "both", resume)))
    for k in ENCODERS:
        steps.append((f"teacher_{k}", "classifier", f"the {k} encoder fine-tuned on the labeled videos",
                      lambda resume, k=k: train_classifier(run, f"teacher_{k}", resume, init=inits[k])))
    n = len(steps) + 1
    for i, (name, kind, what, train) in enumerate(steps):
        ckpt = run.checkpoint(name, kind)
        if ckpt is not None and ckpt["epoch"] >= ckpt["epochs"]:
            run.log(f"=== step {i + 1}/{n} {name} ({what}): reusing {run.path(name)}, "
                    f"finished ({ckpt['epochs']} epochs)")
            continue
        how = "training"
        if ckpt is not None:
            how = f"resuming {run.path(name)} ({ckpt['epoch']}/{ckpt['epochs']} epochs)"
        run.log(f"=== step {i + 1}/{n} {name} ({what}): {how}")
        train(ckpt is not None)
    name = "student" if run.args.mix == "similarity" else "student_fixed"
    mix = "the per-video mix" if run.args.mix == "similarity" else "the fixed 0.5 mix"
    run.log(f"=== step {n}/{n} {name} (temporal similarity scores, then the student distilled from {mix} "
            "of both teachers)")
    train_semisup(run, name)
    if run.rank == 0:
        print_results(run.args.out)


def ablation(args):
    """`--demo` on the toy set, `--stage ablation` on any: for each seed of --seeds, the whole method in
    OUT/seed<seed> with that seed (its own self-supervised encoders, labeled split, initialisations and
    augmentation, so the luck of each stage shows in the spread), then the supervised baseline and the
    fixed-mix student. Prints mean +- std over seeds, the paired differences the method's claims rest on,
    per class the teachers' accuracy and the temporal similarity score, and where a per-video mix could
    change a distillation target at all (`mix_check`). Everything also goes to OUT/ablation.json."""
    t0 = time.time()
    table, per_class, mixes, runs = {}, {}, {}, []
    shared = {"subset_seed": subset_seed(args)}  # one subset (if any) for every seed
    for seed in args.seeds:
        out = os.path.join(args.out, f"seed{seed}")
        sub = argparse.Namespace(**{**vars(args), "seed": seed, "out": out, **shared})
        for stage in ENCODERS:  # a finished encoder is reused, an unfinished one resumed
            path = os.path.join(sub.out, f"{stage}.pt")
            ckpt = load_checkpoint(path) if os.path.exists(path) else None
            if ckpt is not None and ckpt["epoch"] >= ckpt["epochs"]:
                continue
            print(f"=== seed {seed}: {stage}", flush=True)
            run_stage(argparse.Namespace(**{**vars(sub), "resume": True}), stage)
        for stage, mix in (("semisup", "similarity"), ("supervised", None), ("semisup", "fixed")):
            print(f"=== seed {seed}: {stage}" + (f" --mix {mix}" if mix else ""), flush=True)
            run = run_stage(argparse.Namespace(**{**vars(sub), "mix": mix or sub.mix}), stage)
            if mix == "similarity":
                runs.append(run)
        mixes[seed] = mix_check(runs[-1])
        for k, v in read_json(os.path.join(sub.out, "results.json")).items():
            table.setdefault(k, []).append(v)
        for k, v in read_json(os.path.join(sub.out, "per_class.json")).items():
            per_class.setdefault(k, []).append(v)
    joined = lambda values, f: " / ".join(f.format(v) for v in values)  # noqa: E731

    seeds = " ".join(map(str, args.seeds))
    print(f"\n| model | top-1 % (mean +- std, seeds {seeds}) | per seed |\n|---|---|---|")
    for label, key in (("supervised-only", "supervised"), ("invariant teacher", "teacher_invariant"),
                       ("distinctive teacher", "teacher_distinctive"),
                       ("student, fixed mix s = 0.5", "student_fixed"),
                       ("TimeBalance student (similarity mix)", "student"),
                       ("kNN, invariant encoder", "knn_invariant"),
                       ("kNN, distinctive encoder", "knn_distinctive")):
        v = table.get(key, [])
        if len(v) < len(args.seeds):  # kNN is measured where an encoder is trained, not where one is reused
            continue
        print(f"| {label} | {statistics.mean(v):.1f} +- {statistics.pstdev(v):.1f} | {joined(v, '{:.1f}')} |")

    print("\n| paired difference (the method's claims) | mean | per seed | goal | met in every seed |\n"
          "|---|---|---|---|---|")
    claims = (("student - supervised-only", "supervised", ">= +15", lambda d: d >= 15),
              ("student - invariant teacher", "teacher_invariant", "> 0", lambda d: d > 0),
              ("student - distinctive teacher", "teacher_distinctive", "> 0", lambda d: d > 0),
              ("similarity mix - fixed mix", "student_fixed", ">= 0", lambda d: d >= 0))
    for label, other, goal, met in claims:
        d = [x - y for x, y in zip(table["student"], table[other])]
        print(f"| {label} | {statistics.mean(d):+.1f} | {joined(d, '{:+.1f}')} | {goal} | "
              f"{'yes' if all(map(met, d)) else 'no'} |")

    print("\n| class | invariant teacher | distinctive teacher | raw s, mean over seeds (min-max) "
          "| normalised s | s of C_I alone | s of C_D alone |\n|---|---|---|---|---|---|---|")
    cache = {seed: read_json(os.path.join(r.args.out, "scores.json")) for seed, r in zip(args.seeds, runs)}
    norm = {seed: normalized_scores(cache[seed]["raw"], [p for p, _ in r.train], args.score_norm)
            for seed, r in zip(args.seeds, runs)}
    for c, name in enumerate(runs[-1].classes):
        acc = [statistics.mean(d[name] for d in per_class[f"teacher_{k}"]) for k in ENCODERS]
        videos = [(seed, p) for seed, r in zip(args.seeds, runs) for p, y in r.train if y == c]
        r = [cache[seed]["raw"][p] for seed, p in videos]
        n = statistics.mean(norm[seed][p] for seed, p in videos)
        s_I, s_D = (statistics.mean(cache[seed]["each"][p][j] for seed, p in videos) for j in (0, 1))
        print(f"| {name} | {acc[0]:.0f} | {acc[1]:.0f} | {statistics.mean(r):.4f} "
              f"({min(r):.4f}-{max(r):.4f}) | {n:.2f} | {s_I:.4f} | {s_D:.4f} |")

    total = {k: sum(m[k] for m in mixes.values()) for k in next(iter(mixes.values()))}
    print(f"\nWhere the mix can matter (unlabeled training videos, all seeds, {total['videos']} in all): "
          f"the teachers disagree with one of them right on {total['one_right']}; the fixed mix's target is "
          f"wrong there (the wrong teacher the more confident) on {total['fixable']}; the similarity mix's "
          f"target is right where the fixed one is wrong on {total['sim_fixes']} and wrong where it is right "
          f"on {total['sim_breaks']}.")
    write_json(os.path.join(args.out, "ablation.json"),
               {"seeds": args.seeds, "top1": table, "per_class": per_class, "mix": mixes})
    print(f"\nwall time {time.time() - t0:.0f} s; per-seed runs in {args.out}/seed*/, tables in "
          f"{args.out}/ablation.json")


def mix_check(run):
    """`mix_counts` on the unlabeled training videos of a finished run: each teacher's prediction (softmax
    averaged over the test clips, as in evaluation) and each video's normalised score."""
    p_I, p_D = (clip_average(run, lambda x, t=t: t(x).softmax(dim=-1), run.unlabeled)
                for t in (teacher(run, k) for k in ENCODERS))  # (N, K) each
    raw = read_json(os.path.join(run.args.out, "scores.json"))["raw"]
    norm = normalized_scores(raw, [p for p, _ in run.train], run.args.score_norm)
    s = torch.tensor([norm[p] for p, _ in run.unlabeled], device=run.device)  # (N,)
    y = torch.tensor([label for _, label in run.unlabeled], device=run.device)  # (N,)
    return mix_counts(p_I, p_D, s, y)


def mix_counts(p_I, p_D, s, y):
    """Where a per-video teacher mix can change the student's target at all (docs/method.md). The argmax
    of p_T = s p_I + (1 - s) p_D is wrong at s = 0.5 while one teacher is right only where the wrong
    teacher is the more confident: those are the videos a per-video weight is for. p_I, p_D (N, K), s, y (N,).
    Returns counts: videos; one_right (exactly one teacher right); fixable (that, and the s = 0.5 target
    wrong); sim_fixes / sim_breaks (the target under s right where the s = 0.5 one is wrong / wrong where
    it is right)."""
    right_I, right_D = p_I.argmax(1) == y, p_D.argmax(1) == y
    fixed_right = tb.mix_teachers(p_I, p_D, torch.full_like(s, 0.5)).argmax(1) == y
    sim_right = tb.mix_teachers(p_I, p_D, s).argmax(1) == y
    one = right_I ^ right_D
    return {"videos": len(y), "one_right": int(one.sum()), "fixable": int((one & ~fixed_right).sum()),
            "sim_fixes": int((sim_right & ~fixed_right).sum()),
            "sim_breaks": int((~sim_right & fixed_right).sum())}


def main(argv=None):
    args = get_args(argv)
    try:
        if args.demo or args.stage == "ablation":
            ablation(args)
        elif args.stage == "predict":
            predict(args)
        else:
            run_stage(args, args.stage)
    except (data.DataError, StageError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Plumbing: a step's optimisation, the learning-rate schedule, loss sums and epoch records


def optimize(opt, terms):
    """Backward and step on the sum of the loss terms. Nothing here reads a value back from the device:
    `Meter` checks the terms for non-finite values when it reads their sums."""
    opt.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    opt.step()


def lr_at(step, total, base, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 (a function of the step, so a resumed
    run follows the same schedule)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def hparams(args, stage):
    return (args.epochs or EPOCHS[stage], args.lr or LR[stage], args.batch_size or BATCH[stage])


class Meter:
    """The per-step plumbing of a stage's loop, out of the loop's body: each step's learning rate, the loss
    terms summed on the device, read back once every --log-every steps and at the epoch's end (reading a
    GPU value makes the host wait for the GPU to drain, so never inside a step), the progress lines, and
    each epoch's checkpoint and log record. A non-finite sum stops the run at that read, naming the stage,
    epoch, steps and term; under DDP the sums are all-reduced first, so every rank stops together instead
    of leaving the others waiting in the next gradient all-reduce. `steps_lines`: a progress line at each
    read (else only the epoch records, every --log-every epochs)."""

    def __init__(self, run, name, opt, lr, epochs, steps, start, steps_lines=True):
        self.run, self.name, self.opt, self.lr = run, name, opt, lr
        self.epochs, self.steps, self.start = epochs, steps, start
        self.steps_lines = steps_lines
        self.bad, self.t0, self.clips = data.BadVideos(), time.time(), 0
        self.sums, self.epoch, self.step, self.checked = {}, start, -1, 0

    def begin(self, epoch, step, failed):
        """Before step `step` of `epoch`: its learning rate, warm-up over the first epoch then cosine decay
        (`lr_at`), times the parameter group's "scale" where it has one; the batch's unreadable videos."""
        if step == 0:
            self.sums, self.checked = {}, 0
        self.epoch, self.step = epoch, step
        self.bad.add(failed)
        for group in self.opt.param_groups:
            lr = lr_at(epoch * self.steps + step, self.epochs * self.steps, self.lr, self.steps)
            group["lr"] = group.get("scale", 1.0) * lr

    def add(self, terms, clips):
        """After the step: its loss terms added to the sums on the device, `clips` counted on every rank."""
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach()
        self.clips += clips * self.run.world
        if (self.step + 1) % self.run.args.log_every == 0:
            means = self.read()
            if self.steps_lines:
                done = (self.epoch - self.start) * self.steps + self.step + 1
                elapsed = time.time() - self.t0
                eta = elapsed / done * ((self.epochs - self.start) * self.steps - done)
                loss = " ".join(f"{k} {v:.4f}" for k, v in means.items())
                self.run.log(f"{self.name} ep {self.epoch} step {self.step + 1}/{self.steps} {loss} | "
                             f"{self.clips / elapsed:.1f} clips/s | eta {eta:.0f}s")

    def read(self):
        """The mean of each term over the epoch's steps so far (over every rank), read from the device at
        once."""
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names])  # (terms,)
        if self.run.world > 1:
            dist.all_reduce(values)
            values = values / self.run.world
        values = values.tolist()
        for k, v in zip(names, values):
            if not math.isfinite(v):
                raise FloatingPointError(f"non-finite loss {k} in {self.name} epoch {self.epoch}, "
                                         f"steps {self.checked + 1}-{self.step + 1}")
        self.checked = self.step + 1
        return {k: v / (self.step + 1) for k, v in zip(names, values)}

    def end_epoch(self, model):
        """After the epoch's last step: the sums read and checked, a checkpoint, one JSON line in
        OUT/log.jsonl."""
        means = self.read()
        self.run.save(self.name, model, self.opt, self.epoch + 1, self.epochs)
        record = dict(stage=self.name, epoch=self.epoch + 1, **means, lr=self.opt.param_groups[-1]["lr"],
                      bad_videos=len(self.bad), clips_per_s=round(self.clips / (time.time() - self.t0), 1),
                      wall_s=round(time.time() - self.t0, 1), run=self.run.id)
        self.run.log_epoch(record)
        last = self.epoch + 1 == self.epochs
        if self.steps_lines or (self.epoch + 1) % self.run.args.log_every == 0 or last:
            self.run.log(json.dumps(record))


# ----------------------------------------------------------------------------------------------
# Plumbing: device, distributed, splits, the run folder, checkpoints, JSON files


class Run:
    """What every stage needs: device, rank, the splits, and the run folder. `stage` (default --stage) decides
    which flags must agree with the run folder's record (`run_record`) and whether the labeled lists are
    written."""

    def __init__(self, args, stage=None):
        self.args, self.stage = args, stage or args.stage
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = pick_device(args, self.world)
        if self.device.type == "cuda":
            # the current device is where the DataLoader's pin-memory thread and every bare "cuda" tensor go
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # every training shape is fixed: each conv's fastest kernel
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend(self.device))
        self.amp = self.device.type == "cuda" and not args.no_amp
        # tells reruns into one --out apart in log.jsonl
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.makedirs(args.out, exist_ok=True)
        generate = args.demo or args.root == DEFAULT_TOY  # never into a folder the user named
        if args.dataset == "toy" and generate and toy_version(args.root) != data.TOY_VERSION:
            if self.rank == 0:
                print(f"generating the toy dataset in {args.root}")
                data.make_toy(args.root)
            self.barrier()
        self.train, self.test, self.classes = read_splits(args)
        subset = args.classes is not None or args.per_class or args.test_per_class
        if subset:
            self.train, self.test, self.classes = data.take_subset(
                self.train, self.test, self.classes, args.classes, args.per_class, args.test_per_class,
                subset_seed(args))
        taken = self.train, self.test
        if args.holdout:  # a validation split out of the training videos: tune on it, never on the test split
            by_class = [[j for j, (_, y) in enumerate(self.train) if y == c]
                        for c in range(len(self.classes))]
            fewest = min(range(len(by_class)), key=lambda c: len(by_class[c]))
            if len(by_class[fewest]) <= args.holdout:
                raise data.DataError(f"--holdout {args.holdout}: class {self.classes[fewest]} has "
                                     f"{len(by_class[fewest])} training videos")
            held = {j for js in by_class for j in js[-args.holdout :]}
            self.test = [it for j, it in enumerate(self.train) if j in held]
            self.train = [it for j, it in enumerate(self.train) if j not in held]
        if args.labeled_list:
            lab = set(data.read_list(args.root, args.labeled_list, args.labeled_list)[0])
            self.labeled = [it for it in self.train if it in lab]
            self.unlabeled = [it for it in self.train if it not in lab]
        else:
            self.labeled, self.unlabeled = data.split_labeled(self.train, args.labeled, args.seed,
                                                              self.classes)
        record = run_record(args, self.stage)  # every rank: a refusal stops them all
        if self.rank == 0:
            write_json(os.path.join(args.out, "run.json"), record)
            for summary in ("results.json", "per_class.json"):  # before any training, not when recording
                set_aside_if_damaged(os.path.join(args.out, summary))
            if subset:  # the videos taken, as a list dataset: `--dataset list --train-list OUT/train.txt ...`
                data.write_list(os.path.join(args.out, "train.txt"), taken[0])
                data.write_list(os.path.join(args.out, "test.txt"), taken[1])
                with open(os.path.join(args.out, "classes.txt"), "w") as f:
                    f.writelines(f"{name}\n" for name in self.classes)
            if self.stage in LABELED_STAGES:
                data.write_list(os.path.join(args.out, "labeled.txt"), self.labeled)
                data.write_list(os.path.join(args.out, "unlabeled.txt"), self.unlabeled)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def log(self, *msg):
        if self.rank == 0:
            print(*msg, flush=True)

    def dataset(self, items, mode, stream=0):
        """`stream` > 0: augmentation drawn apart from stream 0's, for a second loader in the same epoch."""
        a = self.args
        T, k = (a.ssl_frames, a.ssl_stride) if mode == "ssl" else (a.frames, a.stride)
        return data.VideoDataset(items, a.root, mode, T, k, a.size, a.test_clips, a.seed + 1000 * stream)

    def loader(self, ds, batch_size, shuffle=True, workers=None, length=None):
        """One loader for the whole stage; its workers (`workers`, default --workers) persist across epochs.
        Shuffling and augmentation depend on (seed, epoch, video) only (`data.EpochSampler`; `batches` sets
        the epoch), so a resumed run sees the same batches as an uninterrupted one. The loader draws its
        workers' base seed from a generator of its own, not from the global one, which would otherwise move
        once more in a resumed run (a persistent loader draws on its first pass only) and change every
        dropout mask after it. `length`: items per rank and epoch, if fewer than the dataset's. Evaluation
        and scoring (no shuffle) shard their items themselves and make one pass."""
        workers = self.args.workers if workers is None else workers
        rank, world = (self.rank, self.world) if shuffle else (0, 1)
        sampler = data.EpochSampler(len(ds), self.args.seed, shuffle, rank, world, length=length)
        return torch.utils.data.DataLoader(
            ds, batch_size, sampler=sampler, drop_last=shuffle, num_workers=workers, collate_fn=data.collate,
            pin_memory=self.device.type == "cuda", persistent_workers=shuffle and workers > 0,
            generator=torch.Generator().manual_seed(self.args.seed))

    def batches(self, loader, epoch, clip_major=False):
        """The batches of `epoch` as (x, labels, indices, failed), x (N, 3, T, S, S) float, all on the device;
        x finished there (`data.finish`: colour, normalisation, erase, on the whole batch). The uint8 clips,
        their parameters, labels and indices leave pinned memory without blocking (a blocking copy would wait
        for the GPU to drain), and the next batch is taken from the loader and its copy issued before this
        one is handed out. On CUDA the copies run on a stream of their own, so batch k+1's copy overlaps
        step k; the compute stream waits for a batch's copy only when it takes the batch. Several clips per
        video (B, n, ...) are flattened video-major (B*n: evaluation, scoring) or with `clip_major`
        clip-major (n*B: the SSL batch, clip c of every video together)."""
        loader.sampler.set_epoch(epoch)
        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        ahead = None
        for clips, params, y, idx, failed in loader:
            with torch.cuda.stream(copy_stream) if cuda else contextlib.nullcontext():
                copied = [t.to(self.device, non_blocking=True) for t in (clips, params, y, idx)]
                done = torch.cuda.Event() if cuda else None
                if cuda:
                    done.record()
            if ahead is not None:
                yield self.finish(*ahead, clip_major)
            ahead = copied, done, failed
        if ahead is not None:
            yield self.finish(*ahead, clip_major)

    def finish(self, copied, done, failed, clip_major):
        """One batch copied to the device: the compute stream waits for its copy (CUDA), then the batch is
        reordered and the float half of its augmentation applied."""
        clips, params, y, idx = copied
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for t in copied:  # made on the copy stream, used on this one: not to be reused before it is done
                t.record_stream(compute)
        if clips.dim() == 6:  # (B, n, 3, T, S, S)
            if clip_major:
                clips, params = clips.transpose(0, 1), params.transpose(0, 1)  # (n, B, 3, T, S, S), (n, B, P)
            clips, params = clips.flatten(0, 1), params.flatten(0, 1)  # (N, 3, T, S, S), (N, P)
        x = data.finish(clips, params)  # (N, 3, T, S, S) float
        if self.args.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x, y, idx, failed

    def model(self, **kw):
        a = self.args
        m = R3D(a.width, a.layers, **kw).to(self.device)
        if a.channels_last and self.device.type == "cuda":
            m = m.to(memory_format=torch.channels_last_3d)
        return m

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def path(self, name):
        return os.path.join(self.args.out, f"{name}.pt")

    def checkpoint(self, name, kind):
        """OUT/<name>.pt if there is one (None if not), checked: of `kind`, of this run's width and depth,
        and trained with this run's defining flags (`defining`)."""
        path = self.path(name)
        if not os.path.exists(path):
            return None
        ckpt = load_checkpoint(path, kind)
        a = self.args
        if (ckpt["arch"]["width"], ckpt["arch"]["layers"]) != (a.width, a.layers):
            raise StageError(f"{path}: saved model {ckpt['arch']} differs from this run's --width {a.width} "
                             f"--layers {' '.join(map(str, a.layers))}")
        # an encoder depends on the videos it saw; a classifier on its labeled split and clips too
        flags = "encoder" if kind == "ssl" else "labeled"
        saved = {k: v for k, v in defining(ckpt["args"], flags).items()
                 if k in ckpt["args"] or k == "subset_seed"}  # a checkpoint older than a flag: not compared
        diff = differing(saved, defining(a, flags))
        if diff:
            flag, old, new = diff
            raise StageError(f"{path} was trained with --{flag.replace('_', '-')} {old}, this run has {new}: "
                             "use another --out for a new run (or retrain it)")
        return ckpt

    def need(self, name, stage, kind):
        """The finished checkpoint of an earlier stage, or a one-line error naming the stage to run."""
        path = self.path(name)
        ckpt = self.checkpoint(name, kind)
        if ckpt is None:
            raise StageError(f"{path} not found: run --stage {stage} first (same --out)")
        if ckpt["epoch"] < ckpt["epochs"]:
            raise StageError(f"{path} is unfinished ({ckpt['epoch']}/{ckpt['epochs']} epochs): "
                             f"run --stage {stage} --resume")
        return ckpt

    def save(self, name, model, opt, epoch, epochs):
        """Atomic: a temporary file, then a rename; a kill during the save leaves the previous one."""
        if self.rank == 0:
            m = model.module if hasattr(model, "module") else model
            cuda = self.device.type == "cuda"
            state = dict(model=m.state_dict(), optimizer=opt.state_dict(), epoch=epoch, epochs=epochs,
                         arch=m.arch, args=vars(self.args), classes=self.classes, rng=torch.get_rng_state(),
                         cuda_rng=torch.cuda.get_rng_state(self.device) if cuda else None)
            tmp = self.path(name) + ".tmp"
            torch.save(state, tmp)
            os.replace(tmp, self.path(name))
        self.barrier()

    def resume(self, name, model, opt, resume):
        """Start epoch of stage `name`: 0, or where its checkpoint stopped (if `resume`)."""
        if not (resume and os.path.exists(self.path(name))):
            return 0
        ckpt = load_checkpoint(self.path(name))
        m = model.module if hasattr(model, "module") else model
        if ckpt["arch"] != m.arch:
            raise StageError(f"{self.path(name)}: saved model {ckpt['arch']} differs from this run's "
                             f"{m.arch}")
        m.load_state_dict(ckpt["model"], strict=True)
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # e.g. a teacher saved before the backbone got its own learning rate
            raise StageError(f"{self.path(name)}: its optimizer state does not fit this version ({e}); "
                             "train the stage anew without --resume") from None
        torch.set_rng_state(ckpt["rng"])
        if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:  # GPU dropout draws from it
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.log(f"resuming {name} after epoch {ckpt['epoch']}")
        return ckpt["epoch"]

    def wrap(self, model):
        if self.world > 1:
            return torch.nn.parallel.DistributedDataParallel(model)
        return model

    def log_epoch(self, record):
        if self.rank == 0:
            with open(os.path.join(self.args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def record_result(self, name, top1):
        if self.rank == 0:
            path = os.path.join(self.args.out, "results.json")
            results = read_json(path)
            results[name] = round(top1, 2)
            write_json(path, results)


def pick_device(args, world=1):
    """--device as a torch.device with an index on CUDA (torch.cuda.set_device needs one): cuda:LOCAL_RANK
    under torchrun, else the index given or 0."""
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def backend(device):
    """The process group's backend: NCCL for CUDA tensors, gloo for the CPU ones (collectives of Python
    objects, a CPU tensor that slipped through). NCCL alone takes CUDA tensors only."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def toy_version(root):
    """The version of the toy set in `root` (None: none there, or one written before versions were kept)."""
    try:
        return read_json(os.path.join(root, "toy.json")).get("version")
    except ValueError:
        return None


def read_splits(args):
    if args.dataset in ("toy", "ucf101"):
        return data.read_ucf101(args.root, args.splits or args.root, args.fold)
    if args.dataset == "hmdb51":
        return data.read_hmdb51(args.root, args.splits or args.root, args.fold, args.hmdb_unused)
    if not (args.train_list and args.test_list):
        raise data.DataError("--dataset list needs --train-list and --test-list")
    return data.read_list(args.root, args.train_list, args.test_list, args.class_names)


# The flags that define what a stage computes: a later stage in the same --out, or a checkpoint reused,
# must agree with them (`run_record`, `Run.checkpoint`). Paths compare as absolute paths.
DATA_FLAGS = ("dataset", "root", "splits", "fold", "hmdb_unused", "train_list", "test_list", "class_names",
              "classes", "per_class", "test_per_class", "subset_seed", "holdout")
MODEL_FLAGS = ("width", "layers")
SPLIT_FLAGS = ("labeled", "labeled_list", "seed")
DEFINING = {"data": DATA_FLAGS,
            "encoder": DATA_FLAGS + MODEL_FLAGS,
            "ssl": DATA_FLAGS + MODEL_FLAGS + ("ssl_frames", "ssl_stride", "size"),
            "labeled": DATA_FLAGS + MODEL_FLAGS + ("frames", "stride", "size") + SPLIT_FLAGS}
LABELED_STAGES = ("finetune", "supervised", "semisup")
CLIP_FLAGS = ("width", "layers", "frames", "stride", "size")  # what eval and predict take from a checkpoint
PATH_FLAGS = ("root", "splits", "train_list", "test_list", "class_names", "labeled_list")


def defining(args, kind):
    """{flag: value} of the flags that define a stage or checkpoint of `kind` (a key of DEFINING)."""
    args = args if isinstance(args, dict) else vars(args)
    out = {}
    for flag in DEFINING[kind]:
        value = args.get(flag)
        if flag == "subset_seed":  # the seed the subset was drawn with, where one was drawn
            value = subset_seed(args) if args.get("per_class") or args.get("test_per_class") else None
        if flag in PATH_FLAGS and value is not None:
            value = os.path.abspath(value)
        out[flag] = value
    return out


def subset_seed(args):
    """The seed of the --per-class / --test-per-class draws: --subset-seed, else --seed. `args`: the
    namespace or a checkpoint's dict of it."""
    args = args if isinstance(args, dict) else vars(args)
    return args.get("seed") if args.get("subset_seed") is None else args["subset_seed"]


def differing(recorded, current):
    """The first flag recorded in both with different values, as (flag, recorded, current), or None."""
    for flag, value in current.items():
        if flag in recorded and recorded[flag] != value:
            return flag, recorded[flag], value
    return None


def run_record(args, stage):
    """OUT/run.json: the defining flags of the stages run in this folder, each recorded when a stage that
    depends on it first runs. A stage whose flags differ from the record on one that matters to it stops
    here, before anything is written. Returns the record to write."""
    path = os.path.join(args.out, "run.json")
    try:
        recorded = read_json(path)
    except ValueError as e:
        raise StageError(f"{e}: remove it, or use another --out") from None
    kind = "ssl" if stage in SSL_STAGES else "labeled" if stage in LABELED_STAGES else "data"
    current = defining(args, kind)
    diff = differing(recorded, current)
    if diff:
        flag, old, new = diff
        raise StageError(f"--{flag.replace('_', '-')} {new} differs from {old}, recorded in {path} by this "
                         f"run's earlier stages: use another --out for a new run (or give {old})")
    return {**recorded, **current}


def teacher(run, k):
    """The finished teacher_<k>.pt of this run folder, frozen, in eval mode."""
    path = run.path(f"teacher_{k}")
    model = load_classifier(run, run.need(f"teacher_{k}", "finetune", "classifier"), path)
    return model.eval().requires_grad_(False)


def load_classifier(run, ckpt, path):
    if ckpt["arch"]["num_classes"] != len(run.classes):
        raise StageError(f"{path}: {ckpt['arch']['num_classes']} classes, dataset has {len(run.classes)}")
    m = run.model(num_classes=len(run.classes), dropout=0.5)
    if ckpt["arch"] != m.arch:
        raise StageError(f"{path}: saved model {ckpt['arch']} differs from this run's {m.arch} "
                         "(--width/--layers)")
    m.load_state_dict(ckpt["model"], strict=True)
    return m


CKPT_KEYS = ("model", "optimizer", "epoch", "epochs", "arch", "args", "classes", "rng")


def load_checkpoint(path, kind=None):
    """A checkpoint written by `Run.save`, loaded with weights_only=True: only tensors, numbers, strings,
    lists and dicts are rebuilt, so nothing stored in the file can run code. A file that is missing,
    unreadable, truncated, not one of ours, or not of `kind` ("ssl" encoder / "classifier") raises
    StageError with one line naming it, before any training."""
    if not os.path.isfile(path):
        raise StageError(f"{path} is not a file" if os.path.exists(path) else f"{path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, KeyError, OSError...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["the file ended early"]
        code = [line for line in lines if "global" in line.lower()]  # a class or function the file would call
        if isinstance(e, pickle.UnpicklingError) and code:
            raise StageError(f"{path}: refused: it holds Python objects beyond weights, which could run code "
                             f"when loaded ({code[0]})") from None
        why = next((line for line in lines if "unsupported" in line.lower()), lines[0])
        raise StageError(f"{path}: not a readable checkpoint, damaged or truncated? "
                         f"({type(e).__name__}: {why[:120]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("arch"), dict):
        raise StageError(f"{path}: not a checkpoint of this project (no 'arch' entry)")
    arch_keys = ("width", "layers", "num_classes", "proj_dim")
    missing = [k for k in CKPT_KEYS if k not in ckpt] + [f"arch.{k}" for k in arch_keys
                                                         if k not in ckpt["arch"]]
    if missing:
        raise StageError(f"{path}: not a checkpoint of this project, missing {', '.join(missing)}")
    if kind == "classifier" and not ckpt["arch"]["num_classes"]:
        raise StageError(f"{path} is a self-supervised encoder, not a classifier: fine-tune it first")
    if kind == "ssl" and not ckpt["arch"]["proj_dim"]:
        raise StageError(f"{path} is a classifier, not a self-supervised encoder (it has no projection head)")
    return ckpt


def read_json(path):
    """The JSON object stored in `path`, or {} if there is no file; ValueError if the file is damaged."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object)")
    return obj


def set_aside_if_damaged(path):
    """A damaged summary file is renamed to PATH.damaged (then .damaged.1, ...), never deleted, and a
    fresh one is started, so that the figure of the run about to start is not lost when it records."""
    try:
        read_json(path)
    except ValueError as e:
        aside, k = path + ".damaged", 0
        while os.path.exists(aside):
            k += 1
            aside = f"{path}.damaged.{k}"
        os.replace(path, aside)
        write_json(path, {})
        print(f"warning: {e}: moved it to {aside} and started a new one", file=sys.stderr, flush=True)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# Command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every help string; the description keeps its lines."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--stage", choices=STAGES, help="the stage to run (see above)")
    p.add_argument("--demo", action="store_true",
                   help="write the toy set if missing, then --stage ablation on it (each of --seeds)")
    p.add_argument("--out", type=str, default="runs/default",
                   help="run folder: checkpoints, scores, logs, results.json")
    p.add_argument("videos", nargs="*", help="--stage predict: the video files to classify")
    a = p.add_argument_group("data (data.py)").add_argument
    a("--dataset", choices=["toy", "ucf101", "hmdb51", "list"], default="toy", help="split format")
    a("--root", type=str, default=None,
      help=f"video folder (default for toy: {DEFAULT_TOY}, written there if missing, as with --demo)")
    a("--splits", type=str, default=None,
      help="ucf101: ucfTrainTestlist folder; hmdb51: testTrainMulti_7030_splits (default: --root)")
    a("--fold", type=int, default=1, choices=[1, 2, 3], help="split number (ucf101, hmdb51)")
    a("--hmdb-unused", action="store_true", help="hmdb51: add the split's unused (flag 0) videos to the pool")
    a("--train-list", type=str, default=None, help="list: training videos, lines 'relative/path label'")
    a("--test-list", type=str, default=None, help="list: test videos, lines 'relative/path label'")
    a("--class-names", type=str, default=None, help="list: class names, one a line, line k naming label k")
    a("--classes", type=_classes, default=None,
      help="a subset of the classes: N (the first N in the dataset's order) or names 'A,B,C'")
    a("--per-class", type=int, default=None, help="at most this many training videos a class (drawn, --seed)")
    a("--test-per-class", type=int, default=None, help="at most this many test videos a class (--seed)")
    a("--subset-seed", type=int, default=None, help="seed of the --per-class draws, if not --seed")
    a("--holdout", type=int, default=0,
      help="for tuning: the last N training videos of each class replace the test split")
    a("--labeled", type=float, default=3, help="labeled subset: fraction (<1) or videos per class (>=1)")
    a("--labeled-list", type=str, default=None, help="reuse a saved or published labeled list")
    a("--seed", type=int, default=0, help="seed of the labeled split, subset, initialisation, augmentation")
    a("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ablation and demo: the seeds to run")
    a = p.add_argument_group("schedule (left out: each step's own default)").add_argument
    a("--epochs", type=int, default=None,
      help=f"epochs of every step the command runs (semisup, ablation, demo: each step), default {EPOCHS}")
    a("--batch-size", type=int, default=None,
      help=f"videos per batch (semisup: labeled and unlabeled each), applies like --epochs, default {BATCH}")
    a("--lr", type=float, default=None,
      help=f"Adam learning rate, cosine decay after 1 warm-up epoch (paper 1e-4), applies like --epochs, "
           f"default {LR}")
    a("--weight-decay", type=float, default=1e-4, help="Adam weight decay")
    a("--finetune-backbone-lr", type=float, default=0.3,
      help="teachers: the SSL backbone's learning rate as a fraction of --lr (the new classifier's); 1 = the "
           "paper's full fine-tuning, lower keeps more of what each SSL objective learned")
    a = p.add_argument_group("model and clips").add_argument
    a("--frames", type=int, default=8, help="frames per train/test clip (paper 8)")
    a("--stride", type=int, default=2, help="frame stride of train/test clips (paper 2)")
    a("--ssl-frames", type=int, default=8, help="frames per sparse and dense SSL clip (paper 16)")
    a("--ssl-stride", type=int, default=4, help="sparse clip stride; 4 dense clips tile its span (paper 4)")
    a("--size", type=int, default=32, help="crop size in pixels (paper 224)")
    a("--test-clips", type=int, default=10, help="clips per test video, softmax averaged (paper 10)")
    a("--width", type=int, default=16, help="base width of the 3D CNN (widths w, 2w, 4w, 8w)")
    a("--layers", type=int, nargs=4, default=[1, 1, 1, 1], help="residual blocks per stage")
    a = p.add_argument_group("method (docs/method.md)").add_argument
    a("--tau", type=float, default=0.1, help="temperature of h(u, v) = exp(u.v / tau)")
    a("--w-labeled", type=float, default=50.0, help="distillation weight, labeled clips (paper 50, MSE)")
    a("--w-unlabeled", type=float, default=100.0, help="distillation weight, unlabeled (paper 100, MSE)")
    a("--distill", choices=["mse", "kl"], default="mse", help="distillation: MSE of softmaxes (paper) or KL")
    a("--mix", choices=["similarity", "fixed"], default="similarity", help="teacher mix: per-video s, or 0.5")
    a("--student-init", choices=["distinctive", "both"], default="distinctive",
      help="the student's initial encoder: the distinctive one (L_D), or 'both' (L_I + L_LL + L_GL, the "
           "paper's; semisup trains it first)")
    a("--score-norm", choices=["none", "minmax", "rank"], default="minmax",
      help="normalisation of s over the training videos; the raw (c+1)/2 sits in a narrow band on small data")
    a = p.add_argument_group("running").add_argument
    a("--ckpt", type=str, default=None, help="eval, predict: the classifier checkpoint")
    a("--resume", action="store_true",
      help="continue the stage from its last saved epoch (semisup resumes its unfinished steps anyway)")
    a("--workers", type=int, default=2, help="DataLoader worker processes")
    a("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    a("--no-amp", action="store_true", help="CUDA: disable bfloat16 autocast")
    a("--channels-last", action="store_true", help="CUDA: use channels_last_3d memory format")
    a("--log-every", type=int, default=10, help="a progress line (and a read of the loss sums) every N steps")
    args = p.parse_args(argv)
    if not args.stage and not args.demo:
        p.error("give --stage NAME or --demo")
    for flag in ("frames", "stride", "ssl_frames", "size", "test_clips", "width", "workers", "log_every"):
        if getattr(args, flag) < (0 if flag == "workers" else 1):
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.ssl_stride < 4 or args.ssl_stride % 4:
        p.error(f"--ssl-stride must be a multiple of 4 (the 4 dense clips tile the sparse span), "
                f"got {args.ssl_stride}")
    for flag in ("epochs", "batch_size", "lr"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if args.finetune_backbone_lr < 0:
        p.error(f"--finetune-backbone-lr must be >= 0, got {args.finetune_backbone_lr}")
    if args.labeled <= 0:
        p.error(f"--labeled must be > 0, got {args.labeled}")
    if args.holdout < 0:
        p.error(f"--holdout must be >= 0, got {args.holdout}")
    for flag in ("per_class", "test_per_class"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.stage in ("eval", "predict") and not args.ckpt:
        p.error(f"--stage {args.stage} needs --ckpt")
    if args.stage == "predict" and not args.videos:
        p.error("--stage predict needs one or more video files")
    if args.videos and args.stage != "predict":
        p.error(f"unrecognized arguments: {' '.join(args.videos)} (video files are for --stage predict)")
    args.root = args.root or (DEFAULT_TOY if args.dataset == "toy" else None)
    if args.root is None and args.stage != "predict":
        p.error(f"--dataset {args.dataset} needs --root")
    return args


def _classes(text):
    """--classes: "5" -> 5 (the first five), "A,B" -> ["A", "B"]."""
    if text.isdigit():
        return int(text)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected N or comma-separated class names, got {text!r}")
    return names


if __name__ == "__main__":
    main()
