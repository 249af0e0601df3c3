"""The tools beside the four modules: the toy sets, the score picture, the ablation's measures."""

import math
import os
import subprocess
import sys

import av
import pytest
import torch

import data
from tools import ablation, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _object(v):
    """(n, H, W, 3) toy frames -> per frame the object's area (pixels), centre row, the share of its bounding
    box it fills, and the box's width / height. The background is the same along a row and the object never
    reaches column 0."""
    mask = (v.int() - v[:, :, :1].int()).abs().sum(-1) > 0  # (n, H, W)
    rows = torch.arange(v.shape[1]).float().view(1, -1, 1)
    area = mask.sum((1, 2)).float()
    box = [m.nonzero() for m in mask]  # per frame (k, 2) pixels
    hw = torch.stack(
        [(b.max(0).values - b.min(0).values + 1).float() for b in box]
    )  # (n, 2) box height, width
    return area, (mask * rows).sum((1, 2)) / area, area / hw.prod(1), hw[:, 1] / hw[:, 0]


def test_toy_classes_are_what_the_premise_needs():
    """Appearance classes repeat: the same area and place all video long, bobbing with a period and phase
    of their own, so the score's 4 clips of such a video do not start on the same pixels. Each temporal
    class is two sub-actions in order, of a shape no appearance class has, and a pair (UpDown / DownUp,
    GrowShrink / ShrinkGrow) visits the same rows or sizes, the other way round: only the order tells the
    two apart."""
    g, n, H = torch.Generator().manual_seed(0), 48, 64
    video = {
        name: [toy._render(c, n, H, 80, g) for _ in range(4)] for c, name in enumerate(toy.TOY_CLASSES)
    }
    for name in toy.TOY_CLASSES[:4]:
        for v in video[name]:
            area, row, fill, aspect = _object(v)
            assert (
                fill.max() < 0.85 and aspect.max() < 1.3
            )  # disk, ring, cross, stripes: round or square, never filled
            assert (
                area.max() - area.min()
            ) / area.mean() < 0.25 and row.max() - row.min() < 0.15 * H  # pixel rounding
            assert row.max() - row.min() > 0.04 * H  # it bobs
            # the cycle is not locked to the score's clips: their first frames differ in pixels
            starts = [clip[0] for clip in data.score_indices(n, 8)]
            assert any(not torch.equal(v[starts[0]], v[t]) for t in starts[1:])
    for first, second, what in (("UpDown", "DownUp", "row"), ("GrowShrink", "ShrinkGrow", "area")):
        for up, down in zip(video[first], video[second]):
            objects = [_object(v) for v in (up, down)]  # (area, row, fill, aspect) each
            # a flat bar, like no appearance class: no instant of a temporal video looks like one of theirs
            assert all(fill.min() > 0.95 and aspect.min() >= 3 for _, _, fill, aspect in objects)
            a, b = (o[0 if what == "area" else 1] for o in objects)
            if what == "row":  # rows grow downwards: UpDown's row falls to its least at the turn
                a, b = -a, -b
            k, m = int(a.argmax()), int(b.argmin())  # the turn: 40 % to 60 % of the video
            assert 0.35 * n <= k <= 0.65 * n and 0.35 * n <= m <= 0.65 * n
            for v in (a, b):  # both sweep the same span, there and back
                span = v.max() - v.min()
                assert abs(v[0] - v[-1]) < 0.1 * span
            assert a[k] - a[0] > 0.3 * (a.max() - a.min()) and b[0] - b[m] > 0.3 * (b.max() - b.min())
            spans = [float(v.max() - v.min()) for v in (a, b)]
            assert abs(spans[0] - spans[1]) < 0.15 * max(spans)


