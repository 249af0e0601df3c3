"""Two or more runs side by side on one self-contained page, as TensorBoard overlays the runs of a folder and
mmaction2's analyze_logs.py plots several logs: the flags (and machines) that differ, every figure with its
difference to the first run, the per-class tables, the training curves overlaid (one colour a run), and the
scores per class. Nothing is fetched; nothing is written but the page:

    python tools/compare.py runs/a runs/b [runs/c ...] [--out compare.html]    # default: FIRST/compare.html

Each folder is a run folder (run.json) or a seed ablation's (ablation.json: its mean table and paired
differences; its first seed's folder for the flags, curves and scores).
"""
import argparse
import html
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import tb  # noqa: E402
from tools.ablation import LABELS  # noqa: E402
from tools.report import COLOURS, CSS, FILES, LOG_FIELDS, line_chart, read, table  # noqa: E402


class CompareError(Exception):
    """A folder or file that cannot be compared: one line naming it, and nothing written."""


def load(folder):
    """What the page needs of one folder: {file name: its JSON, or None where there is none}, for a run folder or
    a seed ablation's (whose flags, log and scores come from its first seed's folder)."""
    if not os.path.isdir(folder):
        raise CompareError(f"{folder} is not a folder")
    got = {}
    for name in FILES:
        got[name], why = read(folder, name, name.endswith(".jsonl"))
        if why and not why.startswith("no "):
            raise CompareError(f"{os.path.join(folder, name)} is damaged: remove it, or compare another folder")
    if got["ablation.json"] is not None:
        seeds = got["ablation.json"].get("seeds") or [None]
        first = load(os.path.join(folder, f"seed{seeds[0]}")) if os.path.isdir(
            os.path.join(folder, f"seed{seeds[0]}")) else {}
        got.update({k: first.get(k) for k in ("run.json", "log.jsonl", "scores.json", "labels")})
    elif got["run.json"] is None:
        raise CompareError(f"{folder}: neither a run folder (no run.json) nor a seed ablation's (no ablation.json)")
    else:
        got["labels"] = {p: int(y) for name in ("labeled.txt", "unlabeled.txt")
                         if os.path.exists(os.path.join(folder, name))
                         for p, y in (line.split() for line in open(os.path.join(folder, name)))}
    return got


def part_flags(runs, names):
    """The flags that differ (only those), and the machine of each run's last logged epoch where they differ."""
    flags = [r["run.json"] or {} for r in runs]
    rows = [[k, *(f.get(k, "-") for f in flags)] for k in sorted({k for f in flags for k in f})
            if len({repr(f.get(k, "-")) for f in flags}) > 1]
    machines = [(r["log.jsonl"] or [{}])[-1].get("machine", "not logged") for r in runs]
    text = '<h2 id="flags">Flags that differ</h2>' + (table(["flag", *names], rows, "flags") + "<p>-: not recorded "
                                                        "by that run</p>" if rows else "<p>no flag differs</p>")
    if len(set(machines)) > 1:
        text += table(["machine", *names], [["last logged epoch", *machines]], "machines")
    return text


def side_by_side(values, n, source, title):
    """A table of figures {key: [its value in each of the n runs, or None]}: each run's value, then each later
    run's difference to the first."""
    rows = []
    for key, vs in values.items():
        diffs = [round(v - vs[0], 2) if v is not None and vs[0] is not None else "-" for v in vs[1:]]
        rows.append([LABELS.get(key, key), key, *("-" if v is None else v for v in vs), *diffs])
    heads = ["figure", "key", *(f"run {i + 1}" for i in range(n)), *(f"run {i + 1} - run 1" for i in range(1, n))]
    return f"<h3>{html.escape(title)}</h3>" + table(heads, rows, source)


def part_figures(runs):
    """Every figure of results.json side by side; for ablation folders the mean table and the paired
    differences (the student minus each other model, mean over the seeds) side by side."""
    text = '<h2 id="figures">Figures</h2>'
    results = [r["results.json"] or {} for r in runs]
    keys = list(dict.fromkeys(k for res in results for k in res))
    if keys:
        text += side_by_side({k: [res.get(k) for res in results] for k in keys}, len(runs), "results", "test top-1 %")
    tops = [(r["ablation.json"] or {}).get("top1", {}) for r in runs]
    keys = list(dict.fromkeys(k for t in tops for k in t))
    if keys:
        mean = lambda t, k: round(statistics.mean(t[k]), 2) if t.get(k) else None  # noqa: E731
        text += side_by_side({k: [mean(t, k) for t in tops] for k in keys}, len(runs), "ablation",
                             "seed ablation: mean top-1 %")
        paired = lambda t, k: round(statistics.mean(a - b for a, b in zip(t["student"], t[k])), 2) if (  # noqa: E731
            t.get(k) and t.get("student")) else None
        text += side_by_side({k: [paired(t, k) for t in tops] for k in keys if k != "student"}, len(runs), "paired",
                             "seed ablation: student - each model, mean of the paired differences")
    return text


