"""Every stage of TimeBalance (docs/method.md; the README shows the commands). The defaults suit small data on a
CPU; --recipe released trains as the authors' released code does (RELEASED). Read from the top: `semisup`, the
four steps in order, each handing its data, model and loss terms to `fit`, the loop of every stage; then
evaluation and the commands; the run folder, checkpoints and flags last. Tools beside it: python tools/NAME.py.
"""
import argparse
import collections
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's warning; no NumPy here
import torch  # noqa: E402
import torch.distributed as dist
import torch.nn.functional as F

import data
import tb
import models
from models import BACKBONE, load_backbone

DEFAULT_TOY = "data/toy"  # written by `python tools/toy.py data/toy`
SSL_STAGES = ("invariant", "distinctive", "both")
ENCODERS = ("invariant", "distinctive")  # the two self-supervised encoders that become the teachers
STAGES = SSL_STAGES + ("finetune", "supervised", "semisup")
# Each step's epochs, Adam's rate, videos per batch and process (semisup: labeled and unlabeled each) and weight
# decay at CPU scale; --epochs, --lr, --batch-size, --weight-decay override them
STEPS = {"invariant": (16, 1e-3, 8, 1e-4), "distinctive": (20, 1e-3, 8, 1e-4), "both": (8, 1e-3, 8, 1e-4),
         "finetune": (15, 3e-4, 16, 1e-4), "supervised": (15, 1e-3, 16, 1e-4), "semisup": (25, 5e-4, 16, 1e-4)}
# --recipe released: what the authors' released code (DAVEISHAN/TimeBalance) trains with, each value from the file
# named; a flag given on the command line wins (`recipe_text` names what it overrode). The README lists departures.
RELEASED_STEPS = {**dict.fromkeys(SSL_STAGES, (1000, 5e-3, 40, 1e-9)),  # configs/conf_ssl.py
                  "finetune": (150, 1e-4, 16, 0.0),  # conf_finetune.py; finetune.py: Adam, no weight decay
                  "supervised": (150, 1e-4, 16, 0.0),  # the same script from no SSL checkpoint
                  "semisup": (150, 1e-4, 16, 0.0)}  # conf_semisup.py; train_semisup.py: Adam, no weight decay
RELEASED = {
    "arch": "r3d50", "size": 224,  # configs: R3D50, reso_h, reso_w; models/model.py: pytorchvideo's slow_r50
    "ssl_forward": "per-clip",  # pretraining.py: model((clip, type)) for each of the 10 clip types
    "last_batch": "keep",  # DataLoader(...) without drop_last in every released script
    "ssl_frames": 16, "ssl_stride": 4,  # conf_ssl.py: num_frames, sr_ratio
    "frames": 8, "stride": 2, "test_clips": 10,  # conf_finetune.py, conf_semisup.py: num_frames, fix_skip, num_modes
    "test_crop": 0.8,  # conf_semisup.py: cropping_facs = [0.8]
    "ssl_aug": "released",  # dataloaders/dl_ssl.py: random_array = np.random.rand(10, 9), one row a clip
    "aug": "released",  # dataloaders/dl_semisup_2clips.py: baseline_dataloader_train_strong
    "balance": "authors",  # pretraining.py: the losses' sums (tb.BALANCE)
    "teacher": "finetune", "finetune_backbone_lr": 1.0,  # finetune.py: Adam over model.parameters()
    "dropout": 0.5,  # slow_r50's head: Dropout(0.5) before the replaced projection (models/model.py)
    "student_init": "both",  # conf_semisup.py: checkpoint_tclr_checkpoint (L_I + L_LL + L_GL)
    "student_forward": "separate",  # train_semisup.py: model(inputs_labeled), then model(inputs_unlabeled)
    "epoch": "labeled",  # train_semisup.py: zip(data_loader_labeled, data_loader_unlabeled); finetune.py
    "schedule": "released"}  # pretraining.py: patience; finetune.py, train_semisup.py: loss_based


Schedule = collections.namedtuple("Schedule", "epochs lr batch_size weight_decay")  # of a step: `hparams`
Batch = collections.namedtuple("Batch", "x y index failed")  # x (N, 3, T, S, S) on the device: `Run.batches`
StudentLoaders = collections.namedtuple("StudentLoaders", "labeled unlabeled")  # one batch of each a step
Record = collections.namedtuple("Record", "settings finished path ckpt")  # a step as a run folder holds it


class StageError(Exception):
    """A stage cannot start: missing input checkpoint, mismatched model, bad flag (exit code 2)."""


# ----------------------------------------------------------------------------------------------
# The method (docs/method.md): `semisup` runs its four steps in order, each a function below it.


def semisup(run):
    """`--stage semisup`: (1) the two self-supervised encoders (with --student-init both, the student's initial
    encoder too), (2) a teacher from each, (3) every training video's temporal similarity score, (4) the student
    distilled from the teachers mixed by the score. A finished step is reused, an unfinished one resumed."""
    a = run.args
    student = "student" if a.mix == "similarity" else "student_fixed"
    steps = [(k, "ssl", lambda resume, k=k: train_ssl(run, k, resume))  # (1)
             for k in ENCODERS + (("both",) if a.student_init == "both" else ())]
    steps += [(f"teacher_{k}", "classifier", lambda resume, k=k: make_teacher(  # (2)
        run, f"teacher_{k}", finished_checkpoint(run, k, "ssl"), resume)) for k in ENCODERS]
    steps += [(student, "classifier", lambda resume: train_student(run, student, resume))]  # (3) `scores`, then (4)
    for i, (name, kind, train) in enumerate(steps):
        reuse_or_train(run, f"step {i + 1}/{len(steps)}", name, kind, train)
    results = read_json(os.path.join(a.out, "results.json"))
    run.log(f"\n{a.out}/results.json\n{'figure':<28}{'top-1 %':>10}\n"
            + "\n".join(f"{k:<28}{v:>10.2f}" for k, v in results.items()))


def train_ssl(run, stage, resume=False):
    """(1) A self-supervised encoder on every training video, no label used: `stage` invariant (L_I),
    distinctive (L_D = L_LL + L_GL) or both (the student's start in the paper); then its kNN check."""
    a = run.args
    epochs, lr, bs, wd = hparams(a, stage)
    ds = run.dataset(run.train, "ssl")
    if len(ds) < bs * run.world or bs * run.world < 2:  # the other videos of a batch are the negatives
        raise StageError(f"--batch-size {bs}: {len(ds)} training videos give no full batch of at least 2 "
                         f"videos over {run.world} processes")
    length = len(ds) // run.world
    if a.last_batch == "keep" and length % bs == 1:  # one video a process: no negative alone, no BatchNorm statistics
        length -= 1
        run.log(f"{stage}: --last-batch keep: an epoch's last batch would hold one video a process; it is left out")
    torch.manual_seed(a.seed)  # initialisation: the same alone or inside --stage semisup
    model = run.model(proj_dim=128)
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=wd)
    gather = GatherVideos.apply if run.world > 1 else None  # the negatives: every process's videos
    groups = 10 if a.ssl_forward == "per-clip" else 1

    def terms(net, batch):
        return ssl_terms(net, batch.x, stage, a.tau, run.autocast, gather, a.balance, groups)

    fit(run, stage, model, opt, [run.loader(ds, bs, length=length)], terms, epochs, lr, resume)
    knn_check(run, stage, model)