@pytest.mark.parametrize("variant", ["pulse", "blink"])
def test_toy_variants_repeat_in_place_and_order_by_time(variant, tmp_path):
    """The other variants: each repetitive object stays in place all video long and changes in a cycle
    (pulse: its area; blink: the disk and ring their brightness, the cross and square their angle); each
    ordered class is its partner's video played backwards, frame for frame, so only the order tells the two
    apart, and a blink video shows nothing for part of it. make_toy writes groups.txt, and read_groups
    reads it back in class order."""
    n, H = 48, 64
    for c in range(4):
        v = toy._render(c, n, H, 80, torch.Generator().manual_seed(c), variant=variant)
        area, row, _, _ = _object(v)
        assert row.max() - row.min() < 0.05 * H  # in place (the bob variant moves 0.12 H)
        if variant == "pulse":
            assert (area.max() - area.min()) / area.mean() > 0.5
        elif c < 2:  # blinking: as large all along, its colour other from frame to frame
            inside = (v.int() - v[:, :, :1].int()).abs().sum(-1).flatten(1).max(1).values  # (n,)
            assert (area.max() - area.min()) / area.mean() < 0.25 and inside.max() > 1.5 * inside.min()
        else:  # rocking: the shape's pixels move, its area stays
            assert (area.max() - area.min()) / area.mean() < 0.25 and not torch.equal(v[0], v[n // 4])
    for c in (4, 6):
        forward, backward = (toy._render(k, n, H, 80, torch.Generator().manual_seed(c), variant=variant)
                             for k in (c, c + 1))
        assert torch.equal(forward.flip(0), backward) and not torch.equal(forward, backward)
        empty = [not (f.int() - f[:, :1].int()).any() for f in forward]  # no object in the frame
        assert (0.35 * n < sum(empty) < 0.65 * n) if variant == "blink" else not any(empty)
    toy.make_toy(str(tmp_path), train_per_class=1, test_per_class=0, frames=8, size=32, variant=variant)
    classes = toy.TOY_VARIANTS[variant]
    assert toy.read_groups(str(tmp_path), classes[::-1]) == ["ordered"] * 4 + ["repetitive"] * 4
    (tmp_path / "groups.txt").write_text("Disk repetitive\n")
    with pytest.raises(data.DataError, match="groups.txt: no group for class Ring"):
        toy.read_groups(str(tmp_path), classes)
    assert toy.read_groups(str(tmp_path / "Disk"), classes) is None


def test_toy_videos_depend_on_seed_class_split_and_index_only(tmp_path):
    """A set written with more training videos holds the smaller set's training videos, byte for byte, and
    its test videos are new videos, not training videos of the other set (tuning sets and report sets share
    nothing unless asked to)."""
    small, large = tmp_path / "small", tmp_path / "large"
    toy.make_toy(str(small), train_per_class=1, test_per_class=1, frames=8, size=32, seed=3)
    toy.make_toy(str(large), train_per_class=2, test_per_class=1, frames=8, size=32, seed=3)
    for name in toy.TOY_CLASSES:
        g00, g01 = f"{name}/v_{name}_g00_c01.avi", f"{name}/v_{name}_g01_c01.mp4"
        assert (small / g00).read_bytes() == (large / g00).read_bytes()
        # small's test video is g01 (test index 0), large's g01 is training index 1: different videos
        assert (small / g01).read_bytes() != (large / g01).read_bytes()


def test_toy_cli_frame_size(tmp_path):
    p = subprocess.run(
        [
            sys.executable, os.path.join(ROOT, "tools", "toy.py"), str(tmp_path / "t"), "--train-per-class",
            "1", "--test-per-class", "0", "--frames", "8", "--size", "48x64",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    with av.open(str(tmp_path / "t" / "Disk" / "v_Disk_g00_c01.avi")) as c:
        frame = next(c.decode(video=0))
    assert (frame.height, frame.width) == (48, 64)
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "toy.py"), str(tmp_path / "u"), "--size", "48x"],
        capture_output=True, text=True,
    )
    assert p.returncode == 2 and "--size" in p.stderr and "48x" in p.stderr and not (tmp_path / "u").exists()


def test_toy_set_written_anew_in_another_process_is_byte_identical(toy_root, tmp_path):
    """README figures must reproduce from a fresh clone, which writes its own toy set."""
    again = tmp_path / "again"
    subprocess.run(
        [
            sys.executable, os.path.join(ROOT, "tools", "toy.py"), str(again), "--train-per-class", "5",
            "--test-per-class", "2", "--frames", "40", "--size", "64", "--seed", "1",
        ],
        check=True,
        capture_output=True,
    )
    files = sorted(
        os.path.relpath(os.path.join(d, f), toy_root) for d, _, fs in os.walk(toy_root) for f in fs
    )
    assert len(files) == 8 * 7 + 5  # videos, classInd.txt, the two lists, toy.json, groups.txt
    for rel in files:
        assert (again / rel).read_bytes() == open(os.path.join(toy_root, rel), "rb").read(), rel
    mp4 = next(os.path.join(toy_root, f) for f in files if f.endswith(".mp4"))
    with av.open(mp4) as c:  # the MP4 half keeps B-frames: packets arrive out of display order
        pts = [p.pts for p in c.demux(c.streams.video[0]) if p.pts is not None]
    assert pts != sorted(pts)


def test_group_auc_against_counting_pairs():
    """The AUC is the share of (positive, negative) pairs in order, a tie half: counted pair by pair."""
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(30, generator=g) * 4).round() / 4  # few values: many ties
    positive = torch.rand(30, generator=g) < 0.4
    pairs = [(float(a), float(b)) for a, p in zip(s, positive) for b, q in zip(s, positive) if p and not q]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert ablation.group_auc(s, positive) == expected  # a ratio of counts: exact, on every CPU
    assert ablation.group_auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, True, False])) == 1.0
    assert ablation.group_auc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, True, False])) == 0.0


