"""The seed ablation on any dataset: for each of --seeds, in OUT/seed<seed>, the whole method with that seed
(its own encoders, labeled split, initialisations and augmentation), the supervised baseline and the student
of a fixed 0.5 mix; then the paired tables the method's claims rest on, per class the teachers and the score,
and where a per-video mix can change a target. Also in OUT/ablation.json. Every flag of train.py applies:

    python tools/ablation.py --seeds 0 1 2                       # on the toy set in data/toy
    python tools/ablation.py --seeds 1 2 --dataset ucf101 --root R --splits S --labeled 3 [--headroom]

--headroom adds the students of mixes that know what the score has to guess (docs/method.md "Headroom").
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import tb  # noqa: E402
import train  # noqa: E402
from tools import toy  # noqa: E402
from tools.scores import score_parts  # noqa: E402

# Every figure's name as the tables and pages print it, in their order (results.json and ablation.json: the keys)
LABELS = {"supervised": "supervised-only", "teacher_invariant": "invariant teacher",
          "teacher_distinctive": "distinctive teacher", "student_fixed": "student, fixed mix s = 0.5",
          "student": "TimeBalance student (similarity mix)",
          "student_invariant": "student, invariant teacher only (s = 1)",
          "student_distinctive": "student, distinctive teacher only (s = 0)",
          "student_group": "student, group oracle (s = 1 repetitive, 0 ordered)",
          "student_class": "student, class oracle (better teacher on its unlabeled videos)",
          "student_video": "student, per-video oracle (better teacher on each video)",
          "student_soft": "student, soft per-video oracle (0.5; a teacher alone where only it fixes the target)",
          "student_permuted": "student, s permuted across the training videos (control)",
          "student_constant": "student, s constant at its mean (control)",
          "knn_invariant": "kNN, invariant encoder", "knn_distinctive": "kNN, distinctive encoder",
          "knn_both": "kNN, L_I + L_LL + L_GL encoder"}
HEADROOM = ("invariant", "distinctive", "group", "class", "video", "soft")  # --headroom: students of these mixes
CONTROLS = ("permuted", "constant")  # --controls: the score's values without its per-video information


def parser():
    p = train.parser(command=False)
    p.description = __doc__
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds to run")
    p.add_argument("--headroom", action="store_true",
                   help="also the students of the mixes beyond fixed and similarity (docs/method.md)")
    p.add_argument("--controls", action="store_true",
                   help="also the students of s permuted across the training videos and of s constant at its mean")
    return p


def ablation(args):
    """Each seed's runs (finished checkpoints reused, unfinished ones resumed), then the tables."""
    t0 = time.time()
    table, per_class, mixes, runs = {}, {}, {}, []
    for seed in args.seeds:
        out = os.path.join(args.out, f"seed{seed}")
        sub = argparse.Namespace(**{**vars(args), "seed": seed, "out": out})
        for stage in train.ENCODERS:
            run = train.Run(sub, stage)
            train.reuse_or_train(run, f"seed {seed}:", stage, "ssl",
                                 lambda resume, run=run, stage=stage: train.train_ssl(run, stage, resume))
            if f"knn_{stage}" not in train.read_json(os.path.join(out, "results.json")):  # a reused encoder's
                encoder = train.finished_checkpoint(run, stage, "ssl")
                train.knn_check(run, stage, train.load_into(run.model(proj_dim=128), encoder, run.path(stage)))
        for stage, mix in (("semisup", "similarity"), ("supervised", None), ("semisup", "fixed")):
            run.log(f"=== seed {seed}: {stage}" + (f" --mix {mix}" if mix else ""))
            stage_args = argparse.Namespace(**{**vars(sub), "mix": mix or sub.mix})
            train.run_stage(stage_args, stage)
            runs += [train.Run(stage_args, stage)] if mix == "similarity" else []
        for mix in (HEADROOM if args.headroom else ()) + (CONTROLS if args.controls else ()):
            other_mix(runs[-1], seed, mix)
        mixes[seed] = mix_check(runs[-1], permuted=args.controls)
        for k, v in train.read_json(os.path.join(out, "results.json")).items():
            table.setdefault(k, []).append(v)
        for k, v in train.read_json(os.path.join(out, "per_class.json")).items():
            per_class.setdefault(k, []).append(v)
    if run.rank == 0:
        print_ablation(args, table)
        auc = print_scores(args, per_class, mixes, runs)
        train.write_json(os.path.join(args.out, "ablation.json"),
                         {"seeds": args.seeds, "top1": table, "best_knn": best_knn(table), "per_class": per_class,
                          "mix": mixes, "auc": auc})
        print(f"\nwall time {time.time() - t0:.0f} s; per-seed runs in {args.out}/seed*/, tables in "
              f"{args.out}/ablation.json")
    return runs