def ssl_terms(net, x, stage, tau, autocast=contextlib.nullcontext, gather=None, balance="mean", groups=1):
    """The self-supervised losses of `stage` on one batch. x (10B, 3, T, S, S): B videos' 10 clips each, clip-major,
    in the order of `data.SSL_CLIPS`. `gather`: every process's embeddings (the negatives are the whole batch's).
    `balance`: a key of `tb.BALANCE`. `groups`: 10, each clip type through the network alone (per-clip), or 1."""
    B = x.shape[0] // 10
    with autocast():
        # slices L of the first 2 parts alone (the sparse clips, data.SSL_CLIPS); no loss reads the dense clips'
        g, L = net(x, out="ssl", groups=groups, local=2 if groups == 10 else None)  # (10B, D), (10B, 4, D)
    g, L = g.float().view(10, B, -1), L.float().view(10, B, 4, -1)  # (10, B, D), (10, B, 4, D)
    if gather is not None:  # (10, world * B, ...): the videos of process 0, then of 1, ...
        g, L = (gather(t.transpose(0, 1)).transpose(0, 1) for t in (g, L))
    c = data.SSL_CLIPS
    g_a, g_b = g[c["sparse_A"]], g[c["sparse_B"]]  # the sparse clip under augmentations A and B: (B, D)
    L_a, L_b = L[c["sparse_A"]], L[c["sparse_B"]]  # its 4 temporal slices L_1..L_4: (B, 4, D)
    G_a = g[c["dense_A"]].transpose(0, 1)  # the 4 dense clips G_1..G_4 under A: (B, 4, D)
    G_b = g[c["dense_B"]].transpose(0, 1)  # and under B
    w_dense, w_ll, w_gl = tb.BALANCE[balance]
    terms = {}
    if stage in ("invariant", "both"):
        terms["L_I"] = tb.invariant_loss(g_a, g_b, G_a, G_b, tau, w_dense)
    if stage in ("distinctive", "both"):
        terms["L_D"] = tb.distinctive_loss(L_a, L_b, G_a, G_b, tau, w_ll, w_gl)
    return terms


def make_teacher(run, name, init, resume=False):
    """(2) A teacher from the encoder of the SSL checkpoint `init`: --teacher class-mean or finetune."""
    if run.args.teacher == "class-mean":
        return class_mean_teacher(run, name, init)
    train_classifier(run, name, resume, init)


@torch.no_grad()
def class_mean_teacher(run, name, init):
    """(2) The default teacher: the encoder of the SSL checkpoint `init` with the nearest-class-mean classifier
    of its features on the labeled videos' clips, and no training step. With mu_c the mean of the unit feature
    vectors of class c's clips (each labeled video's evaluation clips) and mean ||h|| over those clips,
        w_c = (mu_c / ||mu_c||) / (t * mean ||h||),   b_c = 0,   t = --teacher-t
    so that logits_c = ||h|| cos(h, mu_c) / (t * mean ||h||): a clip's argmax_c is its nearest class mean by
    cosine, about as sharp as cos / t. Saves OUT/<name>.pt and records its test top-1."""
    model = classifier_from(run, name, init).eval()

    def unit_and_norm(x):  # (B*n, 3, T, S, S) -> (B*n, C + 1): each clip's unit feature and its norm
        h = model.features(x).mean(dim=(2, 3, 4))  # (B*n, C)
        return torch.cat([F.normalize(h, dim=-1), h.norm(dim=-1, keepdim=True)], dim=1)
    u = clip_average(run, unit_and_norm, run.labeled)[0]  # (N_l, C + 1): over each video's clips
    y = torch.tensor([label for _, label in run.labeled], device=run.device)  # (N_l,)
    mu = torch.zeros(len(run.classes), u.shape[1] - 1, device=run.device).index_add_(0, y, u[:, :-1])  # (K, C)
    model.fc[-1].weight.copy_(F.normalize(mu, dim=-1) / (run.args.teacher_t * u[:, -1].mean()))  # (K, C)
    model.fc[-1].bias.zero_()
    save_checkpoint(run, name, model, None, 0, 0)
    evaluate(run, model, name)


def train_classifier(run, name, resume=False, init=None):
    """(2) A teacher fine-tuned with cross-entropy on the labeled clips from the backbone of the SSL checkpoint
    `init` (--teacher finetune), or from scratch the supervised baseline; the backbone at --finetune-backbone-lr
    times the classifier's rate (0: frozen, BatchNorm statistics too). Saves OUT/<name>.pt, records its top-1."""
    a = run.args
    epochs, lr, bs, wd = hparams(a, "finetune" if init else "supervised")
    model = classifier_from(run, name, init)
    scale = a.finetune_backbone_lr if init is not None else 1.0
    backbone = [p for k, p in model.named_parameters() if k.startswith(BACKBONE)]
    head = [p for k, p in model.named_parameters() if not k.startswith(BACKBONE)]
    for p in backbone:
        p.requires_grad_(scale > 0)
    opt = torch.optim.Adam([{"params": backbone, "scale": scale}, {"params": head, "scale": 1.0}], lr,
                           weight_decay=wd)
    terms = lambda net, batch: classifier_terms(net, batch.x, batch.y, run.autocast)  # noqa: E731
    fit(run, name, model, opt, [classifier_loader(run, bs)], terms, epochs, lr, resume, progress=False)
    evaluate(run, model, name)


def classifier_terms(net, x, y, autocast=contextlib.nullcontext):
    """Cross-entropy of the classifier on one labeled batch, x (B, 3, T, S, S), y (B,)."""
    with autocast():
        logits = net(x).float()  # (B, K)
    return {"CE": F.cross_entropy(logits, y)}


@torch.no_grad()
def video_scores(run, f_I, f_D, items):
    """(3) The temporal similarity score of each video of `items` (docs/method.md "Temporal similarity score"):
    4 consecutive clips (`data.score_indices`) embedded by both SSL encoders' heads, e_I and e_D (B, 4, D);
    s = `tb.temporal_similarity`. Returns s (N,) on the device in item order, and the unreadable videos."""
    s, bad = [], data.BadVideos()
    for x, _, idx, failed in run.batches(run.loader(run.dataset(items, "score"), 8, shuffle=False), 0):
        bad.add(failed)  # x (B*4, 3, T, S, S)
        e_I, e_D = (f(x, out="ssl")[0].view(len(idx), 4, -1) for f in (f_I, f_D))  # (B, 4, D)
        s.append(tb.temporal_similarity(e_I, e_D))  # (B,)
    return torch.cat(s), bad


def train_student(run, name, resume=False, s_video=None):
    """(4) The student, from the backbone of --student-init: per step a labeled and an unlabeled batch, the frozen
    teachers' p_T = s p_I + (1 - s) p_D on the same clips (`student_terms`), s the video's score (--mix fixed:
    0.5; `s_video`: {path: s} given for every training video)."""
    a = run.args
    epochs, lr, bs, wd = hparams(a, "semisup")
    init = finished_checkpoint(run, a.student_init, "ssl")
    teachers = [teacher(run, k) for k in ENCODERS]
    if s_video is None:
        s_video = scores(run)["s"] if a.mix == "similarity" else {p: 0.5 for p, _ in run.train}
    loaders = student_loaders(run, bs)
    s_lab, s_unl = (torch.tensor([s_video[p] for p, _ in loader.dataset.items], device=run.device)
                    for loader in loaders)  # (N_l,), (N_u,): each video's score
    torch.manual_seed(a.seed)  # initialisation and dropout: the same alone or inside --stage semisup
    model = run.model(num_classes=len(run.classes), dropout=a.dropout)
    load_backbone(model, init["model"], source=run.path(a.student_init))  # L_D, or L_I + L_LL + L_GL (paper)
    run.log(f"{name}: starts from the backbone of {run.path(a.student_init)}")
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=wd)

    def terms(net, lab, unl):  # a labeled and an unlabeled Batch
        s = torch.cat([s_lab[lab.index], s_unl[unl.index]])  # (B_l + B_u,): each video's score
        return student_terms(net, teachers, lab.x, lab.y, unl.x, s, a, run.autocast)

    fit(run, name, model, opt, loaders, terms, epochs, lr, resume)
    evaluate(run, model, name)


def student_terms(net, teachers, x_l, y_l, x_u, s, a, autocast=contextlib.nullcontext):
    """The student's loss on a labeled batch x_l (B_l, 3, T, S, S), y_l (B_l,) and an unlabeled batch x_u
    (B_u, 3, T, S, S), in one forward (--student-forward joint) or one each (separate); s (B_l + B_u,) the scores:
        p_T = s p_I + (1 - s) p_D  (the frozen teachers on the same clips, `tb.mix_teachers`)
        loss = CE(student, y) + w_l D(p_S, p_T) on labeled + w_u D(p_S, p_T) on unlabeled, D = --distill."""
    n_l = x_l.shape[0]
    x = torch.cat([x_l, x_u])  # (B_l + B_u, 3, T, S, S)
    with torch.no_grad(), autocast():
        p_I, p_D = (t(x).float().softmax(dim=-1) for t in teachers)  # (B_l + B_u, K) each
    p_T = tb.mix_teachers(p_I, p_D, s)
    with autocast():
        logits = net(x) if a.student_forward == "joint" else torch.cat([net(x_l), net(x_u)])
    logits = logits.float()  # (B_l + B_u, K)
    return {"CE": F.cross_entropy(logits[:n_l], y_l),
            "distill_l": a.w_labeled * tb.distillation_loss(logits[:n_l], p_T[:n_l], a.distill),
            "distill_u": a.w_unlabeled * tb.distillation_loss(logits[n_l:], p_T[n_l:], a.distill)}