def test_mix_counts_against_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    N, K = 200, 4
    p_I, p_D = (torch.rand(N, K, generator=g).pow(3).softmax(-1) for _ in range(2))
    s, y = torch.rand(N, generator=g), torch.randint(0, K, (N,), generator=g)
    want = dict(videos=N, one_right=0, fixable=0, sim_fixes=0, sim_breaks=0)
    for i in range(N):
        a, b, label = p_I[i].tolist(), p_D[i].tolist(), int(y[i])
        argmax = lambda v: max(range(K), key=lambda k: v[k])  # noqa: E731
        right_I, right_D = argmax(a) == label, argmax(b) == label
        fixed = argmax([0.5 * u + 0.5 * v for u, v in zip(a, b)]) == label
        sim = argmax([float(s[i]) * u + (1 - float(s[i])) * v for u, v in zip(a, b)]) == label
        want["one_right"] += right_I != right_D
        want["fixable"] += right_I != right_D and not fixed
        want["sim_fixes"] += sim and not fixed
        want["sim_breaks"] += fixed and not sim
    got = ablation.mix_counts(p_I, p_D, s, y)
    assert got == want and got["fixable"] > 0 and got["sim_fixes"] > 0


def test_gpu_check_fails_loudly(tmp_path):
    """tools/diagnostics/gpu_check.py on a CPU: a part that fails and a part past its time limit are FAILED rows, printed as
    they end, and the check exits 1; the parts left when the time is spent are FAILED too, never skipped; each
    check writes its own folder, so no figure of an earlier one is reported."""
    tiny = ["--device", "cpu", "--width", "8", "--layers", "1", "1", "1", "1", "--size", "32", "--epochs", "1",
            "--workers", "0", "--out", str(tmp_path), "--no-tests", "--no-bench"]
    runs = []
    for extra in (["--timeout", "2", "--budget", "3"], ["--width", "0", "--budget", "60"]):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "diagnostics", "gpu_check.py"), *tiny, *extra],
                           capture_output=True, text=True, timeout=300)
        rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert p.returncode == 1 and rows and all("FAILED" in row for row in rows), p.stdout + p.stderr
        assert len(rows) == 12 and f"{len(rows)} part(s) FAILED" in p.stdout
        runs.append(rows)
    assert runs[0][0].startswith("| invariant, 1 process | FAILED (timed out after 2 s)")
    assert runs[0][-1].startswith("| predict, 2 processes | FAILED (no time left)")
    assert runs[1][0].startswith("| invariant, 1 process | FAILED (exit 2: ") and "--width" in runs[1][0]
    assert len(os.listdir(tmp_path)) == 2


def test_gpu_check_runs_every_part_on_a_cpu(tmp_path):
    """Every command the GPU check runs (each stage, tools/evaluate.py and tools/predict.py, in 1 and 2 processes)
    works as written, on a CPU at a tiny size: a GPU's few minutes are not spent on a stale command."""
    tiny = ["--device", "cpu", "--width", "8", "--layers", "1", "1", "1", "1", "--size", "32", "--epochs", "1",
            "--workers", "0", "--out", str(tmp_path), "--no-tests", "--no-bench", "--budget", "600"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "diagnostics", "gpu_check.py"), *tiny],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert p.returncode == 0 and len(rows) == 12 and not any("FAILED" in row for row in rows), p.stdout + p.stderr
    assert sum(row.startswith(("| eval, ", "| predict, ")) and "| ok |" in row for row in rows) == 4