def other_mix(run, seed, mix):
    """The student of a HEADROOM or CONTROLS mix in `run`'s folder (group only where ROOT/groups.txt exists)."""
    if mix == "group" and toy.read_groups(run.args.root, run.classes) is None:
        return
    run.log(f"=== seed {seed}: semisup --mix {mix}")
    name = f"student_{mix}"
    train.reuse_or_train(run, f"{'control' if mix in CONTROLS else 'headroom'}:", name, "classifier",
                         lambda resume: train.train_student(run, name, resume, mix_weights(run, mix)),
                         what=f"the student of --mix {mix}")


def print_ablation(args, table):
    """Mean +- std over the seeds, the paired differences the method's claims rest on, and the headroom: the
    best student of any mix against the fixed mix, and what the similarity mix takes of it."""
    joined = lambda values, f: " / ".join(f.format(v) for v in values)  # noqa: E731
    seeds = " ".join(map(str, args.seeds))
    print(f"\n| model | top-1 % (mean +- std, seeds {seeds}) | per seed |\n|---|---|---|")
    for key, label in LABELS.items():
        v = table.get(key, [])
        if len(v) == len(args.seeds):
            mean, std = statistics.mean(v), statistics.pstdev(v)
            print(f"| {label} | {mean:.1f} +- {std:.1f} | {joined(v, '{:.1f}')} |")
    print("\n| paired difference (the method's claims) | mean | per seed | goal | met in every seed |\n"
          "|---|---|---|---|---|")
    claims = (("student - supervised-only", "supervised", ">= +15", lambda d: d >= 15),
              ("student - invariant teacher", "teacher_invariant", "> 0", lambda d: d > 0),
              ("student - distinctive teacher", "teacher_distinctive", "> 0", lambda d: d > 0),
              ("similarity mix - fixed mix", "student_fixed", ">= 0", lambda d: d >= 0),
              ("student - best encoder kNN (the better of the seed's two)", "best_knn", "> 0", lambda d: d > 0),
              ("similarity mix - permuted s", "student_permuted", "> 0", lambda d: d > 0),
              ("similarity mix - constant s", "student_constant", "> 0", lambda d: d > 0))
    others = {**table, "best_knn": best_knn(table)}
    for label, other, goal, met in claims:
        if len(others.get(other, [])) != len(args.seeds):
            continue
        d = [x - y for x, y in zip(table["student"], others[other])]
        print(f"| {label} | {statistics.mean(d):+.1f} | {joined(d, '{:+.1f}')} | {goal} | "
              f"{'yes' if all(map(met, d)) else 'no'} |")
    mean = {k: statistics.mean(v) for k, v in table.items() if len(v) == len(args.seeds)}
    if "student_video" in mean:  # the per-video oracle bounds what a per-video weight could gain
        better = max(("teacher_invariant", "teacher_distinctive"), key=mean.get)
        best = max((k for k in mean if k.startswith("student_")), key=mean.get)
        gain, share = mean["student_video"] - mean["student_fixed"], mean["student"] - mean["student_fixed"]
        recovered = (f"Over the fixed mix the similarity mix gains {share:+.1f} of the oracle's {gain:+.1f} "
                     f"({100 * share / gain:.0f} %)." if gain > 0 else
                     f"The oracle gains nothing over the fixed mix ({gain:+.1f}).")
        print(f"\nHeadroom, means: better teacher {mean[better]:.1f} ({better}), fixed mix "
              f"{mean['student_fixed']:.1f}, similarity mix {mean['student']:.1f}, per-video oracle "
              f"{mean['student_video']:.1f}, best mix {mean[best]:.1f} ({best}). {recovered}")
    if {"student_permuted", "student_constant"} <= set(mean):  # the score's per-video information, or its lean
        above = sum(x > max(a, b) for x, a, b in zip(*(table[k] for k in ("student", "student_permuted",
                                                                            "student_constant"))))
        print(f"\nControls, means: similarity mix {mean['student']:.1f}, the same s permuted across the videos "
              f"{mean['student_permuted']:.1f}, s constant at its mean {mean['student_constant']:.1f}; the "
              f"similarity mix above both controls in {above} of {len(args.seeds)} seeds.")