# ----------------------------------------------------------------------------------------------
# What the method's steps are built from: the classifiers' start, the loaders, the scores' cache, the gather


def classifier_from(run, name, init=None):
    """A new classifier seeded by --seed, with the backbone of the SSL checkpoint `init` where one is given."""
    torch.manual_seed(run.args.seed)  # initialisation and dropout: the same alone or inside --stage semisup
    model = run.model(num_classes=len(run.classes), dropout=run.args.dropout)
    if init is not None:
        skipped = load_backbone(model, init["model"], source=f"{name} init")
        run.log(f"{name}: loaded the SSL backbone, skipped {len(skipped)} head keys ({skipped[0]} ...)")
    return model


def classifier_loader(run, bs):
    """The labeled clips. --epoch train: as many clips an epoch as training videos, the labeled subset repeated
    (each repeat its own augmentation); labeled: each labeled video once, as released."""
    repeats = max(1, len(run.train) // len(run.labeled)) if run.args.epoch == "train" else 1
    ds = run.dataset(run.labeled * repeats, "train")
    bs = min(bs, len(ds) // run.world)
    if bs == 0:
        raise StageError(f"{len(ds)} labeled clips an epoch give no batch to each of {run.world} processes")
    return run.loader(ds, bs)


def student_loaders(run, bs):
    """The student's loaders, one batch of each a step. --epoch train: an epoch is a pass over the unlabeled
    videos, the labeled subset repeated to give a labeled batch a step; labeled: a pass over the labeled ones
    (the release's zip ends with its labeled loader). --workers are split in proportion to the clips."""
    a, unl_ds = run.args, run.dataset(run.unlabeled, "train")
    n_u, n_l = len(unl_ds) // run.world, len(run.labeled) // run.world  # each process's
    bs_l = min(bs, n_l)
    count = math.ceil if a.last_batch == "keep" else math.floor
    steps = count(n_u / bs) if a.epoch == "train" else count(n_l / max(1, bs_l))
    if steps == 0 or bs_l == 0:
        raise StageError(f"--batch-size {bs}: {len(unl_ds)} unlabeled and {len(run.labeled)} labeled videos "
                         f"give no batch to each of {run.world} processes")
    lab_length = steps * bs_l if a.epoch == "train" else min(steps * bs_l, n_l)  # labeled: its last batch partial
    lab_ds = run.dataset(run.labeled * math.ceil(lab_length * run.world / len(run.labeled)), "train",
                         second_stream=True)
    labeled_workers = min(a.workers - 1, max(1, round(a.workers * bs_l / (bs + bs_l)))) if a.workers > 1 else 0
    return StudentLoaders(labeled=run.loader(lab_ds, bs_l, workers=labeled_workers, length=lab_length),
                          unlabeled=run.loader(unl_ds, bs, workers=a.workers - labeled_workers,
                                               length=min(steps * bs, n_u)))


def scores(run):
    """Every training video's score (`video_scores`), cached in OUT/scores.json with its encoders' times and its
    settings: {"raw": {path: s}, "s": {path: s normalised over the training videos (--score-norm)}}."""
    source, own = {k: os.path.getmtime(run.path(k)) for k in ENCODERS}, settings(run.args, "scores")
    cache = read_json(os.path.join(run.args.out, "scores.json"))
    raw = cache.get("raw")
    if not (cache.get("source") == source and cache.get("settings") == own and isinstance(raw, dict)
            and all(isinstance(raw.get(p), float) for p, _ in run.train)):
        cache = {"source": source, "settings": own, **compute_scores(run)}
        if run.rank == 0:
            write_json(os.path.join(run.args.out, "scores.json"), cache)
    paths = [p for p, _ in run.train]
    s = tb.normalize_scores(torch.tensor([cache["raw"][p] for p in paths]), run.args.score_norm)  # (N,)
    return {**cache, "s": dict(zip(paths, s.tolist()))}


def compute_scores(run):
    """`video_scores` of this process's share of the training videos, gathered from every process; in float32,
    without TF32 or kernels chosen by timing, so that the roundings (and --score-norm rank's ties) stay put."""
    # building the encoders leaves the global RNG as it was: the student's init is the same, cached or not
    with torch.random.fork_rng(devices=[run.device] if run.cuda else []):
        f_I, f_D = (load_into(run.model(proj_dim=128), ckpt, run.path(k)).eval() for k, ckpt in encoders(run).items())
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        share, bad = video_scores(run, f_I, f_D, run.train[run.rank :: run.world])  # (n,): this process's share
    s = share.new_zeros(len(run.train))  # (N,)
    s[run.rank :: run.world] = share  # the other shares are 0 here
    all_sum(run, s)  # every video's s, in place
    raw = dict(zip((p for p, _ in run.train), s.tolist()))  # one read from the device
    run.log(f"scores: {len(raw)} videos, raw s in [{min(raw.values()):.3f}, {max(raw.values()):.3f}]"
            + (f", {len(bad)} unreadable" if bad else ""))
    return {"raw": raw}


class GatherVideos(torch.autograd.Function):
    """Every process's rows (dim 0, equal counts), in process order. Backward: each process's own rows' gradient
    summed over the processes, so DDP's average is the gradient of one process with the whole batch."""

    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


# ----------------------------------------------------------------------------------------------
# The training loop of every stage


def fit(run, name, model, opt, loaders, terms_of, epochs, lr, resume=False, progress=True):
    """Trains `model` on the zipped `Batch`es of `loaders`; `terms_of(net, *batches)` gives the stage's loss
    terms, whose sum is the loss. Each epoch ends with a checkpoint (what --resume continues from)."""
    steps = min(len(loader) for loader in loaders)  # zip ends with the shortest
    start, losses = resume_from(run, name, model, opt) if resume and os.path.exists(run.path(name)) else (0, [])
    net, meter = distributed(run, model), Meter(run, name, epochs, steps, progress)
    for epoch in range(start, epochs):
        train_mode(run, model, epoch)
        rate = rate_of(run.args.schedule, name, lr, epoch, epochs, steps, losses)  # step -> learning rate
        meter.start(epoch)
        for step, batches in enumerate(zip(*(run.batches(loader, epoch) for loader in loaders))):
            for group in opt.param_groups:  # a group's "scale" multiplies the rate
                group["lr"] = group.get("scale", 1.0) * rate(step)
            terms = terms_of(net, *batches)
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            opt.step()
            meter.add(step, terms, batches)
        means = meter.read(steps)  # the epoch's mean of each term
        losses.append(sum(means.values()))
        save_checkpoint(run, name, model, opt, epoch + 1, epochs, losses)
        meter.end(means, opt.param_groups[-1]["lr"])


def distributed(run, model):
    """The model as each step runs it: under several processes DDP, with BatchNorm synchronised on CUDA."""
    if run.world > 1 and run.device.type == "cuda":  # BatchNorm statistics over the whole batch (in place)
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model) if run.world > 1 else model


def train_mode(run, model, epoch):
    """Training mode, but for a frozen part's BatchNorm layers; dropout reseeded per process and epoch."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    if run.world > 1:
        torch.manual_seed((run.args.seed * 1009 + epoch) * 1009 + run.rank)


def rate_of(schedule, name, lr, epoch, epochs, steps, losses):
    """The learning rate of each step of `epoch`: --schedule cosine (`lr_at`) or released (`released_lr`)."""
    if schedule == "released":
        rate = released_lr(lr, epoch, losses, name in SSL_STAGES)
        return lambda step: rate
    return lambda step: lr_at(epoch * steps + step, epochs * steps, lr, steps)


class Meter:
    """What `fit` reports. The terms are summed on the device and read (`read`) every --log-every steps and at the
    epoch's end, never inside a step (a read makes the host wait for the GPU). Each epoch adds a line to
    OUT/log.jsonl: its clips/s over its own wall time, the stage's running wall time. `progress`: a console line
    at each read."""

    def __init__(self, run, name, epochs, steps, progress):
        self.run, self.name, self.epochs, self.steps, self.progress = run, name, epochs, steps, progress
        self.bad, self.t0 = data.BadVideos(), time.time()

    def start(self, epoch):
        self.epoch, self.sums, self.done, self.clips, self.t_epoch = epoch, {}, 0, 0, time.time()

    def add(self, step, terms, batches):
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach()
        self.clips += sum(b.x.shape[0] for b in batches) * self.run.world
        for b in batches:
            self.bad.add(b.failed)
        if (step + 1) % self.run.args.log_every == 0:
            means, elapsed = self.read(step + 1), time.time() - self.t_epoch
            eta = elapsed / (step + 1) * ((self.epochs - self.epoch) * self.steps - step - 1)
            if self.progress:
                self.run.log(f"{self.name} ep {self.epoch} step {step + 1}/{self.steps} {means_text(means)} | "
                             f"{self.clips / elapsed:.1f} clips/s | eta {eta:.0f}s")

    def read(self, steps):
        """The sums read from the device at once, as means over the processes (so that every process stops
        together) and the `steps`; a non-finite one stops the run."""
        values = all_sum(self.run, torch.stack(list(self.sums.values())))[0] / self.run.world  # (terms,)
        means = {k: v / steps for k, v in zip(self.sums, values.tolist())}
        for k, v in means.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"non-finite loss {k} in {self.name} epoch {self.epoch}, steps "
                                         f"{self.done + 1}-{steps}")
        self.done = steps
        return means

    def end(self, means, lr):
        run, now = self.run, time.time()
        entry = dict(stage=self.name, epoch=self.epoch + 1, **means, lr=lr, bad_videos=len(self.bad),
                     clips_per_s=round(self.clips / (now - self.t_epoch), 1), wall_s=round(now - self.t0, 1),
                     run=run.id, machine=run.machine)
        if run.rank == 0:
            with open(os.path.join(run.args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.progress or (self.epoch + 1) % run.args.log_every == 0 or self.epoch + 1 == self.epochs:
            run.log(f"{self.name} epoch {self.epoch + 1}/{self.epochs}: {means_text(means)} | lr {lr:.2e} | "
                    f"{entry['clips_per_s']} clips/s this epoch | {entry['wall_s']:.0f} s")


def means_text(means):
    return " ".join(f"{k} {v:.4f}" for k, v in means.items())


def lr_at(step, total, base, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 (a resumed run follows the same schedule)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def released_lr(base, epoch, losses, ssl):
    """The released rate for `epoch`, replayed from `losses` (each earlier epoch's mean loss): a resume follows it.
    SSL (pretraining.py): the warm-up compares the epoch with `warmup = True`, so the rate is 0.01 base from epoch
    0 until 5 epochs in a row have not lowered the best loss, then base / 2, base / 4 after 5 more, ...
    Classifiers, student (finetune.py, train_semisup.py, loss_based): 10 warm-up epochs from 0.01 to 1 of base,
    then by the last loss L: base / 2 where 0.5 <= L < 0.8, base / 10 where L < 0.4, else the rate stays (its
    steps at L < 0.25, 0.2, 0.05 follow L < 0.4 in one if-elif and never run)."""
    if not ssl:
        rate = base
        for e in range(epoch + 1):
            if e < 10:
                rate = base * (0.01 + 0.11 * e)  # np.linspace(0.01, 1, 10)[e]
            elif 0.5 <= losses[e - 1] < 0.8:
                rate = base / 2
            elif losses[e - 1] < 0.4:
                rate = base / 10
        return rate
    rate, best, stalled, drops = 0.01 * base, math.inf, 0, 0
    for loss in losses[:epoch]:
        if loss < best:
            best, stalled = loss, 0
        elif loss > best:
            stalled += 1
        if stalled == 5:  # checked at the next epoch's start
            drops, stalled = drops + 1, 0
            rate = base / 2**drops
    return rate


def hparams(args, stage):
    """(epochs, rate, batch size, weight decay) of a step: each flag where given, else the step's default."""
    given = (args.epochs, args.lr, args.batch_size, args.weight_decay)
    table = RELEASED_STEPS if args.recipe == "released" else STEPS
    return Schedule(*(table[stage][i] if g is None else g for i, g in enumerate(given)))


# ----------------------------------------------------------------------------------------------
# Evaluation: K clips per test video, centre crop, softmax averaged; a kNN check of an encoder


@torch.no_grad()
def clip_average(run, fn, items):
    """fn of each video's --test-clips clips (centre crop), averaged over its clips: (N, ...) on the device
    in item order, and {index: message} of the videos that could not be read. fn: (B*n, 3, T, S, S) ->
    (B*n, ...). Evaluation, the kNN check and tools/predict.py all see a video this way."""
    out, bad = [], data.BadVideos()
    for x, _, idx, failed in run.batches(run.loader(run.dataset(items, "test"), 4, shuffle=False), 0):
        bad.add(failed)
        with run.autocast():
            v = fn(x).float()  # (B*n, ...)
        out.append(v.view(len(idx), -1, *v.shape[1:]).mean(dim=1))  # (B, ...)
    return torch.cat(out), bad


def probabilities(run, model, items):
    """Each video's class probabilities, the softmax of its clips averaged: (N, K), and the unreadable."""
    return clip_average(run, lambda x: model(x).softmax(dim=-1), items)


def all_sum(run, *tensors):
    """Each process's tensors summed over the processes, in place (a process takes every world-th item)."""
    if run.world > 1:
        for t in tensors:
            dist.all_reduce(t)
    return tensors


@torch.no_grad()
def evaluate(run, model, name):
    """Top-1 (%) over ALL test videos, an unreadable one counted wrong, recorded as `name`. Each process
    takes every world-th video (no padding, nothing counted twice)."""
    model.eval()
    if run.world > 1:  # DDP copies rank 0's BN statistics into the others at each forward, so after the
        for b in model.buffers():  # last step they differ by one update: evaluate with rank 0's (saved)
            dist.broadcast(b, 0)
    items, K = run.test[run.rank :: run.world], len(run.classes)
    p, bad = probabilities(run, model, items)  # (N, K)
    y = torch.tensor([label for _, label in items], device=run.device)  # (N,)
    hit = (p.argmax(dim=1) == y).float() * torch.tensor([float(i not in bad) for i in range(len(items))],
                                                         device=run.device)  # (N,)
    correct = torch.zeros(K, device=run.device).index_add_(0, y, hit)  # (K,)
    total = torch.zeros(K, device=run.device).index_add_(0, y, torch.ones_like(hit))  # (K,)
    n_bad = torch.tensor(float(len(bad)), device=run.device)
    all_sum(run, correct, total, n_bad)
    top1 = 100 * correct.sum().item() / total.sum().item()
    record(run, name, top1, dict(zip(run.classes, (100 * correct / total.clamp(min=1)).tolist())))
    unreadable = f" ({int(n_bad)} unreadable, counted wrong)" if n_bad else ""
    run.log(f"{name}: test top-1 {top1:.2f}% over {int(total.sum())} videos{unreadable}")


def knn_check(run, stage, model):
    """Whether pretraining learned anything before a label is spent on it: weighted kNN top-1 (`tb.knn_top1`)
    of the encoder's pooled backbone features, the labeled videos as the bank, the test videos as queries.
    Recorded as knn_<stage>; every process computes it, so none waits for another."""
    t0 = time.time()
    model.eval()
    pooled = lambda x: model.features(x).mean(dim=(2, 3, 4))  # noqa: E731  (B*n, C)
    bank, queries = (F.normalize(clip_average(run, pooled, items)[0], dim=-1)  # (N, C), unit vectors
                     for items in (run.labeled, run.test))
    labels = [torch.tensor([y for _, y in items], device=run.device) for items in (run.labeled, run.test)]
    top1 = tb.knn_top1(bank, labels[0], queries, labels[1], len(run.classes))
    record(run, f"knn_{stage}", top1)
    run.log(f"{stage}: kNN top-1 {top1:.2f}% ({len(run.labeled)} labeled videos as the bank, "
            f"{len(run.test)} test videos; {time.time() - t0:.1f} s)")


def record(run, name, top1, per_class=None):
    """A figure into OUT/results.json, rounded to 0.01 (and per class, to 0.1, into per_class.json)."""
    if run.rank == 0:
        per_class = per_class and {k: round(v, 1) for k, v in per_class.items()}
        for file, value in (("results.json", round(top1, 2)), ("per_class.json", per_class)):
            if value is not None:
                write_json(os.path.join(run.args.out, file), {**read_json(os.path.join(run.args.out, file)),
                                                              name: value})


# ----------------------------------------------------------------------------------------------
# Commands: a stage, semisup's steps


def run_stage(args, stage):
    run = Run(args, stage)
    if stage in SSL_STAGES:
        train_ssl(run, stage, args.resume)
    elif stage == "finetune":
        for k, init in encoders(run).items():  # both present before any work
            make_teacher(run, f"teacher_{k}", init, args.resume)
    elif stage == "supervised":
        train_classifier(run, "supervised", args.resume)
    elif stage == "semisup":
        semisup(run)


def reuse_or_train(run, label, name, kind, train, what=None):
    """A step of a command: OUT/<name>.pt reused if finished, resumed if not, else trained; `what` it is."""
    how = "fine-tuned on" if run.args.teacher == "finetune" else "with its nearest-class-mean classifier on"
    what = what or WHAT[name.split("_")[0]].format(name.split("_")[-1], how, run.args.mix)
    ckpt = checkpoint(run, name, kind)
    run.barrier()  # every process has looked before the first one writes it (a step may take no training step)
    if ckpt is not None and ckpt["epoch"] >= ckpt["epochs"]:
        run.log(f"=== {label} {name} ({what}): reusing {run.path(name)}, finished ({ckpt['epochs']} epochs)")
        return
    how = f"resuming {run.path(name)} ({ckpt['epoch']}/{ckpt['epochs']} epochs)" if ckpt else "training"
    run.log(f"=== {label} {name} ({what}): {how}")
    train(ckpt is not None)


WHAT = {"invariant": "L_I", "distinctive": "L_D = L_LL + L_GL", "both": "L_I + L_LL + L_GL, the student's initial "
        "encoder", "teacher": "the {0} encoder {1} the labeled videos",
        "student": "temporal similarity scores, then the student distilled from the teachers, --mix {2}"}


def main(argv=None):
    args = get_args(argv)
    command(lambda: run_stage(args, args.stage))


def command(fn):
    """fn() as a command (train.py's, a tool's): a bad input ends it with one line and exit code 2, and the
    process group is ended however it ends."""
    try:
        result = fn()
        if dist.is_initialized():  # every process ends together: none tears down the group under a busy one
            dist.barrier()
        return result
    except (data.DataError, StageError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The run: device and processes, splits, the run folder, batches on the device


class Run:
    """What every stage needs: the device and process group, the splits and the run folder, and the
    builders of datasets, loaders, device batches and models."""

    def __init__(self, args, stage=None, dataset=True):
        self.args, self.stage = args, stage or args.stage
        self.world, self.rank, self.device = start_processes(args.device)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda and not args.no_amp
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # tells reruns into one --out apart
        self.machine = machine(self.device)  # in every line of OUT/log.jsonl
        if args.recipe == "released":
            self.log(recipe_text(args))
        if not dataset:  # tools/predict.py: the videos are named on its command line
            return
        if args.dataset == "toy" and not os.path.exists(os.path.join(args.root, "classInd.txt")):
            raise data.DataError(f"no toy set in {args.root}: write it with python tools/toy.py {args.root}")
        self.train, self.test, self.classes = read_splits(args)
        if args.holdout:  # a validation split out of the training videos: tune on it, never on the test split
            self.train, self.test = data.hold_out(self.train, self.classes, args.holdout)
        if self.world > min(len(self.train), len(self.test)):  # each process evaluates and scores its share
            raise data.DataError(f"{len(self.train)} training and {len(self.test)} test videos for {self.world} "
                                 "processes: each process needs one of each")
        if args.labeled_list:
            self.labeled, self.unlabeled = data.labeled_from_list(self.train, args.labeled_list, self.classes)
        else:
            self.labeled, self.unlabeled = data.split_labeled(self.train, args.labeled, args.seed,
                                                              self.classes)
        self.open_folder()

    def open_folder(self):
        """The run folder, checked before anything is written: the flags that reach every step against OUT/run.json,
        each step this command reaches against what it recorded (a damaged file stops the stage); then --from's
        steps taken, the flags recorded, the labeled lists written."""
        a = self.args
        path, steps = os.path.join(a.out, "run.json"), steps_of(a, self.stage)
        taken = take_from(self, steps) if a.source else {}  # every rank
        run_json = read_json(path)
        check_step(self, "run", Record(run_json, True, f"{path} by this run's earlier stages", None))
        for name, got in ((n, recorded(a.out, n)) for n in steps):
            if got:
                check_step(self, name, got)
        for summary in ("results.json", "per_class.json", "scores.json"):
            read_json(os.path.join(a.out, summary))
        if self.rank == 0:
            os.makedirs(a.out, exist_ok=True)
            if a.source:
                take(self, taken)
            source = {"from": a.source, "taken": list(taken)} if a.source else {}
            # tools/evaluate.py ("eval") records only the flags that reach every step: its network is the checkpoint's
            write_json(path, {**run_json, **settings(a, "run" if self.stage == "eval" else None), **source})
            if self.stage in LABELED_STAGES:
                for name, items in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
                    data.write_lines(os.path.join(a.out, f"{name}.txt"), (f"{p} {label}" for p, label in items))
        self.barrier()  # the files taken are there for every process

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def log(self, *msg, **kw):
        if self.rank == 0:
            print(*msg, **kw, flush=True)

    def path(self, name):
        return os.path.join(self.args.out, f"{name}.pt")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def model(self, **kw):
        a = self.args
        return models.build(a.arch, width=a.width, layers=a.layers, **kw).to(self.device)

    def classifier(self, ckpt, path, classes=None):
        """The classifier saved in `ckpt` (read from `path`), for this run's classes or `classes`."""
        model = self.model(num_classes=len(classes or self.classes))  # eval mode: dropout plays no part
        return load_into(model, ckpt, path)

    def dataset(self, items, mode, second_stream=False):
        """`data.VideoDataset` of `items`, its videos kept decoded while they fit in --cache-mb. `second_stream`:
        augmentation drawn apart from the first's, for a second loader in one epoch."""
        a = self.args
        T, k = (a.ssl_frames, a.ssl_stride) if mode in ("ssl", "score") else (a.frames, a.stride)
        ds = data.VideoDataset(items, a.root, mode, T, k, a.size, a.test_clips, a.seed + 1000 * second_stream,
                               a.aug, a.ssl_aug, a.test_crop, released=a.recipe == "released")
        data.keep_decoded(sorted({ds.path(i) for i in range(len(ds))}), ds.decode_size, a.cache_mb * 2**20)
        return ds

    def loader(self, ds, batch_size, shuffle=True, workers=None, length=None):
        """One loader for a whole stage, its workers kept across epochs. A batch depends on (seed, epoch, video)
        only (`data.EpochSampler`): a resumed run sees an uninterrupted one's; the loader's own generator seeds
        the workers, leaving the global RNG (dropout) alone. `length`: items per process and epoch, if fewer than
        all. Without `shuffle` (evaluation, scores): one pass over the items in order."""
        workers = self.args.workers if workers is None else workers
        rank, world = (self.rank, self.world) if shuffle else (0, 1)
        return torch.utils.data.DataLoader(
            ds, batch_size, sampler=data.EpochSampler(len(ds), self.args.seed, shuffle, rank, world, length),
            drop_last=shuffle and self.args.last_batch == "drop", num_workers=workers, collate_fn=data.collate,
            pin_memory=self.cuda, persistent_workers=shuffle and workers > 0,
            generator=torch.Generator().manual_seed(self.args.seed))

    def batches(self, loader, epoch):
        """The `Batch`es of `epoch`: x (N, 3, T, S, S) float on the device, augmented there
        (`data.augment_on_device`). Clip sets (B, n, ...) are flattened clip-major for SSL (n*B), else video-major."""
        loader.sampler.set_epoch(epoch)
        for clips, params, y, idx, failed in loader:
            clips, params, y, idx = (t.to(self.device, non_blocking=True) for t in (clips, params, y, idx))
            if clips.dim() == 6:  # (B, n, 3, T, S, S)
                if loader.dataset.mode == "ssl":
                    clips, params = clips.transpose(0, 1), params.transpose(0, 1)  # (n, B, 3, T, S, S), (n, B, P)
                clips, params = clips.flatten(0, 1), params.flatten(0, 1)  # (N, 3, T, S, S), (N, P)
            yield Batch(data.augment_on_device(clips, params), y, idx, failed)  # x (N, 3, T, S, S) float


def recipe_text(args):
    """What --recipe released set, and the released values that flags given on the command line overrode."""
    value = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    steps = ", ".join(f"{s} {'/'.join(f'{v:g}' for v in RELEASED_STEPS[s])}" for s in ("invariant", "semisup"))
    given = [f"{flag(k)} {getattr(args, k)}" for k in ("epochs", "lr", "batch_size", "weight_decay")
             if getattr(args, k) is not None]
    given += [f"{flag(k)} {value(getattr(args, k))} (released: {value(v)})" for k, v in args.overrode.items()]
    set_ = ", ".join(f"{flag(k)} {value(v)}" for k, v in RELEASED.items() if k not in args.overrode)
    return (f"--recipe released set {set_}; epochs/lr/batch/weight decay: {steps} (train.RELEASED)"
            + (f"\n--recipe released: given on the command line instead: {', '.join(given)}" if given else ""))


def start_processes(device):
    """(world, rank, device) of this process: under torchrun the process group is started (NCCL for CUDA
    tensors, gloo for the rest), CUDA set up (cudnn.benchmark: every training shape is fixed)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(device, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # where the pin-memory thread and bare "cuda" tensors go
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def machine(device):
    """What ran a stage, for its log: the GPU's name, or the CPU's model, cores and threads; torch's version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}"
    try:
        with open("/proc/cpuinfo") as f:  # Linux; elsewhere the architecture's name
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}"


def pick_device(name, world=1):
    """--device as a torch.device with an index on CUDA (torch.cuda.set_device needs one): cuda:LOCAL_RANK
    under torchrun, else the index given or 0."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def read_splits(args):
    if args.dataset in ("toy", "ucf101"):
        return data.read_ucf101(args.root, args.splits or args.root, args.fold)
    if args.dataset == "hmdb51":
        return data.read_hmdb51(args.root, args.splits or args.root, args.fold, args.hmdb_unused)
    if not (args.train_list and args.test_list):
        raise data.DataError("--dataset list needs --train-list and --test-list")
    return data.read_list(args.root, args.train_list, args.test_list, args.class_names)


# ----------------------------------------------------------------------------------------------
# What defines each step of a run folder, checkpoints, JSON files

# The flags that cannot change what a step computes. Every other flag of `parser` defines each step it reaches
# (`settings`): a flag added later defines every step unless it is named here or in the three lists below.
NOT_DEFINING = ("help", "stage", "out", "source", "resume", "workers", "cache_mb", "device", "no_amp", "log_every")
# Flags that reach only some steps: the classifiers' training (not the encoders, their kNN check or the scores),
# the teachers' (and the student's through them), the student's. The schedule is resolved per step (`hparams`);
# the class-mean teachers and the scores take no training step and read none of it.
CLASSIFIER_FLAGS = ("aug", "dropout", "epoch")
TEACHER_FLAGS = ("teacher", "teacher_t", "finetune_backbone_lr")
STUDENT_FLAGS = ("w_labeled", "w_unlabeled", "distill", "mix", "score_norm", "student_init", "student_forward")
SCHEDULE = ("epochs", "lr", "batch_size", "weight_decay")
LABELED_STAGES = ("finetune", "supervised", "semisup")
PATH_FLAGS = ("root", "splits", "train_list", "test_list", "class_names", "labeled_list", "source")


def settings(args, name=None):
    """{flag: value} of the flags that define step `name` in `args` (a namespace, or a checkpoint's dict of one:
    a flag newer than it is left out), the schedule as the step resolves it. `name`: a checkpoint's, "scores",
    "run" (the flags that reach every step), or None (every defining flag as given: OUT/run.json)."""
    args = args if isinstance(args, dict) else vars(args)
    kind = "teacher" if str(name).startswith("teacher_") else "student" if str(name).startswith("student") else name
    narrow = {None: (), "student": (), "teacher": STUDENT_FLAGS, "supervised": TEACHER_FLAGS + STUDENT_FLAGS}.get(
        kind, CLASSIFIER_FLAGS + TEACHER_FLAGS + STUDENT_FLAGS)  # the SSL steps, the scores, the run
    skip = NOT_DEFINING + narrow + (SCHEDULE if name else ())
    got = {a.dest: args[a.dest] for a in parser()._actions if a.dest not in skip and a.dest in args}
    table = {"teacher": "finetune", "student": "semisup"}.get(kind, kind)
    if table in STEPS and (kind != "teacher" or args.get("teacher") == "finetune"):
        got.update(zip(SCHEDULE, hparams(argparse.Namespace(**args), table)))
    return got


def steps_of(args, stage):
    """{name: the steps upstream of it} of each step that `stage` reaches, in the order they run: OUT/<name>.pt,
    or OUT/scores.json for "scores". semisup's are the whole method."""
    teachers = {f"teacher_{k}": (k,) for k in ENCODERS}
    if stage == "finetune":
        return {**dict.fromkeys(ENCODERS, ()), **teachers}
    if stage != "semisup":
        return {stage: ()} if stage in SSL_STAGES + ("supervised",) else {}
    scores = {"scores": ENCODERS} if args.mix == "similarity" else {}
    student = "student" if args.mix == "similarity" else "student_fixed"
    return {**dict.fromkeys(ENCODERS + (("both",) if args.student_init == "both" else ()), ()), **teachers,
            **scores, student: (*teachers, *scores, args.student_init)}


def recorded(folder, name, kind=None):
    """The `Record` of step `name` in run folder `folder` (its checkpoint checked to be of `kind`), or None where
    it has none. The scores' record is scores.json, without a checkpoint."""
    path = os.path.join(folder, "scores.json" if name == "scores" else f"{name}.pt")
    if not os.path.exists(path):
        return None
    if name == "scores":
        return Record(read_json(path).get("settings", {}), True, path, None)
    ckpt = load_checkpoint(path, kind)
    return Record(ckpt.get("settings") or settings(ckpt["args"], name), ckpt["epoch"] >= ckpt["epochs"], path, ckpt)


def differs(run, name, record):
    """Where step `name`'s `Record` differs from this command's settings of it: the line that names the first
    such flag (--recipe first: it sets many), else None. An encoder's schedule is its own stage's: another
    command that reads it finished leaves it as it is."""
    own = name not in SSL_STAGES or not record.finished or run.stage == name
    for k in ("classes", "per_class", "test_per_class"):  # flags of older versions: now tools/subset.py's lists
        if record.settings.get(k) is not None:
            return (f"{record.path} was trained on a subset (--{k.replace('_', '-')} {record.settings[k]}), a flag "
                    "train.py no longer has: use another --out (tools/subset.py writes a subset's lists)")
    for k, v in sorted(settings(run.args, name).items(), key=lambda kv: kv[0] != "recipe"):
        was = record.settings.get(k, v)
        if was != v and (own or k not in SCHEDULE):
            flag = "--" + k.replace("_", "-")
            return (f"{flag} {v} differs from {was}, recorded in {record.path}: use another --out for a new run "
                    f"(--from {run.args.out} takes the steps that match), or give {flag} {was}")


def check_step(run, name, record):
    """`differs`, stopping the run with its line."""
    line = differs(run, name, record)
    if line:
        raise StageError(line)


def take_from(run, steps):
    """--from DIR into a new --out: {name: file} of each step of `steps` that DIR holds finished, with this
    command's settings and every step upstream of it taken too; the others are trained here. Reads only."""
    a, source = run.args, run.args.source
    if os.path.realpath(source) == os.path.realpath(a.out):
        raise StageError(f"--from {source} is --out itself: --from starts a new run folder from another")
    if os.path.isdir(a.out) and os.listdir(a.out):  # a run (run.json) or any other file: nothing is overwritten
        raise StageError(f"--from: {a.out} already holds a run (or other files): give --from a new --out")
    if not os.path.isfile(os.path.join(source, "run.json")):
        raise StageError(f"--from {source}: " + ("holds no run (no run.json)" if os.path.isdir(source) else
                                                 "no such folder"))
    for f in ("run.json", "results.json", "per_class.json"):  # a damaged one stops the run before any is written
        read_json(os.path.join(source, f))
    taken = {}
    for name, upstream in steps.items():
        got = recorded(source, name)
        if got and got.finished and all(u in taken for u in upstream) and not differs(run, name, got):
            taken[name] = got.path
    return taken


def take(run, taken):
    """The files of the steps `take_from` took, linked into OUT (copied where the file system cannot), and their
    figures."""
    a = run.args
    for path in taken.values():
        try:
            os.link(path, os.path.join(a.out, os.path.basename(path)))
        except OSError:  # another file system, or one without links
            shutil.copy2(path, a.out)  # with its time: scores.json knows its encoders by theirs
    keys = [f"knn_{k}" if k in SSL_STAGES else k for k in taken]
    for f in ("results.json", "per_class.json"):
        write_json(os.path.join(a.out, f), {k: v for k, v in read_json(os.path.join(a.source, f)).items() if k in keys})
    run.log(f"--from {a.source}: took {', '.join(taken) or 'no step'}; the other steps are trained here")


def checkpoint(run, name, kind):
    """OUT/<name>.pt if there is one (None if not), checked: of `kind` ("ssl" / "classifier"), trained with this
    command's settings of it (`differs`)."""
    got = recorded(run.args.out, name, kind)
    if got is None:
        return None
    check_step(run, name, got)
    return got.ckpt


def finished_checkpoint(run, name, kind, stage=None):
    """The finished checkpoint OUT/<name>.pt, or a one-line error naming the stage to run (default `name`)."""
    ckpt, stage = checkpoint(run, name, kind), stage or name
    if ckpt is None:
        raise StageError(f"{run.path(name)} not found: run --stage {stage} first (same --out)")
    if ckpt["epoch"] < ckpt["epochs"]:
        raise StageError(f"{run.path(name)} is unfinished ({ckpt['epoch']}/{ckpt['epochs']} epochs): "
                         f"run --stage {stage} --resume")
    return ckpt


def encoders(run):
    """{k: the finished checkpoint of encoder k} for both self-supervised encoders of this run folder."""
    return {k: finished_checkpoint(run, k, "ssl") for k in ENCODERS}


def teacher(run, k):
    """The finished teacher_<k>.pt of this run folder, frozen, in eval mode."""
    ckpt = finished_checkpoint(run, f"teacher_{k}", "classifier", stage="finetune")
    return run.classifier(ckpt, run.path(f"teacher_{k}")).eval().requires_grad_(False)


def load_into(model, ckpt, path):
    """The checkpoint's weights loaded strictly into `model`, once it is seen to be the same model."""
    saved, own = ckpt["arch"], model.arch
    if saved["num_classes"] != own["num_classes"]:
        raise StageError(f"{path}: {saved['num_classes']} classes, dataset has {own['num_classes']}")
    if saved != own:
        raise StageError(f"{path}: saved model {saved} differs from this run's {own} (--arch, --width, --layers)")
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def save_checkpoint(run, name, model, opt, epoch, epochs, losses=()):
    """All a resume needs, atomically: a temporary file, then a rename (a kill leaves the last one). `losses`:
    each epoch's mean loss (the released schedules read them)."""
    if run.rank == 0:
        cuda = run.device.type == "cuda"
        state = dict(model=model.state_dict(), optimizer=opt.state_dict() if opt else {}, epoch=epoch, epochs=epochs,
                     losses=list(losses), arch=model.arch, args=vars(run.args), classes=run.classes,
                     settings=settings(run.args, name), rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state(run.device) if cuda else None)
        torch.save(state, run.path(name) + ".tmp")
        os.replace(run.path(name) + ".tmp", run.path(name))
    run.barrier()


def resume_from(run, name, model, opt):
    """OUT/<name>.pt loaded into `model` and `opt`, with the RNG state it was saved with; its epoch and the
    epochs' mean losses."""
    ckpt = load_checkpoint(run.path(name))
    load_into(model, ckpt, run.path(name))
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # an optimizer state of other parameter groups
        raise StageError(f"{run.path(name)}: its optimizer state does not fit this version ({e}); "
                         "train the stage anew without --resume") from None
    torch.set_rng_state(ckpt["rng"])
    if run.device.type == "cuda" and ckpt.get("cuda_rng") is not None:  # GPU dropout draws from it
        torch.cuda.set_rng_state(ckpt["cuda_rng"], run.device)
    run.log(f"resuming {name} after epoch {ckpt['epoch']}")
    return ckpt["epoch"], list(ckpt.get("losses", []))


def load_checkpoint(path, kind=None):
    """A checkpoint of `save_checkpoint`, loaded with weights_only=True: only tensors, numbers, strings,
    lists and dicts are rebuilt, so nothing in the file can run code. A file that is missing, unreadable,
    not one of ours, or not of `kind` ("ssl" / "classifier") stops the run with one line naming it."""
    if not os.path.isfile(path):
        raise StageError(f"{path} is not a file" if os.path.exists(path) else f"{path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, KeyError, OSError...
        raise StageError(f"{path}: refused: not a checkpoint of weights alone (damaged, truncated, or holding "
                         f"Python objects that could run code when loaded; {type(e).__name__})") from None
    arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if not isinstance(arch, dict):
        raise StageError(f"{path}: not a checkpoint of this project (no 'arch' entry)")
    arch.setdefault("name", "compact")  # an arch without a name is the compact network's
    missing = [k for k in ("model", "optimizer", "epoch", "epochs", "arch", "args", "classes", "rng")
               if k not in ckpt] + [f"arch.{k}" for k in ("width", "layers", "num_classes", "proj_dim")
                                    if k not in arch]
    if missing:
        raise StageError(f"{path}: not a checkpoint of this project, missing {', '.join(missing)}")
    if kind == "classifier" and not arch["num_classes"]:
        raise StageError(f"{path} is a self-supervised encoder, not a classifier: fine-tune it first")
    if kind == "ssl" and not arch["proj_dim"]:
        raise StageError(f"{path} is a classifier, not a self-supervised encoder (it has no projection head)")
    return ckpt


def read_json(path):
    """The JSON object stored in `path`, or {} if there is no file. The run's files are written atomically
    (`write_json`): a damaged one was changed from outside, and stops the stage with one line naming it."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            obj = json.load(f)
        why = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = type(e).__name__
    if why:
        raise StageError(f"{path} is damaged ({why}): remove it, or use another --out")
    return obj


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# Command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The default after every help string that does not give it in words; the description keeps its lines."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def at_least(lo, kind=int, above=False):
    """An argparse type: a number >= lo (> lo with `above`)."""
    def parse(text):
        value = kind(text)
        if value < lo or (above and value == lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {lo}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def parser(command=True):
    """train.py's flags in three groups: the method's (what a reader of the paper sets), running (data, folder,
    network, schedule, processes), replication and tuning (what --recipe released sets, the validation split).
    `command`: also --stage. A tool adds its own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument_group("the method (docs/method.md)").add_argument
    if command:
        add("--stage", choices=STAGES, required=True, help="invariant, distinctive, semisup: the method (README); "
            "finetune, supervised, both: single steps (a trained classifier: tools/evaluate.py, tools/predict.py)")
    add("--tau", type=at_least(0, float, above=True), default=0.1, help="temperature of h(u, v) = exp(u.v/tau)")
    add("--w-labeled", type=float, default=50.0, help="distillation weight, labeled clips (paper 50, MSE)")
    add("--w-unlabeled", type=float, default=100.0, help="distillation weight, unlabeled (paper 100, MSE)")
    add("--distill", choices=["mse", "kl"], default="mse", help="distillation: MSE of softmaxes (paper) or KL")
    add("--mix", choices=["similarity", "fixed"], default="similarity", help="teacher mix: each video's s, or 0.5")
    add("--labeled", type=at_least(0, float, above=True), default=3, help="labeled: fraction (<1) or videos a class")
    add("--teacher", choices=["class-mean", "finetune"], default="class-mean", help="the teachers: each encoder with "
        "its features' nearest class mean on the labeled clips, or fine-tuned (the paper's, --finetune-backbone-lr 1)")
    add("--student-init", choices=["distinctive", "both"], default="distinctive",
        help="the student's initial encoder: L_D's, or 'both' (L_I + L_LL + L_GL, the paper's)")
    add("--frames", type=at_least(1), default=8, help="frames per train/test clip (paper 8)")
    add("--stride", type=at_least(1), default=2, help="frame stride of train/test clips (paper 2)")
    add("--ssl-frames", type=at_least(1), default=8, help="frames per sparse and dense SSL clip (paper 16)")
    add("--ssl-stride", type=at_least(4), default=4, help="sparse clip stride, a multiple of 4 (paper 4)")
    add("--test-clips", type=at_least(1), default=10, help="clips per test video, softmax averaged (paper 10)")
    running_flags(p)
    tuning_flags(p)
    return p


def running_flags(p):
    """`parser`'s second group: what runs the method, not what it is."""
    add = p.add_argument_group("running: data, run folder, network, schedule (left out: each step's own, "
                               "train.STEPS), processes").add_argument
    add("--out", type=str, default="runs/default", help="run folder: checkpoints, scores, logs, results")
    add("--from", dest="source", type=str, default=None, metavar="DIR", help="a new --out from run folder DIR: "
        "its finished steps whose settings equal this command's are linked (or copied), the others trained")
    dataset_flags(add)
    add("--labeled-list", type=str, default=None, help="a labeled list, lines 'relative/path label'")
    add("--seed", type=int, default=0, help="seed of the labeled split, initialisation, augmentation")
    add("--arch", choices=sorted(models.NETWORKS), default="compact", help="the network (models.py): compact, "
        "the CPU default; r3d18, r3d50: the release's R3D-18 (torchvision's layout) and R3D-50 (slow_r50)")
    add("--width", type=at_least(1), default=16, help="compact: base width (widths w, 2w, 4w, 8w)")
    add("--layers", type=at_least(1), nargs=4, default=[1, 1, 1, 1], help="compact: residual blocks per stage")
    add("--size", type=at_least(1), default=32, help="crop size in pixels (paper 224)")
    add("--epochs", type=at_least(1), default=None, help="epochs of every step the command runs")
    add("--batch-size", type=at_least(1), default=None,
        help="videos per batch and process (semisup: labeled and unlabeled each)")
    add("--lr", type=at_least(0, float, above=True), default=None, help="Adam learning rate")
    add("--weight-decay", type=at_least(0, float), default=None, help="Adam weight decay")
    add("--resume", action="store_true", help="continue from the last saved epoch (semisup resumes anyway)")
    add("--workers", type=at_least(0), default=2, help="DataLoader worker processes")
    add("--cache-mb", type=at_least(0), default=1024, help="MiB of decoded videos kept in memory (decoded once)")
    add("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    add("--no-amp", action="store_true", help="CUDA: disable bfloat16 autocast")
    add("--log-every", type=at_least(1), default=10, help="a read of the loss sums (and a line) every N steps")


def dataset_flags(add):
    """The flags that name a dataset and its splits (`read_splits`), added by `add`; tools/subset.py reads them too."""
    add("--dataset", choices=["toy", "ucf101", "hmdb51", "list"], default="toy", help="split format")
    add("--root", type=str, default=None, help=f"video folder (toy: {DEFAULT_TOY})")
    add("--splits", type=str, default=None,
        help="the split files' folder (if not --root): ucf101 ucfTrainTestlist, hmdb51 testTrainMulti_7030_splits")
    add("--fold", type=int, default=1, choices=[1, 2, 3], help="split number (ucf101, hmdb51)")
    add("--hmdb-unused", action="store_true", help="hmdb51: add the split's unused (flag 0) videos to the pool")
    add("--train-list", type=str, default=None, help="list: training videos, lines 'relative/path label'")
    add("--test-list", type=str, default=None, help="list: test videos, lines 'relative/path label'")
    add("--class-names", type=str, default=None, help="list: class names, one a line, line k naming label k")


def tuning_flags(p):
    """`parser`'s last group: the released code's behaviours and the validation split."""
    add = p.add_argument_group("replication and tuning (--recipe released sets these; docs/tuning.md)").add_argument
    add("--recipe", choices=["default", "released"], default="default", help="default: chosen for small data on "
        "a CPU (README, departures); released: every flag not given as released (train.RELEASED)")
    add("--holdout", type=at_least(0), default=0, help="tuning: each class's last N training videos as test split")
    add("--schedule", choices=["cosine", "released"], default="cosine", help="cosine, 1 warm-up epoch; or released")
    add("--epoch", choices=["train", "labeled"], default="train", help="an epoch: as many clips as training videos "
        "(the labeled subset repeated; the student's: the unlabeled videos), or the labeled videos once (released)")
    add("--teacher-t", type=at_least(0, float, above=True), default=0.2, help="class-mean teachers' temperature")
    add("--finetune-backbone-lr", type=at_least(0, float), default=0.3,
        help="fine-tuned teachers: the backbone's rate as a fraction of --lr (1: the paper's)")
    add("--dropout", type=at_least(0, float), default=0.5, help="dropout before each classifier")
    add("--aug", choices=data.AUGMENTATIONS, default="light",
        help="classifier clips: 'light' (crop area 0.5-1, flip) or as released (`data.augment_released`)")
    add("--ssl-aug", choices=data.SSL_AUGMENTATIONS, default="view",
        help="SSL clips: one draw for all 5 clips of a view, or one draw for each clip (as released)")
    add("--test-crop", type=at_least(0, float), default=0.8,
        help="test and score clips: the central F of each side; 0: the short side's centre square")
    add("--balance", choices=sorted(tb.BALANCE), default="mean",
        help="SSL terms' weights: each a mean, or as the released code at its batch of 40 (tb.BALANCE)")
    add("--ssl-forward", choices=["joint", "per-clip"], default="joint",
        help="the 10 SSL clip types in one forward, or one each (as released)")
    add("--student-forward", choices=["joint", "separate"], default="separate",
        help="the labeled and unlabeled batches in one forward, or one each")
    add("--last-batch", choices=["drop", "keep"], default="drop", help="an epoch's last partial batch (keep: released)")
    add("--score-norm", choices=["none", "minmax", "rank"], default="minmax", help="s normalised over the videos")


def get_args(argv=None, p=None, dataset=True):
    """The flags of `p` (default: `parser()`), checked (a --root where `dataset` is read); the dataset's paths made
    absolute, so that a run continued from another directory compares them as they were meant."""
    p = p or parser()
    if p.parse_known_args(argv)[0].recipe == "released":  # the recipe's values become the defaults
        p.set_defaults(**RELEASED)
    args = p.parse_args(argv)
    args.overrode = {k: v for k, v in RELEASED.items() if args.recipe == "released" and getattr(args, k) != v}
    if args.ssl_stride % 4:
        p.error(f"--ssl-stride must be a multiple of 4 (the 4 dense clips tile the sparse span), "
                f"got {args.ssl_stride}")
    args.root = args.root or (DEFAULT_TOY if args.dataset == "toy" else None)
    if args.root is None and dataset:
        p.error(f"--dataset {args.dataset} needs --root")
    for flag in PATH_FLAGS:
        if getattr(args, flag) is not None:
            setattr(args, flag, os.path.abspath(getattr(args, flag)))
    return args


if __name__ == "__main__":
    main()