def test_the_ordered_variant_is_bob_and_pulse_ordered_classes(tmp_path):
    """--variant ordered: its classes are bob's four ordered classes, then pulse's four, drawn as they are
    there (so each is its partner played backwards, as tested above), and groups.txt calls every one ordered."""
    for c in range(8):
        g = [torch.Generator().manual_seed(c) for _ in range(2)]
        same = (c + 4, "bob") if c < 4 else (c, "pulse")
        assert torch.equal(toy._render(c, 24, 48, 48, g[0], variant="ordered"),
                           toy._render(same[0], 24, 48, 48, g[1], variant=same[1]))
    toy.make_toy(str(tmp_path), train_per_class=1, test_per_class=0, frames=8, size=32, variant="ordered")
    classes = toy.TOY_VARIANTS["ordered"]
    assert toy.read_groups(str(tmp_path), classes) == ["ordered"] * 8 and len(set(classes)) == 8


def test_pipeline_gpu_summary_and_workers_that_fit():
    """tools/diagnostics/pipeline.py's pure parts: nvidia-smi samples read over the stage's steady window only, a field
    reported as [N/A] left out (power on some GPUs), no sample at all said so; and the workers whose batches in
    flight fit in /dev/shm."""
    from tools.diagnostics import pipeline

    stamp = lambda s: __import__("datetime").datetime.fromtimestamp(s).strftime("%Y/%m/%d %H:%M:%S.%f")  # noqa
    rows = [[stamp(100 + k), str(10 * k), "[N/A]", "500"] for k in range(10)]  # utilisation 0, 10, ..., 90
    text = pipeline.gpu_summary(rows, 103, 106)  # samples 3..6: mean 45, median 45
    assert "utilisation mean 45 %" in text and "(median 45)" in text and "power" not in text and "4 samples" in text
    rows = [[stamp(100 + k), "[N/A]", "250.5", "500"] for k in range(3)]
    assert "power mean 250 W" in pipeline.gpu_summary(rows, 0, 1e12) and "utilisation" not in pipeline.gpu_summary(
        rows, 0, 1e12)
    assert pipeline.gpu_summary(rows, 0, 1).startswith("no GPU sample")
    mb = 2**20
    assert pipeline.workers_that_fit(14, 48 * mb, 64 * mb) == 0  # 64 MB: not one batch in flight
    assert pipeline.workers_that_fit(14, 48 * mb, 10 * 2**30) == 14
    for shm in (200 * mb, 500 * mb, 2**30):  # what fits: (2 w + 1) batches within 0.8 of /dev/shm
        w = pipeline.workers_that_fit(14, 48 * mb, shm)
        assert (2 * w + 1) * 48 * mb <= 0.8 * shm < (2 * (w + 1) + 1) * 48 * mb


def test_pipeline_bench_runs_tiny_on_the_cpu(tmp_path):
    """The device script's path, tiny, on the CPU: each row of a stage printed with its three rates and ratios."""
    cmd = ["bash", os.path.join(ROOT, "tools", "diagnostics", "device_pipeline.sh"), str(tmp_path), "--device", "cpu", "--width",
           "8", "--layers", "1", "1", "1", "1", "--size", "32", "--ssl-frames", "8", "--workers", "1", "--videos",
           "8", "--repeat", "2", "--batches", "5", "--steps", "2", "--epochs", "2", "--stages", "supervised"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    row = next(line for line in p.stdout.splitlines() if line.startswith("| supervised |"))
    step, loader, stage, ratio, _ = (float(v) for v in row.strip("|").split("|")[1:6])
    # the rates are printed rounded to integers (+-0.5), the ratio to 0.01 from the unrounded ones
    assert min(step, loader, stage) > 0
    assert abs(ratio - stage / min(step, loader)) <= 0.006 + ratio * (0.5 / stage + 0.5 / min(step, loader))
    assert "profile of 10 steady supervised steps" in p.stdout and "/dev/shm" in p.stdout
    assert (tmp_path / "profile_supervised.txt").exists() and "cores; /dev/shm" in (tmp_path / "device.txt").read_text()


def test_paper_scale_estimate_by_hand(capsys):
    """`tools/diagnostics/bench.py --estimate`: hours = FLOPs / (peak x fraction), a training clip 3 forwards; the FLOPs of
    slow_r50's backbone as pytorchvideo's build gives them (tests/test_models.py's reference, 16x224x224)."""
    from tools.diagnostics import bench

    hours = bench.estimate("r3d50", peak=1e15, fraction=0.5, videos=100, test=10, labeled=20, ssl_epochs=2)
    assert math.isclose(hours["each SSL encoder, 2 epochs"], 2 * 100 * 10 * 3 * 166_960_037_888 / 0.5e15 / 3600,
                        rel_tol=1e-9)
    assert "| each SSL encoder, 2 epochs |" in capsys.readouterr().out