def best_knn(table):
    """Per seed the better of its two encoders' kNN checks: what the labeled videos give without any training."""
    return [max(a, b) for a, b in zip(table.get("knn_invariant", []), table.get("knn_distinctive", []))]


def print_scores(args, per_class, mixes, runs):
    """Per class the teachers' accuracy and the score, how well the score separates the dataset's groups
    (returned: AUC of s from C, from C_I alone and from C_D alone, mean over the seeds), and where a per-video
    mix can change a target at all (`mix_check`)."""
    print("\n| class | invariant teacher | distinctive teacher | raw s, mean over seeds (min-max) "
          "| normalised s | s of C_I alone | s of C_D alone |\n|---|---|---|---|---|---|---|")
    cache = [train.scores(r) for r in runs]
    alone = [{p: v[1:] for p, v in score_parts(r.args.out, vars(r.args), r.train).items()} for r in runs]
    for c, name in enumerate(runs[-1].classes):
        acc = [statistics.mean(d[name] for d in per_class[f"teacher_{k}"]) for k in train.ENCODERS]
        videos = [(j, p) for j, r in enumerate(runs) for p, y in r.train if y == c]
        r = [cache[j]["raw"][p] for j, p in videos]
        norm, s_I, s_D = (statistics.mean(f(j, p) for j, p in videos) for f in (
            lambda j, p: cache[j]["s"][p], lambda j, p: alone[j][p][0], lambda j, p: alone[j][p][1]))
        print(f"| {name} | {acc[0]:.0f} | {acc[1]:.0f} | {statistics.mean(r):.4f} "
              f"({min(r):.4f}-{max(r):.4f}) | {norm:.2f} | {s_I:.4f} | {s_D:.4f} |")
    groups = toy.read_groups(args.root, runs[-1].classes)
    auc = None
    if groups and {"repetitive", "ordered"} <= set(groups):
        per_seed = []
        for c, parts, r in zip(cache, alone, runs):
            repetitive = torch.tensor([groups[y] == "repetitive" for _, y in r.train])  # (N,)
            s = torch.tensor([[c["raw"][p], *parts[p]] for p, _ in r.train])  # (N, 3): C, C_I, C_D alone
            per_seed.append([group_auc(s[:, j], repetitive) for j in range(3)])
        auc = dict(zip(("C", "C_I", "C_D"), map(statistics.mean, zip(*per_seed))))
        print(f"\nHow well s tells the repetitive classes' training videos from the ordered ones (AUC, mean "
              f"over the seeds; 1: every repetitive video above every ordered one): s {auc['C']:.2f}, from "
              f"C_I alone {auc['C_I']:.2f}, from C_D alone {auc['C_D']:.2f}.")
    total = {k: sum(m[k] for m in mixes.values()) for k in next(iter(mixes.values()))}
    print(f"\nWhere the mix can matter (unlabeled training videos, all seeds, {total['videos']} in all): "
          f"the teachers disagree with one of them right on {total['one_right']}; the fixed mix's target is "
          f"wrong there (the wrong teacher the more confident) on {total['fixable']}; the similarity mix's "
          f"target is right where the fixed one is wrong on {total['sim_fixes']} and wrong where it is right "
          f"on {total['sim_breaks']}" + (f"; under the permuted s, {total['sim_fixes_permuted']} and "
                                        f"{total['sim_breaks_permuted']}." if "sim_fixes_permuted" in total else "."))
    return auc