def part_per_class(runs, names):
    """Per class, each model's top-1 % in each run, where the runs share their classes."""
    def mean_over_seeds(seeds):  # ablation.json: [{class: top-1} of each seed] -> {class: mean}
        return {c: round(statistics.mean(s[c] for s in seeds), 2) for c in seeds[0]}
    per_class = [r["per_class.json"] or {m: mean_over_seeds(v) for m, v in
                                         ((r["ablation.json"] or {}).get("per_class") or {}).items()} for r in runs]
    classes = [list(next(iter(pc.values()), {})) if pc else [] for pc in per_class]
    text = '<h2 id="per-class">Per class</h2>'
    if not all(classes):
        return text + "<p class=why>not every run has per-class figures</p>"
    if any(c != classes[0] for c in classes):
        return text + "<p class=why>the runs do not share their classes: no per-class table</p>"
    for m in [m for m in per_class[0] if all(m in pc for pc in per_class)]:
        rows = [[c, *(pc[m][c] for pc in per_class)] for c in classes[0]]
        text += f"<h3>{html.escape(LABELS.get(m, m))}</h3>" + table(["class", *names], rows, f"per_class {m}")
    return text


def last_of_each_epoch(log, stage):
    """A stage's entries of log.jsonl, the last one of each epoch (a resumed run logs an epoch again)."""
    epochs = {e["epoch"]: e for e in log if e["stage"] == stage}
    return [epochs[k] for k in sorted(epochs)]


def part_training(runs, names):
    """Per stage, each loss term, the learning rate and clips/s over the epochs: one curve a run."""
    logs = [r["log.jsonl"] or [] for r in runs]
    text = '<h2 id="training">Training</h2>'
    for stage in dict.fromkeys(e["stage"] for log in logs for e in log):
        rows = [last_of_each_epoch(log, stage) for log in logs]
        terms = list(dict.fromkeys(k for rs in rows for r in rs for k in r if k not in LOG_FIELDS))
        text += f"<h3>{html.escape(stage)}</h3>"
        for k, what in [(t, "mean loss") for t in terms] + [("lr", "learning rate"), ("clips_per_s", "clips/s")]:
            series = {n: [(r["epoch"], r[k]) for r in rs if k in r] for n, rs in zip(names, rows)}
            series = {n: pts for n, pts in series.items() if pts}
            if series:
                text += line_chart(f"{stage}: {k}", series, "epoch", what)
    return text


def part_scores(runs, names):
    """Per class the mean raw and normalised s of its training videos in each run, where every run has them."""
    text = '<h2 id="scores">Temporal similarity score</h2>'
    if any(r["scores.json"] is None or not r.get("labels") for r in runs):
        return text + "<p class=why>not every run computed the scores</p>"
    rows = {}
    for i, r in enumerate(runs):
        paths = [p for p in r["labels"] if p in r["scores.json"]["raw"]]
        raw = torch.tensor([r["scores.json"]["raw"][p] for p in paths])  # (N,)
        norm = tb.normalize_scores(raw, (r["run.json"] or {}).get("score_norm", "minmax"))  # (N,)
        for c in sorted({r["labels"][p] for p in paths}):
            at = [j for j, p in enumerate(paths) if r["labels"][p] == c]
            cells = rows.setdefault(c, [None] * 2 * len(runs))
            cells[i], cells[len(runs) + i] = round(raw[at].mean().item(), 4), round(norm[at].mean().item(), 3)
    heads = ["class", *(f"raw s, {n}" for n in names), *(f"normalised s, {n}" for n in names)]
    return text + table(heads, [[c, *("-" if v is None else v for v in cells)] for c, cells in sorted(rows.items())],
                        "scores")


def compare(folders, out=None):
    """The page for `folders` (the first is the reference of every difference); returns its path."""
    runs = [load(f) for f in folders]
    names = [f"run {i + 1}" for i in range(len(folders))]
    legend = "".join(f'<li style="color:{COLOURS[i % len(COLOURS)]}">{n}: {html.escape(os.path.abspath(f))} '
                     f'({"seed ablation" if r["ablation.json"] else "run"})</li>'
                     for i, (n, f, r) in enumerate(zip(names, folders, runs)))
    parts = [part_flags(runs, names), part_figures(runs), part_per_class(runs, names), part_training(runs, names),
             part_scores(runs, names)]
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{len(runs)} runs</title><style>{CSS}</style>"
            f"</head><body><h1>{len(runs)} runs side by side</h1><ul>{legend}</ul>{''.join(parts)}</body></html>")
    path = out or os.path.join(folders[0], "compare.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="run folders or seed ablations' folders, the first the reference")
    p.add_argument("--out", default=None, help="the page (default: FIRST/compare.html)")
    args = p.parse_args(argv)
    try:
        print(f"wrote {compare(args.folders, args.out)}")
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
