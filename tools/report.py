"""One self-contained page for a run folder, OUT/report.html (inline SVG and CSS, pictures as data URIs): the run,
the figures, training curves per stage, the temporal similarity score, the seed ablation, each where its files
are; a missing or damaged file leaves its part out with one line saying why (two runs: tools/compare.py).

    python tools/report.py runs/default            # a folder of train.py's stages, or of the ablation/demo
"""
import argparse
import base64
import html
import json
import os
import statistics
import sys
import tempfile

import av
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import data  # noqa: E402
import tb  # noqa: E402
from tools import toy  # noqa: E402
import train  # noqa: E402
from tools.ablation import LABELS  # noqa: E402
from tools.scores import score_parts  # noqa: E402

FILES = ("run.json", "results.json", "per_class.json", "log.jsonl", "scores.json", "ablation.json")  # a folder's
LOG_FIELDS = ("stage", "epoch", "lr", "bad_videos", "clips_per_s", "wall_s", "run", "machine")  # log.jsonl, not a loss
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442")  # Okabe-Ito
CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;margin-top:2em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.why{color:#a00}svg{display:block;margin:.5em 0}svg text{font:12px sans-serif}.clips img{margin-right:4px}
.chart{display:inline-block;vertical-align:top;margin-right:1em}"""


def read(out, name, lines=False):
    """(the JSON in OUT/name, or its lines', None), or (None, one line saying why it is missing or damaged)."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None, f"no {name} in this folder"
    try:
        with open(path) as f:
            obj = [json.loads(line) for line in f if line.strip()] if lines else json.load(f)
    except (ValueError, OSError) as e:
        return None, f"{name} is damaged ({type(e).__name__}): this part is left out"
    return (obj, None) if isinstance(obj, list if lines else dict) else (None, f"{name} is damaged: left out")


def table(headers, rows, source=""):
    """An HTML table; numbers as the JSON stores them, so that a reader (and the tests) can check them."""
    cell = lambda v: html.escape(v if isinstance(v, str) else repr(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table data-source="{source}"><tr>{head}</tr>{body}</table>'


def scale(lo, hi, a, b):
    """The map of [lo, hi] onto pixels [a, b] (a flat range onto the middle)."""
    return (lambda v: (a + b) / 2) if hi <= lo else (lambda v: a + (v - lo) / (hi - lo) * (b - a))


def line_chart(title, series, xlabel, ylabel, W=340, H=210):
    """An SVG chart of {name: [(x, y), ...]} as lines with a point (and its value as data-y) at each (x, y)."""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    X, Y = scale(min(xs), max(xs), 60, W - 10), scale(min(ys), max(ys), H - 40, 25)
    parts = [f'<text x="{W / 2}" y="14" text-anchor="middle">{html.escape(title)}</text>',
             f'<line x1="60" y1="{H - 40}" x2="{W - 10}" y2="{H - 40}" stroke="#444"/>',
             f'<line x1="60" y1="25" x2="60" y2="{H - 40}" stroke="#444"/>',
             f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">'
             f'{html.escape(ylabel)}</text>']
    for v in {min(ys), max(ys)}:
        parts.append(f'<text x="56" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>')
    for v in {min(xs), max(xs)}:
        parts.append(f'<text x="{X(v):.1f}" y="{H - 26}" text-anchor="middle">{v:g}</text>')
    for k, (name, pts) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle r="3" fill="{colour}" cx="{X(x):.1f}" cy="{Y(y):.1f}" data-series="{html.escape(name)}" '
                  f'data-x="{x!r}" data-y="{y!r}"><title>{html.escape(name)} {x}: {y:.4g}</title></circle>'
                  for x, y in pts]
        if len(series) > 1:
            parts.append(f'<text x="{W - 10}" y="{28 + 14 * k}" text-anchor="end" fill="{colour}">'
                         f'{html.escape(name)}</text>')
    return f'<svg class="chart" width="{W}" height="{H}" role="img">{"".join(parts)}</svg>'


def bar_chart(groups, names, W=1060):
    """Grouped bars: for each group (class) a bar per name (model), values in % (0-100); the legend below."""
    n, step, H = len(names), (W - 60) / max(1, len(groups)), 230 + 16 * ((len(names) - 1) // 5)
    Y = scale(0, 100, 185, 20)
    parts = [f'<line x1="50" y1="{Y(0)}" x2="{W}" y2="{Y(0)}" stroke="#444"/>']
    parts += [f'<text x="46" y="{Y(v) + 4}" text-anchor="end">{v}</text>' for v in (0, 50, 100)]
    for g, (group, values) in enumerate(groups.items()):
        x0 = 55 + g * step
        parts.append(f'<text x="{x0 + step / 2 - 5:.1f}" y="{Y(0) + 16}" text-anchor="middle">'
                     f'{html.escape(group)}</text>')
        for k, v in enumerate(values):
            w = (step - 10) / n
            parts.append(f'<rect x="{x0 + k * w:.1f}" y="{Y(v):.1f}" width="{w - 1:.1f}" height="{Y(0) - Y(v):.1f}" '
                         f'fill="{COLOURS[k % len(COLOURS)]}"><title>{html.escape(names[k])}: {v}</title></rect>')
    parts += [f'<text x="{55 + 200 * (k % 5)}" y="{Y(0) + 36 + 16 * (k // 5)}" fill="{COLOURS[k % len(COLOURS)]}">'
              f'&#9632; {html.escape(name)}</text>' for k, name in enumerate(names)]
    return f'<svg width="{W}" height="{H}" role="img">{"".join(parts)}</svg>'


def part_run(out, run, log):
    """The run's flags, its labeled split and the date and machine of its log."""
    labeled = os.path.join(out, "labeled.txt")
    rows = [["labeled videos", str(sum(1 for _ in open(labeled)))]] if os.path.exists(labeled) else []
    if log:
        rows += [["first and last logged run", f"{log[0].get('run', '?')} .. {log[-1].get('run', '?')}"],
                 ["machine", log[-1].get("machine", "not logged")]]
    flags = table(["flag", "value"], sorted((k, v) for k, v in run.items() if v is not None), "run.json")
    unset = html.escape(", ".join(sorted(k for k, v in run.items() if v is None)))
    return f'<h2 id="run">The run</h2>{table(["", ""], rows)}{flags}<p>not set: {unset}</p>'


def part_figures(results, per_class):
    """Test top-1 of every model, and per class the models side by side."""
    rows = [[LABELS.get(k, k), k, v] for k, v in results.items()]
    text = '<h2 id="figures">Figures</h2>' + table(["model", "in results.json", "top-1 %"], rows, "results.json")
    if per_class:
        names, classes = list(per_class), list(next(iter(per_class.values())))
        labels = [LABELS.get(m, m) for m in names]
        text += bar_chart({c: [per_class[m].get(c, 0) for m in names] for c in classes}, labels)
        text += table(["class", *names], [[c, *(per_class[m].get(c, "") for m in names)] for c in classes],
                      "per_class.json")
    return text


def part_training(log):
    """Per stage, each logged term, the learning rate and clips/s over the epochs (a resumed epoch: its last entry)."""
    text = '<h2 id="training">Training</h2>'
    for stage in dict.fromkeys(r["stage"] for r in log):
        epochs = {r["epoch"]: r for r in log if r["stage"] == stage}  # a rerun's entry replaces the earlier
        rows = [epochs[e] for e in sorted(epochs)]
        terms = [k for k in rows[0] if k not in LOG_FIELDS]
        curve = lambda k: [(r["epoch"], r[k]) for r in rows if k in r]  # noqa: E731
        text += f"<h3>{html.escape(stage)}</h3>" + line_chart(f"{stage}: loss terms", {k: curve(k) for k in terms},
                                                               "epoch", "mean loss")
        text += line_chart(f"{stage}: learning rate", {"lr": curve("lr")}, "epoch", "learning rate")
        text += line_chart(f"{stage}: speed", {"clips/s": curve("clips_per_s")}, "epoch", "clips / s of the epoch")
    return text


def png_uri(img):
    """(H, W, 3) uint8 -> a data URI of a lossless PNG, written by PyAV's png encoder."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.png")
        with av.open(path, "w", format="image2") as container:
            stream = container.add_stream("png", rate=1)
            stream.width, stream.height, stream.pix_fmt = img.shape[1], img.shape[0], "rgb24"
            for packet in list(stream.encode(toy.video_frame(img))) + list(stream.encode()):
                container.mux(packet)
        return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def part_scores(out, run, scores, classes, P=64):
    """Per class the spread of its training videos' raw and normalised s, then its median video: the middle
    frames of its 4 score clips beside its matrix C."""
    items = [(p, int(y)) for name in ("labeled.txt", "unlabeled.txt") if os.path.exists(os.path.join(out, name))
             for p, y in (line.split() for line in open(os.path.join(out, name))) if p in scores["raw"]]
    head = '<h2 id="scores">Temporal similarity score</h2>'
    if not items or not classes:
        return head + "<p class=why>no labeled.txt and unlabeled.txt, or no per_class.json: no class to show</p>"
    norm = run.get("score_norm", "minmax")
    s = tb.normalize_scores(torch.tensor([scores["raw"][p] for p, _ in items]), norm)  # (N,)
    normalised = dict(zip((p for p, _ in items), s.tolist()))
    by_class = {name: sorted((scores["raw"][p], p) for p, y in items if y == c) for c, name in enumerate(classes)}
    by_class = {name: videos for name, videos in by_class.items() if videos}
    raw = [v for videos in by_class.values() for v, _ in videos]
    text = (f"<p>Each dot a training video; normalised: {html.escape(norm)} over the training videos.</p>"
            + strips("raw s", {c: [v for v, _ in vs] for c, vs in by_class.items()}, min(raw), max(raw))
            + strips("normalised s", {c: [normalised[p] for _, p in vs] for c, vs in by_class.items()}, 0, 1)
            + "<table><tr><th>class, its median video</th><th>the middle frames of its 4 score clips</th>"
            "<th>C (white: alike)</th></tr>")
    medians = [videos[len(videos) // 2][1] for videos in by_class.values()]
    try:  # C of each median video; none where the folder lacks its encoders or run.json their flags
        C = {p: v[0] for p, v in score_parts(out, run, [(p, 0) for p in medians]).items()}
    except (train.StageError, KeyError) as e:
        C, text = dict.fromkeys(medians), text + f"<p class=why>C not drawn: {html.escape(str(e))}</p>"
    for name, p in zip(by_class, medians):
        text += (f"<tr><td><b>{html.escape(name)}</b><br>{html.escape(p)}<br>raw s {scores['raw'][p]:.4f}<br>"
                 f"normalised {normalised[p]:.3f}</td><td>{clips(run, p, P)}</td>"
                 f"<td>{heatmap(C[p]) if C[p] else ''}</td></tr>")
    return head + text + "</table>"


def strips(title, values, lo, hi, W=500):
    """One row of dots per class: its videos' values on a common axis [lo, hi]."""
    X = scale(lo, hi, 130, W - 30)
    parts = [f'<text x="{(130 + W) / 2}" y="14" text-anchor="middle">{html.escape(title)}</text>',
             f'<text x="130" y="30" text-anchor="middle">{lo:.4g}</text>',
             f'<text x="{W - 30}" y="30" text-anchor="middle">{hi:.4g}</text>']
    for i, (name, vs) in enumerate(values.items()):
        y = 46 + 18 * i
        parts.append(f'<text x="124" y="{y + 4}" text-anchor="end">{html.escape(name)}</text>'
                     f'<line x1="130" y1="{y}" x2="{W - 30}" y2="{y}" stroke="#ddd"/>')
        parts += [f'<circle r="3" cx="{X(v):.1f}" cy="{y}" fill="{COLOURS[0]}" fill-opacity="0.5" data-series='
                  f'"{html.escape(title)}" data-x="{html.escape(name)}" data-y="{v!r}"/>' for v in vs]
    return f'<svg class="chart" width="{W}" height="{40 + 18 * len(values)}" role="img">{"".join(parts)}</svg>'


def heatmap(C, cell=32):
    """The 4x4 matrix C: grey level 255 * clamp(C_ij, 0, 1), the value written in each cell."""
    parts = []
    for i, row in enumerate(C):
        for j, v in enumerate(row):
            g = round(255 * min(max(v, 0.0), 1.0))
            parts.append(f'<rect x="{j * cell}" y="{i * cell}" width="{cell}" height="{cell}" fill="rgb({g},{g},{g})" '
                         f'data-c="{v!r}" stroke="#888"/><text x="{j * cell + cell / 2}" y="{i * cell + 20}" '
                         f'text-anchor="middle" font-size="11" fill="{"#000" if g > 127 else "#fff"}">{v:.2f}</text>')
    return f'<svg width="{4 * cell}" height="{4 * cell}" role="img">{"".join(parts)}</svg>'


def clips(run, path, P):
    """The middle frames of a video's 4 score clips as PNGs, or a line saying why not."""
    try:
        video = os.path.join(run.get("root", ""), path)
        middles = [c[len(c) // 2] for c in data.score_indices(data.count_frames(video), run.get("ssl_frames", 8))]
        frames = data.center_crop(data.load_frames(video, middles, P), P).permute(1, 2, 3, 0)  # (4, P, P, 3)
    except data.VideoError as e:
        return f"<p class=why>{html.escape(str(e))}</p>"
    return '<span class="clips">' + "".join(f'<img alt="clip {k + 1}" src="{png_uri(f)}">' for k, f in
                                         enumerate(frames)) + "</span>"


def part_ablation(out, ab):
    """The seed ablation's tables (the paired differences the method's claims rest on: the student minus each
    other model, per seed), and per model each seed's figure as a point beside the mean (a bar)."""
    seeds, top1 = ab["seeds"], ab["top1"]
    rows = [[LABELS.get(k, k), round(statistics.mean(v), 2), *v] for k, v in top1.items() if len(v) == len(seeds)]
    others = {**top1, "best encoder kNN": ab.get("best_knn", [])}  # the better of each seed's two kNN checks
    paired = [[f"student - {LABELS.get(k, k)}", *(round(a - b, 2) for a, b in zip(top1["student"], v))]
              for k, v in others.items() if "student" in top1 and k != "student" and not k.startswith("knn")
              and len(v) == len(seeds)]
    W, H = 760, 30 + 22 * len(rows)
    X = scale(0, 100, 230, W - 20)
    parts = [f'<text x="{X(v)}" y="14" text-anchor="middle">{v} %</text>' for v in (0, 50, 100)]
    for i, (name, mean, *values) in enumerate(rows):
        y = 30 + 22 * i
        parts.append(f'<text x="224" y="{y + 4}" text-anchor="end">{html.escape(name)}</text>'
                     f'<line x1="{X(0)}" y1="{y}" x2="{X(mean):.1f}" y2="{y}" stroke="#bbb" stroke-width="8"/>')
        parts += [f'<circle r="4" cx="{X(v):.1f}" cy="{y}" fill="{COLOURS[j % len(COLOURS)]}" data-series="seed '
                  f'{seeds[j]}" data-x="{html.escape(name)}" data-y="{v!r}">'
                  f'<title>seed {seeds[j]}: {v}</title></circle>'
                  for j, v in enumerate(values)]
    legend = " ".join(f'<span style="color:{COLOURS[j % len(COLOURS)]}">&#9679; seed {s}</span>'
                      for j, s in enumerate(seeds))
    return ('<h2 id="ablation">Seed ablation</h2>'
            + table(["model", "mean", *(f"seed {s}" for s in seeds)], rows, "ablation.json")
            + table(["paired difference", "mean", *(f"seed {s}" for s in seeds)],
                    [[d[0], round(statistics.mean(d[1:]), 2), *d[1:]] for d in paired], "paired")
            + f'<p>grey bar: the mean; {legend}</p><svg width="{W}" height="{H}" role="img">{"".join(parts)}</svg>'
            + "".join(f'<p><a href="seed{s}/report.html">seed {s}</a></p>' for s in seeds
                      if os.path.exists(os.path.join(out, f"seed{s}", "report.html"))))


def report(out):
    """OUT/report.html from what the folder holds; returns its path."""
    files = {name: read(out, name, name.endswith(".jsonl")) for name in FILES}
    # a file is missed only where this kind of folder holds it: a seed ablation's, or a run's (its labeled steps')
    expected = {"ablation.json"} if files["ablation.json"][0] is not None or any(
        d.startswith("seed") for d in os.listdir(out)) else {"run.json", "results.json", "log.jsonl", *(
            ("per_class.json", "scores.json") if "labeled" in (files["run.json"][0] or {}) else ())}
    why = [r for name, (_, r) in files.items() if r and (name in expected or not r.startswith("no "))]
    got = {name: obj for name, (obj, _) in files.items()}
    classes = list(next(iter(got["per_class.json"].values()))) if got["per_class.json"] else None
    parts = [part_run(out, got["run.json"], got["log.jsonl"]) if got["run.json"] is not None else "",
             part_ablation(out, got["ablation.json"]) if got["ablation.json"] is not None else "",
             part_figures(got["results.json"], got["per_class.json"]) if got["results.json"] is not None else "",
             part_training(got["log.jsonl"]) if got["log.jsonl"] else "",
             part_scores(out, got["run.json"], got["scores.json"], classes)
             if got["scores.json"] is not None and got["run.json"] is not None else ""]
    notes = "".join(f"<p class=why>not shown: {html.escape(w)}</p>" for w in why)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(out)}</title><style>{CSS}</style>"
            f"</head><body><h1>{html.escape(os.path.abspath(out))}</h1>{notes}{''.join(parts)}</body></html>")
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a run folder")
    args = p.parse_args(argv)
    if not os.path.isdir(args.out):
        p.error(f"{args.out} is not a folder")
    print(f"wrote {report(args.out)}")


if __name__ == "__main__":
    main()