def mix_weights(run, mix, teachers=None):
    """Each training video's weight of the invariant teacher under a mix beyond fixed and similarity
    (docs/method.md "Headroom" and "Controls"). Oracles, which read each video's own label, bounds of what a
    weight could gain: 1 or 0 for every video (one teacher alone); group: 1 for the classes ROOT/groups.txt
    calls repetitive, 0 for the ordered ones; class: per class, 1 or 0 for the teacher that gives the class's
    unlabeled training videos the higher summed probability of their class; video: per video, the teacher
    that gives the video's own class the higher probability (a tie 0.5); soft: 0.5, except on the videos
    where exactly one teacher predicts the right class and the 0.5 mix does not: that teacher alone.
    Controls, the score's values without its per-video information: permuted: the videos' s shuffled across
    the training videos (a permutation drawn from --seed); constant: every video the mean s."""
    if mix in ("invariant", "distinctive"):
        return {p: float(mix == "invariant") for p, _ in run.train}
    if mix in CONTROLS:
        s_video = train.scores(run)["s"]
        s = torch.tensor([s_video[p] for p, _ in run.train], dtype=torch.float64)  # (N,), training order
        g = torch.Generator().manual_seed(run.args.seed)
        s = s[torch.randperm(len(s), generator=g)] if mix == "permuted" else torch.full_like(s, float(s.mean()))
        return dict(zip((p for p, _ in run.train), s.tolist()))
    if mix == "group":
        groups = toy.read_groups(run.args.root, run.classes)
        if groups is None or not set(groups) <= {"repetitive", "ordered"}:
            path = os.path.join(run.args.root, "groups.txt")
            raise train.StageError(f"the group oracle (--headroom) needs {path}, lines 'ClassName repetitive' or "
                                   "'ClassName ordered' (the toy writes one)")
        return {p: float(groups[label] == "repetitive") for p, label in run.train}
    teachers = teachers or [train.teacher(run, k) for k in train.ENCODERS]
    y = torch.tensor([label for _, label in run.train], device=run.device)  # (N,)
    P_I, P_D = (train.probabilities(run, t, run.train)[0] for t in teachers)  # (N, K) each
    if mix == "soft":
        right_I, right_D = P_I.argmax(1) == y, P_D.argmax(1) == y  # (N,) each
        fixed_right = tb.mix_teachers(P_I, P_D, torch.full_like(y, 0.5, dtype=P_I.dtype)).argmax(1) == y
        w = 0.5 + 0.5 * (right_I & ~right_D & ~fixed_right).float() - 0.5 * (right_D & ~right_I & ~fixed_right).float()
    else:
        p_I, p_D = (p.gather(1, y.view(-1, 1)).squeeze(1) for p in (P_I, P_D))  # (N,): p of the own class
        if mix == "class":  # summed per class over the unlabeled videos
            unlabeled = set(run.unlabeled)
            unlabeled = torch.tensor([item in unlabeled for item in run.train], device=run.device)  # (N,)
            K = len(run.classes)
            p_I, p_D = (torch.zeros(K, device=run.device).index_add_(0, y, p * unlabeled) for p in (p_I, p_D))
        w = (p_I > p_D).float() + 0.5 * (p_I == p_D).float()  # (K,) or (N,)
    if run.world > 1:  # the first process decides for all: a near tie could go either way on another GPU
        train.dist.broadcast(w, 0)
    w = w.tolist()
    return {p: w[label] if mix == "class" else w[i] for i, (p, label) in enumerate(run.train)}


def mix_check(run, permuted=False):
    """`mix_counts` on the unlabeled training videos of a finished run, summed over the processes (each
    takes every world-th video): each teacher's prediction as in evaluation, each video's score; with
    `permuted`, also sim_fixes / sim_breaks under the permuted control's s."""
    items = run.unlabeled[run.rank :: run.world]
    p_I, p_D = (train.probabilities(run, train.teacher(run, k), items)[0] for k in train.ENCODERS)  # (N, K)
    y = torch.tensor([label for _, label in items], device=run.device)  # (N,)
    counts = {}
    for mix in ("similarity", "permuted") if permuted else ("similarity",):
        s_video = train.scores(run)["s"] if mix == "similarity" else mix_weights(run, mix)
        s = torch.tensor([s_video[p] for p, _ in items], device=run.device)  # (N,)
        got = mix_counts(p_I, p_D, s, y)
        counts.update(got if mix == "similarity" else {f"{k}_permuted": got[k] for k in ("sim_fixes", "sim_breaks")})
    summed = train.all_sum(run, torch.tensor(list(counts.values()), device=run.device))[0]
    return dict(zip(counts, summed.tolist()))


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


def group_auc(s, positive):
    """How well scores s (N,) put the videos of one group above the others (positive (N,) bool): the
    probability that a positive video's s exceeds a negative one's, ties counting half (the area under the
    ROC curve, Mann-Whitney U / (n+ n-)). 1: every positive above every negative; 0.5: no separation."""
    pos, neg = s[positive].view(-1, 1), s[~positive].view(1, -1)  # (n+, 1), (1, n-)
    above, tied = int((pos > neg).sum()), int((pos == neg).sum())  # counts over the n+ x n- pairs
    return (above + 0.5 * tied) / (pos.numel() * neg.numel())  # a ratio of counts, in float64


def main(argv=None):
    args = train.get_args(argv, parser())
    train.command(lambda: ablation(args))


if __name__ == "__main__":
    main()
