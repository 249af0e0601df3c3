"""Every stage of train.py, run for real on toy videos: through train.main in this process, and as real
processes where a test kills one or starts several."""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from html.parser import HTMLParser

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import tb
from conftest import numbers_in_line, write_audio_only
from tools import toy
from tools.evaluate import main as evaluate_main

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = [
    "--size", "32", "--frames", "4", "--ssl-frames", "4", "--batch-size", "4", "--test-clips", "2",
    "--labeled", "2", "--workers", "0", "--epochs", "1",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: float sums in the same order in every process


def train(*args, root, out, check=True, extra=(), main=None):
    """`python train.py ...` with these flags, run in this process (`train.main`, as the command line runs
    it, or a tool's `main`; the tests that kill or spawn processes start real ones): its exit code and what
    it printed."""
    import train as train_py

    argv = ["--root", root, "--out", str(out), *FAST, *args, *extra]
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            (main or train_py.main)(argv)
        except SystemExit as e:  # sys.exit(n), and argparse's exit 2
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # what a process would print before dying with exit code 1
            traceback.print_exc()
            code = 1
    p = subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def last_line(p):
    """The last line a process wrote to stderr (torch may warn on import before it, e.g. without NumPy)."""
    return p.stderr.strip().splitlines()[-1]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # what every checkpoint here must allow


@pytest.fixture(scope="module")
def chain(toy_root, tmp_path_factory):
    """The three commands of the README (invariant, distinctive, semisup), then supervised; one epoch each."""
    out = tmp_path_factory.mktemp("run")
    logs = {
        st: train("--stage", st, root=toy_root, out=out).stdout
        for st in ("invariant", "distinctive", "semisup", "supervised")
    }
    return out, logs


def kill_after_an_epoch(args, root, out, ckpt):
    """Starts train.py with `args` and SIGKILLs it as soon as checkpoint `ckpt` holds a finished epoch."""
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--root", root, "--out", str(out), *FAST, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def apart(u, v):
    """How far checkpoint u's weights are from checkpoint v's: the relative L2 distance over all of them."""
    d = sum(float((u["model"][k].float() - w.float()).square().sum()) for k, w in v["model"].items())
    return math.sqrt(d / sum(float(w.float().square().sum()) for w in v["model"].values()))


def copy_run(src, dst, names):
    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)


def test_checkpoint_chain_and_results(chain, toy_root):
    out, logs = chain
    for name in (
        "invariant", "distinctive", "teacher_invariant", "teacher_distinctive", "supervised", "student",
    ):
        ckpt = load(out / f"{name}.pt")  # the teachers take no step (--teacher class-mean)
        assert ckpt["epoch"] == ckpt["epochs"] == (0 if name.startswith("teacher") else 1) and set(ckpt) >= {
            "model", "optimizer", "rng", "args", "arch",
        }
    assert "skipped 14 head keys" in logs["semisup"]
    # semisup ran every step of the method, each announced as it started, the encoders of their own stages
    # reused; the student starts from the distinctive encoder, so no L_I + L_D encoder is trained (that is
    # --student-init both)
    steps = [line for line in logs["semisup"].splitlines() if line.startswith("=== step")]
    assert [s.split(" (")[0] for s in steps] == [
        "=== step 1/5 invariant", "=== step 2/5 distinctive", "=== step 3/5 teacher_invariant",
        "=== step 4/5 teacher_distinctive", "=== step 5/5 student",
    ]
    assert all("reusing" in s for s in steps[:2]) and all(s.endswith(": training") for s in steps[2:])
    assert f"student: starts from the backbone of {out / 'distinctive.pt'}" in logs["semisup"]
    assert not (out / "both.pt").exists()
    results = json.load(open(out / "results.json"))
    assert set(results) == {
        "knn_invariant", "knn_distinctive", "teacher_invariant", "teacher_distinctive", "supervised",
        "student",
    }
    assert all(0 <= v <= 100 for v in results.values())
    labeled = open(out / "labeled.txt").read().split("\n")[:-1]
    assert len(labeled) == 16 and len(open(out / "unlabeled.txt").read().split("\n")[:-1]) == 24
    scores = json.load(open(out / "scores.json"))["raw"]
    train_paths = [line.split()[0] for line in open(os.path.join(toy_root, "trainlist01.txt"))]
    assert sorted(scores) == sorted(train_paths) and all(0 <= s <= 1 for s in scores.values())
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {r["stage"] for r in log} >= {"invariant", "distinctive", "student"} and all(
        "bad_videos" in r for r in log
    )
    # semisup ends with the run folder's table
    table = logs["semisup"].split("results.json\n", 1)[1]
    assert all(
        numbers_in_line(table, f"{k} ") == [pytest.approx(v, abs=0.005)]
        for k, v in json.load(open(out / "results.json")).items()
        if k != "supervised"
    )
    # tools/evaluate.py of the saved student reproduces the recorded accuracy, recorded under its own key; it takes
    # the model and clips from the checkpoint (here --width 8 and --frames 2 are ignored) and leaves the lists
    lists = {name: (out / name).read_text() for name in ("labeled.txt", "unlabeled.txt")}
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in lists}
    p = train("--ckpt", str(out / "student.pt"), root=toy_root, out=out, extra=["--width", "8", "--frames", "2"],
              main=evaluate_main)
    assert numbers_in_line(p.stdout, "test top-1")[0] == pytest.approx(results["student"], abs=0.005)
    after = json.load(open(out / "results.json"))
    assert after["eval_student"] == after["student"] == results["student"]
    assert all((out / n).read_text() == lists[n] and os.stat(out / n).st_mtime_ns == mtimes[n] for n in lists)


def test_missing_inputs_name_the_stage(chain, toy_root, tmp_path):
    p = train("--stage", "finetune", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "invariant.pt not found: run --stage invariant first" in p.stderr
    copy_run(chain[0], tmp_path, ["invariant.pt"])
    p = train("--stage", "finetune", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "distinctive.pt not found: run --stage distinctive first" in p.stderr
    assert not (
        tmp_path / "teacher_invariant.pt"
    ).exists()  # nothing trained before the inputs were all there
    # an encoder whose training stopped before its last epoch is refused, naming how to finish it
    ckpt = load(chain[0] / "distinctive.pt")
    ckpt["epoch"] = 0
    torch.save(ckpt, tmp_path / "distinctive.pt")
    p = train("--stage", "finetune", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and last_line(p) == (
        f"error: {tmp_path / 'distinctive.pt'} is unfinished (0/1 epochs): run --stage distinctive --resume"
    )


def test_labeled_list(chain, toy_root, tmp_path):
    """--labeled-list gives the labeled split it names (a run's own labeled.txt gives that run's split
    back); an entry that is not a training video of the run, or a class left without one, stops it naming
    the file."""
    import train as train_py

    def run(name, *flags):
        return train_py.Run(train_py.get_args(["--stage", "supervised", "--root", toy_root, "--out",
                                               str(tmp_path / name), *flags]))

    listed = [(p, int(y)) for p, y in (line.split() for line in open(chain[0] / "labeled.txt"))]
    r = run("same", "--labeled-list", str(chain[0] / "labeled.txt"))
    assert sorted(r.labeled) == sorted(listed) and set(r.unlabeled) == set(r.train) - set(listed)
    test_video = open(os.path.join(toy_root, "testlist01.txt")).readline().split()[0]
    bad = [(tmp_path / "test.txt", listed + [(test_video, 0)]), (tmp_path / "no_ring.txt", listed[:2])]
    for path, items in bad:
        data.write_lines(path, (f"{p} {y}" for p, y in items))
    with pytest.raises(data.DataError, match=f"test.txt: {test_video} .label 0. is not a training video"):
        run("a", "--labeled-list", str(bad[0][0]))
    with pytest.raises(data.DataError, match="no_ring.txt: no labeled video of class Ring"):
        run("b", "--labeled-list", str(bad[1][0]))


def test_steps_by_hand_equal_semisup_and_are_reused(chain, toy_root, tmp_path):
    """`finetune` by hand gives what `semisup` gives on its way; a later `semisup` reuses it (log lines, and
    the files are not rewritten) and its student is the same."""
    out, _ = chain
    copy_run(out, tmp_path, ["invariant.pt", "distinctive.pt"])
    train("--stage", "finetune", root=toy_root, out=tmp_path)
    names = ("teacher_invariant", "teacher_distinctive")
    mtimes = {n: os.stat(tmp_path / f"{n}.pt").st_mtime_ns for n in names}
    p = train("--stage", "semisup", root=toy_root, out=tmp_path)
    for i, n in enumerate(names):
        assert (
            f"=== step {i + 3}/5 {n} (" in p.stdout
            and f"reusing {tmp_path / n}.pt, finished (0 epochs)" in p.stdout
        )
        assert os.stat(tmp_path / f"{n}.pt").st_mtime_ns == mtimes[n]
    for n in names + ("student",):
        a, b = load(out / f"{n}.pt")["model"], load(tmp_path / f"{n}.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), n


def test_student_init_both(chain, toy_root, tmp_path):
    """--student-init both (the paper's): semisup first trains the L_I + L_LL + L_GL encoder and the student
    starts from it; `both` by hand is reused by a later semisup and gives the same student; a student from
    it differs from the default one (from the distinctive encoder)."""
    out, _ = chain
    teachers = ["invariant.pt", "distinctive.pt", "teacher_invariant.pt", "teacher_distinctive.pt"]
    inside, by_hand = tmp_path / "inside", tmp_path / "by_hand"
    copy_run(out, inside, teachers)
    p = train("--stage", "semisup", "--student-init", "both", root=toy_root, out=inside)
    steps = [line.split(" (")[0] for line in p.stdout.splitlines() if line.startswith("=== step")]
    assert steps == [
        "=== step 1/6 invariant", "=== step 2/6 distinctive", "=== step 3/6 both", "=== step 4/6 teacher_invariant",
        "=== step 5/6 teacher_distinctive", "=== step 6/6 student",
    ]
    assert f"student: starts from the backbone of {inside / 'both.pt'}" in p.stdout
    copy_run(out, by_hand, teachers)
    train("--stage", "both", root=toy_root, out=by_hand)
    mtime = os.stat(by_hand / "both.pt").st_mtime_ns
    p = train("--stage", "semisup", "--student-init", "both", root=toy_root, out=by_hand)
    assert (
        "=== step 3/6 both (" in p.stdout
        and f"reusing {by_hand / 'both.pt'}, finished (1 epochs)" in p.stdout
    )
    assert os.stat(by_hand / "both.pt").st_mtime_ns == mtime
    for n in ("both", "student"):
        a, b = load(inside / f"{n}.pt")["model"], load(by_hand / f"{n}.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), n
    a, b = load(inside / "student.pt")["model"], load(out / "student.pt")["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_teachers_backbone_learning_rate(chain, toy_root, tmp_path):
    """--teacher finetune --finetune-backbone-lr 0 leaves the SSL encoder's backbone as it was, its BatchNorm
    statistics too (only the new classifier moves); the default (0.3) moves every learned weight; the
    class-mean teacher (the default) keeps the backbone and takes no step."""
    out, _ = chain
    for folder, flags in (("frozen", ["--finetune-backbone-lr", "0"]), ("default", [])):
        copy_run(out, tmp_path / folder, ["invariant.pt", "distinctive.pt"])
        train("--stage", "finetune", "--teacher", "finetune", *flags, root=toy_root, out=tmp_path / folder)
    for k in ("invariant", "distinctive"):
        ssl, frozen, default, class_mean = (load(p)["model"] for p in (
            out / f"{k}.pt", tmp_path / "frozen" / f"teacher_{k}.pt", tmp_path / "default" / f"teacher_{k}.pt",
            out / f"teacher_{k}.pt"))
        backbone = [n for n in frozen if n.startswith(("stem.", "stages."))]
        learned = [n for n in backbone if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert len(learned) > 20 and all(torch.equal(frozen[n], ssl[n]) for n in backbone)
        assert all(torch.equal(class_mean[n], ssl[n]) for n in backbone)
        assert not any(torch.equal(default[n], ssl[n]) for n in learned)
        assert not torch.equal(frozen["fc.1.weight"], default["fc.1.weight"])


def test_class_mean_teacher_is_the_nearest_class_mean_classifier(chain, toy_root, tmp_path):
    """--teacher class-mean: the teacher predicts each test clip's class as the nearest class mean (by cosine)
    of the labeled videos' unit clip features, computed here by hand from the decoded clips."""
    import train as train_py

    out, _ = chain
    args = train_py.get_args(["--stage", "finetune", "--root", toy_root, "--out", str(tmp_path), "--teacher-t", "0.3",
                              *FAST])
    run = train_py.Run(args)
    train_py.class_mean_teacher(run, "teacher_invariant", load(out / "invariant.pt"))
    model = run.classifier(load(tmp_path / "teacher_invariant.pt"), tmp_path / "teacher_invariant.pt").eval()

    def by_hand(items):  # (N, 2, C) features and (N, 2, K) logits of each video's 2 test clips
        feats, logits = [], []
        for path, _ in items:
            video = os.path.join(toy_root, path)
            n = data.count_frames(video)
            frames = data.load_frames(video, sum(data.test_indices(n, 4, 2, 2), []), round(32 * 8 / 7))
            clips = [data.center_crop(c, 32, 0.8) for c in frames.view(2, 4, *frames.shape[1:])]
            x = data.augment_on_device(torch.stack(clips), torch.tensor([data.IDENTITY] * 2))  # (2, 3, 4, 32, 32)
            with torch.no_grad():
                feats.append(model.features(x).mean(dim=(2, 3, 4)))
                logits.append(model(x))
        return torch.stack(feats), torch.stack(logits)

    h_l, _ = by_hand(run.labeled)
    mu = torch.stack([F.normalize(h_l[[y == c for _, y in run.labeled]], dim=-1).mean(dim=(0, 1)) for c in range(8)])
    h_t, logits = by_hand(run.test)
    cos = F.normalize(h_t, dim=-1) @ F.normalize(mu, dim=-1).T  # (N, 2, K)
    assert torch.equal(logits.argmax(-1), cos.argmax(-1))
    scale = 0.3 * h_l.norm(dim=-1).mean()  # logits = ||h|| cos(h, mu) / (t mean ||h||), t = 0.3
    assert torch.allclose(logits, h_t.norm(dim=-1, keepdim=True) * cos / scale, rtol=1e-4, atol=1e-4)


def test_resume_of_a_teacher_with_one_optimizer_group_fails_clearly(chain, toy_root, tmp_path):
    """A teacher saved before the backbone had its own learning rate (one Adam parameter group)."""
    out, _ = chain
    copy_run(out, tmp_path, ["invariant.pt", "distinctive.pt"])
    train("--stage", "finetune", "--teacher", "finetune", root=toy_root, out=tmp_path)  # a teacher that trains
    ckpt = load(tmp_path / "teacher_invariant.pt")
    groups = ckpt["optimizer"]["param_groups"]
    ckpt["optimizer"]["param_groups"] = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}]
    torch.save(ckpt, tmp_path / "teacher_invariant.pt")
    p = train("--stage", "finetune", "--teacher", "finetune", "--resume", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and last_line(p).startswith(
        f"error: {tmp_path / 'teacher_invariant.pt'}: its optimizer state"
    )


def test_semisup_killed_in_the_teachers_step_resumes(chain, toy_root, tmp_path):
    out, _ = chain
    args = ["--stage", "semisup", "--epochs", "3", "--teacher", "finetune"]
    killed = tmp_path / "killed"
    copy_run(out, killed, ["invariant.pt", "distinctive.pt"])
    ckpt = killed / "teacher_invariant.pt"
    kill_after_an_epoch(args, toy_root, killed, ckpt)
    assert (
        load(ckpt)["epoch"] < 3 and not (killed / "teacher_distinctive.pt").exists()
    ), "not killed in the teachers' step"
    p = train(*args, "--resume", root=toy_root, out=killed)
    assert (
        "=== step 3/5 teacher_invariant (the invariant encoder fine-tuned on the labeled videos): "
        f"resuming {ckpt}"
        in p.stdout
    )
    assert "resuming teacher_invariant after epoch" in p.stdout
    assert load(killed / "student.pt")["epoch"] == 3 and "student" in json.load(open(killed / "results.json"))
    # the resumed teacher is the one an uninterrupted run gives
    full = tmp_path / "full"
    copy_run(out, full, ["invariant.pt", "distinctive.pt"])
    train("--stage", "finetune", "--epochs", "3", "--teacher", "finetune", root=toy_root, out=full)
    a, b = load(full / "teacher_invariant.pt")["model"], load(ckpt)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stage", "nope"], "invalid choice"),
        (["--stage", "supervised", "--frames", "0"], "argument --frames: must be >= 1, got 0"),
        (["--stage", "supervised", "--labeled", "0"], "argument --labeled: must be > 0, got 0"),
        (
            ["--stage", "finetune", "--finetune-backbone-lr", "-1"],
            "argument --finetune-backbone-lr: must be >= 0, got -1",
        ),
        (["--stage", "supervised", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
        (
            ["--stage", "semisup", "--student-init", "invariant"],
            "argument --student-init: invalid choice: 'invariant'",
        ),
        (["--stage", "supervised", "--labeled", "9"], "class Disk has only 5 training videos"),
        (["--stage", "supervised", "--holdout", "5"], "--holdout 5: class Disk has 5 training videos"),
        (
            ["--stage", "supervised", "--root", "/no/such/dir"],
            "no toy set in /no/such/dir: write it with python tools/toy.py /no/such/dir",
        ),
        (
            ["--stage", "supervised", "--dataset", "ucf101", "--root", "/no/such/dir"],
            "dataset root not found: /no/such/dir",
        ),
        (
            [
                "--stage", "supervised", "--dataset", "list", "--train-list", "/no/list.txt", "--test-list",
                "/no/list.txt",
            ],
            "split file not found: /no/list.txt",
        ),
    ],
)
def test_bad_cli_input(toy_root, tmp_path, flags, message):
    t0 = time.time()
    p = train(
        *flags, root=toy_root, out=tmp_path, check=False,
        extra=flags[flags.index("--root") :] if "--root" in flags else (),
    )
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()[-1]) < 300 and time.time() - t0 < 60


def test_each_epoch_logs_its_own_speed(toy_root, tmp_path):
    """log.jsonl: clips_per_s is the epoch's own clips over the epoch's own wall time (checkpoint included),
    wall_s the stage's running time: so clips_per_s x (wall_s - the previous wall_s) is the epoch's clips,
    up to the rounding of wall_s (0.05 s on both ends) and the moments between one epoch's end and the next
    one's start (the log line, the console line). Here 32 clips an epoch: 8 classes x 5 videos, the
    labeled 2 a class (16) repeated 40 // 16 = 2 times towards the 40 training videos' size, batches of 4."""
    train("--stage", "supervised", root=toy_root, out=tmp_path, extra=["--epochs", "3", "--workers", "2"])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    for before, r in zip([0.0] + [r["wall_s"] for r in log], log):
        dt = r["wall_s"] - before
        assert abs(r["clips_per_s"] * dt - 32) <= r["clips_per_s"] * 0.15 + 0.5, (r, before)


def test_holdout_replaces_the_test_split_by_training_videos(toy_root, tmp_path):
    import train as train_py

    run = train_py.Run(
        train_py.get_args(
            ["--stage", "supervised", "--root", toy_root, "--out", str(tmp_path), "--holdout", "2"]
        )
    )
    full, test, classes = data.read_ucf101(toy_root, toy_root, 1)
    by_class = [[it for it in full if it[1] == c] for c in range(len(classes))]  # naive reference
    assert run.test == [it for c in by_class for it in c[-2:]]
    assert run.train == [it for it in full if it not in run.test] and not set(run.test) & set(test)
    assert set(run.labeled) | set(run.unlabeled) == set(run.train)


def test_checkpoint_of_other_width_or_classes(chain, toy_root, tmp_path):
    out, _ = chain
    copy_run(out, tmp_path, ["invariant.pt", "distinctive.pt"])
    p = train("--stage", "finetune", "--width", "8", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "invariant.pt" in p.stderr and "--width 8" in p.stderr
    ckpt = load(out / "supervised.pt")
    ckpt["arch"]["num_classes"] = 5
    torch.save(ckpt, tmp_path / "five.pt")
    p = train("--ckpt", str(tmp_path / "five.pt"), root=toy_root, out=tmp_path, check=False, main=evaluate_main)
    assert p.returncode == 2 and "five.pt: 5 classes, dataset has 8" in p.stderr


def test_same_seed_same_everything(chain, toy_root, tmp_path):
    out, _ = chain
    train("--stage", "supervised", root=toy_root, out=tmp_path)
    assert open(tmp_path / "labeled.txt").read() == open(out / "labeled.txt").read()
    a, b = load(out / "supervised.pt")["model"], load(tmp_path / "supervised.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.load(open(tmp_path / "results.json"))["supervised"]
        == json.load(open(out / "results.json"))["supervised"]
    )
    # scores recomputed from fresh copies of the SSL encoders are the same
    for name in ("invariant", "distinctive", "teacher_invariant", "teacher_distinctive"):
        shutil.copy(out / f"{name}.pt", tmp_path / f"{name}.pt")
    train("--stage", "semisup", root=toy_root, out=tmp_path)
    assert json.load(open(tmp_path / "scores.json"))["raw"] == json.load(open(out / "scores.json"))["raw"]
    assert (
        json.load(open(tmp_path / "results.json"))["student"]
        == json.load(open(out / "results.json"))["student"]
    )
    # and the student does not depend on whether the scores were computed or read from the cache
    first = load(tmp_path / "student.pt")["model"]
    os.remove(tmp_path / "student.pt")  # a finished student would be reused
    p = train("--stage", "semisup", root=toy_root, out=tmp_path)
    assert "scores:" not in p.stdout  # cached this time
    again = load(tmp_path / "student.pt")["model"]
    assert all(torch.equal(first[k], again[k]) for k in first)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "stage, name, device",
    [
        ("distinctive", "distinctive", "cpu"), ("supervised", "supervised", "cpu"),
        ("semisup", "student", "cpu"), pytest.param("semisup", "student", "cuda", marks=CUDA),
    ],
)
def test_resume_after_sigkill_matches_uninterrupted_run(chain, toy_root, tmp_path, stage, name, device):
    """With the default 2 workers (persistent loaders) and dropout in the supervised classifier: a run killed after an
    epoch and resumed ends with the weights, optimizer and RNG state of an uninterrupted one (on CUDA, the
    CUDA generator's state too: dropout draws from it there)."""
    args = ["--stage", stage, "--epochs", "3", "--workers", "2", "--device", device]
    args += ["--dropout", "0.5"] if stage == "supervised" else []  # the student's teachers come from the chain
    inputs = (
        ["invariant.pt", "distinctive.pt", "teacher_invariant.pt", "teacher_distinctive.pt"]
        if stage == "semisup"
        else []
    )
    full, killed = tmp_path / "full", tmp_path / "killed"
    copy_run(chain[0], full, inputs)
    copy_run(chain[0], killed, inputs)
    train(*args, root=toy_root, out=full)
    ckpt = killed / f"{name}.pt"
    kill_after_an_epoch(args, toy_root, killed, ckpt)
    assert load(ckpt)["epoch"] < 3, "the run finished before it could be killed"
    # a kill during a save leaves the temporary file half-written, never the checkpoint itself
    (killed / f"{name}.pt.tmp").write_bytes(b"half a checkpoint")
    p = train(*args, "--resume", root=toy_root, out=killed)
    assert f"resuming {name} after epoch" in p.stdout
    a, b = load(full / f"{name}.pt"), load(ckpt)
    assert (
        b["epoch"] == 3 and a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    )
    assert torch.equal(a["rng"], b["rng"]) and (device == "cpu" or torch.equal(a["cuda_rng"], b["cuda_rng"]))
    if device == "cpu":  # bit for bit
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        return
    # CUDA runs are not repeatable (pooling backward adds with atomics, cudnn.benchmark picks kernels by
    # timing, bf16): on an H200 two uninterrupted runs ended 8.5e-3 apart (relative L2 of all weights) and
    # resumed ones 7.9e-3 to 1.0e-2 from them. The resumed run is held to 3x the spread of a second
    # uninterrupted one, measured here; a resume that lost the optimizer or the schedule lands far outside.
    again = tmp_path / "again"
    copy_run(chain[0], again, inputs)
    train(*args, root=toy_root, out=again)
    c = load(again / f"{name}.pt")
    assert apart(b, a) <= max(3 * apart(c, a), 1e-4), (apart(b, a), apart(c, a))


def test_training_survives_bad_videos(toy_root, tmp_path):
    root = tmp_path / "toy"
    shutil.copytree(toy_root, root)
    train_list = [line.split()[0] for line in open(root / "trainlist01.txt")]
    test_list = [line.split()[0] for line in open(root / "testlist01.txt")]
    (root / train_list[0]).write_bytes(b"")  # zero bytes
    write_audio_only(str(root / train_list[1]))  # audio only, named like a video
    toy.write_video(
        str(root / train_list[2]), toy._render(0, 3, 64, 64, torch.Generator())
    )  # 3 frames < a clip
    (root / test_list[0]).write_text("not a video\n")  # text named .avi
    out = tmp_path / "out"
    p = train("--stage", "supervised", "--labeled", "5", "--epochs", "2", root=str(root), out=out)
    assert p.stderr.count(train_list[0]) == 1 and p.stderr.count(train_list[1]) == 1  # warned once each
    assert train_list[2] not in p.stderr  # short, but readable
    assert "1 unreadable, counted wrong" in p.stdout and "over 16 videos" in p.stdout
    assert [json.loads(line)["bad_videos"] for line in open(out / "log.jsonl")] == [2, 2]


def torchrun(stage, device, port, root, out, *extra, script="train.py"):
    """train.py --stage `stage` in 2 processes, where NumPy cannot be imported (the project promises to run
    without it, and some collectives of Python objects need it); returns the finished process."""
    no_numpy = os.path.join(str(out), "no_numpy")
    os.makedirs(no_numpy, exist_ok=True)
    with open(os.path.join(no_numpy, "numpy.py"), "w") as f:
        f.write("raise ModuleNotFoundError(\"No module named 'numpy'\")\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(HERE, script), *(["--stage", stage] if stage else []), "--device", device,
           "--root", root, "--out", str(out), *FAST, *extra]
    env = dict(ENV, PYTHONPATH=no_numpy)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_torchrun_two_processes_gloo(toy_root, tmp_path):
    """The whole ablation (every training stage, evaluation, the kNN check, the scores and the mix counts) in
    2 processes: one rank prints and writes, one valid ablation.json, and the 2-process evaluation (8 + 8
    of 16 videos, nothing padded) and scores (of an even and an odd number of videos) agree with a single
    process's."""
    p = torchrun(None, "cpu", 29517, toy_root, tmp_path, "--seeds", "0", script="tools/ablation.py")
    assert p.stdout.count("teacher_invariant: test top-1") == 1 and p.stdout.count("| paired difference") == 1
    assert "over 16 videos" in p.stdout and not list(tmp_path.rglob("*.tmp"))
    table = json.load(open(tmp_path / "ablation.json"))
    results = json.load(open(tmp_path / "seed0" / "results.json"))
    assert {k: v[0] for k, v in table["top1"].items()} == results and table["mix"]["0"]["videos"] == 24
    p = train("--ckpt", str(tmp_path / "seed0" / "teacher_invariant.pt"), root=toy_root, out=tmp_path / "single",
              main=evaluate_main)
    assert numbers_in_line(p.stdout, "test top-1") == [pytest.approx(results["teacher_invariant"], abs=0.005), 16]
    # the scores, each process computing half of the training videos', are those of a single process
    copy_run(tmp_path / "seed0", tmp_path / "single", [f"{k}.pt" for k in (
        "invariant", "distinctive", "teacher_invariant", "teacher_distinctive")])
    train("--stage", "semisup", root=toy_root, out=tmp_path / "single")
    two, one = (json.load(open(tmp_path / d / "scores.json"))["raw"] for d in ("seed0", "single"))
    assert two.keys() == one.keys() and all(abs(two[k] - one[k]) < 1e-6 for k in one)
    # and of 15 training videos, shares of 8 and 7 (one torchrun at a time in the suite: here, not a test beside)
    from tools import subset

    two, one, lists = tmp_path / "odd_two", tmp_path / "odd_one", tmp_path / "lists"
    subset.main(["--root", toy_root, "--lists", str(lists), "--classes", "3"])
    three = ["--dataset", "list", "--train-list", str(lists / "train.txt"), "--test-list", str(lists / "test.txt"),
             "--class-names", str(lists / "classes.txt")]
    torchrun("semisup", "cpu", 29519, toy_root, two, *three)
    copy_run(two, one, ["invariant.pt", "distinctive.pt"])
    train("--stage", "semisup", *three, root=toy_root, out=one)
    a, b = (json.load(open(d / "scores.json"))["raw"] for d in (two, one))
    assert len(b) == 15 and a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_two_gpus_nccl(chain, toy_root, tmp_path):
    """NCCL reduces CUDA tensors only: evaluation, its counts and every other collective must work there."""
    out, _ = chain
    copy_run(out, tmp_path, ["invariant.pt", "distinctive.pt"])
    p = torchrun("semisup", "cuda", 29518, toy_root, tmp_path)
    results = json.load(open(tmp_path / "results.json"))
    assert set(results) >= {"teacher_invariant", "teacher_distinctive", "student"}
    assert "over 16 videos" in p.stdout


class RunsCommand:
    """Pickles as a call of os.system: loading it with weights_only=False runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def malicious_checkpoint(path, marker, real):
    """A real checkpoint with one extra entry whose unpickling would create `marker`."""
    ckpt = load(real)
    ckpt["payload"] = RunsCommand(f"touch {marker}")
    torch.save(ckpt, path)


def test_malicious_checkpoint_never_runs(chain, toy_root, tmp_path):
    out, _ = chain
    marker = tmp_path / "payload-ran"
    # the file is really malicious: an unsafe load runs it
    malicious_checkpoint(tmp_path / "probe.pt", marker, out / "student.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    cases = [  # (file to replace, real checkpoint it imitates, command; tools/evaluate.py for the first)
        ("evil.pt", "student.pt", ["--ckpt", str(tmp_path / "case0" / "evil.pt")]),
        ("distinctive.pt", "distinctive.pt", ["--stage", "distinctive", "--resume"]),
        ("invariant.pt", "invariant.pt", ["--stage", "finetune"]),
        ("teacher_invariant.pt", "teacher_invariant.pt", ["--stage", "semisup"]),
    ]
    for k, (name, real, flags) in enumerate(cases):
        run = tmp_path / f"case{k}"
        copy_run(
            out, run, ["invariant.pt", "distinctive.pt", "teacher_invariant.pt", "teacher_distinctive.pt"]
        )
        malicious_checkpoint(run / name, marker, out / real)
        p = train(*flags, root=toy_root, out=run, check=False, main=None if k else evaluate_main)
        assert p.returncode == 2 and last_line(p).startswith(f"error: {run / name}: refused"), p.stderr
        assert "could run code" in last_line(p) and "Traceback" not in p.stderr
        assert not marker.exists(), flags


def test_unreadable_checkpoints_fail_clearly(chain, toy_root, tmp_path):
    out, _ = chain
    student = (out / "student.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(student[: len(student) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    ckpt = load(out / "student.pt")
    del ckpt["arch"]["width"], ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "keys.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    os.makedirs(tmp_path / "folder.pt")
    for name, message in [
        ("half.pt", "refused: not a checkpoint of weights alone (damaged, truncated"),
        ("text.pt", "refused: not a checkpoint"), ("empty.pt", "refused: not a checkpoint"),
        ("keys.pt", "not a checkpoint of this project, missing optimizer, arch.width"),
        ("list.pt", "not a checkpoint of this project"), ("folder.pt", "is not a file"),
    ]:
        p = train("--ckpt", str(tmp_path / name), root=toy_root, out=tmp_path, check=False, main=evaluate_main)
        assert (
            p.returncode == 2
            and last_line(p).startswith(f"error: {tmp_path / name}")
            and message in last_line(p)
        ), p.stderr
        assert "Traceback" not in p.stderr
    # of another kind: a classifier where an SSL encoder is needed, and the other way round
    run = tmp_path / "kinds"
    copy_run(out, run, ["distinctive.pt"])
    shutil.copy(out / "supervised.pt", run / "invariant.pt")
    p = train("--stage", "finetune", root=toy_root, out=run, check=False)
    assert (
        p.returncode == 2
        and f"{run / 'invariant.pt'} is a classifier, not a self-supervised encoder" in p.stderr
    )
    p = train("--ckpt", str(out / "distinctive.pt"), root=toy_root, out=run, check=False, main=evaluate_main)
    assert p.returncode == 2 and "distinctive.pt is a self-supervised encoder, not a classifier" in p.stderr
    assert not (run / "teacher_invariant.pt").exists() and not (run / "results.json").exists()


def test_damaged_run_files(chain, toy_root, tmp_path):
    """The run's JSON files are written atomically: one damaged from outside stops the next stage before any
    work, with one line naming it, and is left as it is."""
    out, _ = chain
    names = ["invariant.pt", "distinctive.pt", "teacher_invariant.pt", "teacher_distinctive.pt", "scores.json"]
    for k, (name, text) in enumerate([("scores.json", '{"source": {"inv'), ("results.json", "\x00\x01 not json"),
                                      ("per_class.json", "[1, 2]"), ("run.json", "{")]):
        run = tmp_path / f"case{k}"
        copy_run(out, run, names)
        (run / name).write_text(text)
        p = train("--stage", "semisup", root=toy_root, out=run, check=False)
        assert p.returncode == 2 and last_line(p).startswith(f"error: {run / name} is damaged"), p.stderr
        assert (run / name).read_text() == text and not (run / "student.pt").exists()


class HostValues(TorchDispatchMode):
    """Records every op on a device tensor that also takes a host tensor of one or more dimensions (an index
    made on the CPU: on a GPU, a copy that waits for it). 0-dim host tensors pass as numbers and are fine."""

    def __init__(self, device):
        super().__init__()
        self.device, self.found = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == self.device for t in tensors) and any(
            t.device.type == "cpu" and t.dim() for t in tensors
        ):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def step_of_each_stage(args, device, B=2, K=8):
    """Two steps of each stage's loop as `train.fit` runs them (the learning rate, the stage's terms, backward
    and step, the terms added to the sums on the device), on random batches finished on `device` before the
    first step. Yields (stage, step) before each step runs."""
    import train as train_py
    from models import compact

    def clips(n):
        x = torch.randint(0, 256, (n, 3, 4, 32, 32), dtype=torch.uint8).to(device)
        p = torch.tensor([data.IDENTITY] * n).to(device)
        return data.augment_on_device(x, p)  # (n, 3, 4, 32, 32)

    y = torch.randint(0, K, (B,)).to(device)
    ssl = compact(8, (1, 1, 1, 1), proj_dim=128).to(device)
    clf = compact(8, (1, 1, 1, 1), num_classes=K, dropout=0.5).to(device)
    teachers = [compact(8, (1, 1, 1, 1), num_classes=K).to(device).eval().requires_grad_(False) for _ in range(2)]
    s = torch.rand(2 * B).to(device)
    steps = {
        "both": (ssl, [clips(10 * B) for _ in range(2)],
                 lambda net, x: train_py.ssl_terms(net, x, "both", 0.1)),
        "supervised": (clf, [clips(B) for _ in range(2)],
                       lambda net, x: train_py.classifier_terms(net, x, y)),
        "student": (
            clf, [(clips(B), clips(B)) for _ in range(2)],
            lambda net, x: train_py.student_terms(net, teachers, x[0], y, x[1], s, args),
        ),
    }
    for name, (net, batches, terms_of) in steps.items():
        opt, sums = torch.optim.Adam(net.parameters(), 1e-3), {}
        for step, x in enumerate(batches):  # the first makes Adam's state; the second is like every later one
            yield name, step
            for group in opt.param_groups:
                group["lr"] = train_py.lr_at(step, 20, 1e-3, 10)
            terms = terms_of(net, x)
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()


def test_a_training_step_reads_nothing_back_from_the_device(toy_root, tmp_path):
    """Every stage's step on the meta device, whose tensors have no values: a read inside the step
    (.item(), a non-finite test in Python, a boolean-mask index) raises there, and a host tensor entering
    an op on the device (an index built on the CPU) is recorded. The sums are read every --log-every steps."""
    import train as train_py

    args = train_py.get_args(["--stage", "supervised", "--root", toy_root, "--out", str(tmp_path)])
    with HostValues("meta") as mode:
        names = {name for name, _ in step_of_each_stage(args, "meta")}
    assert names == {"both", "supervised", "student"} and mode.found == []


@CUDA
def test_a_cuda_step_does_not_synchronise(toy_root, tmp_path):
    import train as train_py

    args = train_py.get_args(["--stage", "supervised", "--root", toy_root, "--out", str(tmp_path)])
    for name, step in step_of_each_stage(args, "cuda"):
        torch.cuda.set_sync_debug_mode("error" if step == 1 else "default")  # the first step copies constants
    torch.cuda.set_sync_debug_mode("default")


def test_fit_reads_every_log_every_steps_and_names_a_non_finite_loss(toy_root, tmp_path, capsys):
    """`train.fit` on real batches of the toy set: each step's learning rate is `lr_at`'s; the sums are read
    after every 4th step (the mean so far in the progress line), and a NaN in step 6 stops the run at the
    read after step 8, naming the steps since the last read."""
    import train as train_py

    run = train_py.Run(
        train_py.get_args(
            ["--stage", "supervised", "--root", toy_root, "--out", str(tmp_path), "--log-every", "4", *FAST]
        )
    )
    model = run.model(num_classes=8, dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = run.loader(run.dataset(run.train, "train"), 4)  # 40 videos: 10 steps an epoch
    values, lrs = [0.5, 1.5, 2.0, 4.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0], []

    def terms(net, batch):
        lrs.append(opt.param_groups[0]["lr"])
        return {"CE": net(batch[0]).sum() * 0 + values[len(lrs) - 1]}

    with pytest.raises(FloatingPointError, match=r"^non-finite loss CE in supervised epoch 0, steps 5-8$"):
        train_py.fit(run, "supervised", model, opt, [loader], terms, 2, 1e-3)
    assert "supervised ep 0 step 4/10 CE 2.0000 |" in capsys.readouterr().out
    assert lrs == [train_py.lr_at(step, 20, 1e-3, 10) for step in range(8)]


def subset_lists(ucf_root, folder, *flags):
    """tools/subset.py on the UCF101 tree into `folder`; train.py's flags that read its lists."""
    from tools import subset

    subset.main(["--dataset", "ucf101", "--root", ucf_root, "--lists", str(folder), *flags])
    return ["--dataset", "list", "--train-list", str(folder / "train.txt"), "--test-list", str(folder / "test.txt"),
            "--class-names", str(folder / "classes.txt")]


def test_subset_tool_on_a_ucf101_tree(ucf_root, tmp_path, capsys):
    """tools/subset.py on UCF101's split files: the classes named (or the first N in classInd order), renumbered
    0..N-1 with their names, at most N videos of each drawn with the seed, in list order; train.py reads the lists
    back as written. A bad --classes stops it with one line."""
    import train as train_py
    from conftest import UCF_CLASSES
    from tools import subset

    def run(name, *flags):
        listed = subset_lists(ucf_root, tmp_path / name, *flags)
        argv = ["--stage", "supervised", "--root", ucf_root, "--labeled", "1", "--out", str(tmp_path / f"run_{name}")]
        return train_py.Run(train_py.get_args(argv + listed))

    lines = lambda name: [
        line.rstrip("\r\n").split(" ")[0] for line in open(os.path.join(ucf_root, name), newline="")
    ]  # noqa: E731
    train_all, test_all = lines("trainlist01.txt"), lines("testlist01.txt")
    r = run("a", "--classes", "Drumming,Basketball", "--per-class", "3", "--test-per-class", "1")
    assert r.classes == ["Drumming", "Basketball"]
    for items, full, per in ((r.train, train_all, 3), (r.test, test_all, 1)):
        for label, name in enumerate(r.classes):
            mine = [p for p, y in items if y == label]
            assert len(mine) == per and all(p.startswith(name + "/") for p in mine)
        assert [p for p, _ in items] == [p for p in full if p in {q for q, _ in items}]  # in list order
    again = run("b", "--classes", "Drumming,Basketball", "--per-class", "3", "--test-per-class", "1")
    other = run("c", "--classes", "Drumming,Basketball", "--per-class", "3", "--seed", "1")
    assert again.train == r.train and other.train != r.train and len(other.test) == 4  # all test videos
    first = run("d", "--classes", "3")
    assert first.classes == UCF_CLASSES[:3] and len(first.train) == 15
    for flags, message in ((["--classes", "9"], "--classes 9: the dataset has 6 classes"),
                           (["--classes", "Disk,Sphere"], "--classes: no class named 'Disk' in the dataset"),
                           (["--per-class", "0"], "argument --per-class: must be >= 1, got 0")):
        with pytest.raises(SystemExit) as e:
            subset.main(["--dataset", "ucf101", "--root", ucf_root, "--lists", str(tmp_path / "e"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "e")
    state = lambda: {f: ((tmp_path / "a" / f).read_text(), os.stat(tmp_path / "a" / f).st_mtime_ns)  # noqa: E731
                     for f in ("train.txt", "test.txt", "classes.txt")}
    before = state()
    subset_lists(ucf_root, tmp_path / "a", "--classes", "Drumming,Basketball", "--per-class", "3", "--test-per-class",
                 "1")  # the same lists again: the files left as they are
    with pytest.raises(SystemExit):  # other lists into the same folder: refused, nothing changed
        subset.main(["--dataset", "ucf101", "--root", ucf_root, "--lists", str(tmp_path / "a"), "--classes", "3"])
    assert "holds other lists: write these to another --lists folder" in capsys.readouterr().err
    assert state() == before
    for flags, message in ((["--dataset", "ucf101"], "--dataset ucf101 needs --root"),
                           (["--root", ucf_root, "--classes", "Drumming,Drumming"], "each once"),
                           (["--root", ucf_root, "--lists", str(tmp_path / "a" / "train.txt")], "is a file, not a")):
        with pytest.raises(SystemExit) as e:
            subset.main(["--lists", str(tmp_path / "f"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_smoke_run_of_the_three_commands_on_a_ucf101_subset(ucf_root, tmp_path):
    flags = subset_lists(ucf_root, tmp_path / "lists", "--classes", "3", "--per-class", "4", "--test-per-class", "1")
    for stage in ("invariant", "distinctive", "semisup"):
        p = train("--stage", stage, root=ucf_root, out=tmp_path / "run", extra=flags + ["--labeled", "1"])
    assert "over 3 videos" in p.stdout
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert set(results) == {
        "knn_invariant", "knn_distinctive", "teacher_invariant", "teacher_distinctive", "student",
    }
    assert set(json.load(open(tmp_path / "run" / "per_class.json"))["student"]) == {
        "ApplyEyeMakeup", "Basketball", "Archery",
    }


def refusal(out, flag, value, recorded, source):
    """The line a command stops with where --flag value differs from the value recorded in OUT/source."""
    where = f"{out / source} by this run's earlier stages" if source == "run.json" else out / source
    return (f"error: --{flag} {value} differs from {recorded}, recorded in {where}: use another --out for a new run "
            f"(--from {out} takes the steps that match), or give --{flag} {recorded}")


def test_run_folder_refuses_other_flags(chain, toy_root, tmp_path):
    train("--stage", "supervised", root=toy_root, out=tmp_path)
    assert json.load(open(tmp_path / "run.json"))["labeled"] == 2
    p = train("--stage", "supervised", root=toy_root, out=tmp_path, check=False, extra=["--labeled", "1"])
    assert p.returncode == 2 and last_line(p) == refusal(tmp_path, "labeled", 1.0, 2.0, "run.json")
    # the flags that reach every step are the folder's: an SSL stage with another seed or frame size stops too
    for flag, value in (("seed", "3"), ("size", "24")):
        p = train("--stage", "invariant", root=toy_root, out=tmp_path, check=False, extra=[f"--{flag}", value])
        assert p.returncode == 2 and f"--{flag} {value} differs from " in last_line(p)
    assert not (tmp_path / "invariant.pt").exists()
    # a checkpoint reused is checked against what it was trained with
    other = tmp_path / "other"
    copy_run(
        chain[0], other, ["invariant.pt", "distinctive.pt", "teacher_invariant.pt", "teacher_distinctive.pt"]
    )
    p = train("--stage", "semisup", root=toy_root, out=other, check=False, extra=["--seed", "1"])
    assert p.returncode == 2 and last_line(p) == refusal(other, "seed", 1, 0, "invariant.pt")
    assert not (other / "student.pt").exists()


# A finished run (the chain's) and `--stage semisup` again in its folder with one flag changed: the flag, the
# value given, the value recorded, and the file it was recorded in (the first step the flag reaches; the
# encoders are read, and so checked, first; the flags that reach every step are the folder's). Each flag of the
# three lists that reach only some steps is here, and so is the first step it reaches.
REFUSED = [
    ("w-unlabeled", "0", 0.0, 100.0, "student.pt"), ("w-labeled", "0", 0.0, 50.0, "student.pt"),
    ("distill", "kl", "kl", "mse", "student.pt"), ("score-norm", "rank", "rank", "minmax", "student.pt"),
    ("student-init", "both", "both", "distinctive", "student.pt"), ("tau", "0.5", 0.5, 0.1, "run.json"),
    ("lr", "0.01", 0.01, 0.0005, "student.pt"), ("weight-decay", "0.1", 0.1, 0.0001, "student.pt"),
    ("epochs", "2", 2, 1, "student.pt"),
    ("student-forward", "joint", "joint", "separate", "student.pt"),
    ("teacher", "finetune", "finetune", "class-mean", "teacher_invariant.pt"),
    ("teacher-t", "0.5", 0.5, 0.2, "teacher_invariant.pt"),
    ("finetune-backbone-lr", "1", 1.0, 0.3, "teacher_invariant.pt"),
    ("aug", "released", "released", "light", "teacher_invariant.pt"),
    ("dropout", "0", 0.0, 0.5, "teacher_invariant.pt"),
    ("epoch", "labeled", "labeled", "train", "teacher_invariant.pt"),
]


def test_a_finished_run_refuses_each_changed_flag_in_place(chain, toy_root, tmp_path):
    """Nothing is written or moved by a refused command; --stage invariant with another --epochs is refused too
    (a finished step is not continued); --mix fixed is another step (student_fixed), not a refusal."""
    out = tmp_path / "run"
    shutil.copytree(chain[0], out)
    files = lambda: {f: (os.stat(out / f).st_mtime_ns, (out / f).read_bytes()) for f in os.listdir(out)}  # noqa: E731
    before = files()
    for flag, given, value, recorded, source in REFUSED + [("epochs", "3", 3, 1, "invariant.pt")]:
        stage = "invariant" if source == "invariant.pt" else "semisup"
        p = train("--stage", stage, root=toy_root, out=out, check=False, extra=[f"--{flag}", given])
        assert p.returncode == 2 and last_line(p) == refusal(out, flag, value, recorded, source), p.stdout[-2000:]
        assert files() == before, flag


STEPS = ["invariant.pt", "distinctive.pt", "teacher_invariant.pt", "teacher_distinctive.pt", "scores.json",
         "student.pt"]


@pytest.mark.parametrize("flag, value, taken", [
    ("w-unlabeled", "0", STEPS[:5]),  # the student's own: only a student is trained
    ("teacher-t", "0.5", ["invariant.pt", "distinctive.pt", "scores.json"]),  # the teachers, and so the student
    ("tau", "0.5", []),  # the encoders, and so the scores, the teachers and the student
])
def test_from_takes_the_steps_whose_settings_match(chain, toy_root, tmp_path, flag, value, taken):
    """--from DIR: each finished step of DIR whose settings, and those of every step upstream of it, equal the
    command's is taken, byte for byte, with its figure; the others are trained here. run.json names the source."""
    base, out = chain[0], tmp_path / "new"
    p = train("--stage", "semisup", "--from", str(base), f"--{flag}", value, root=toy_root, out=out)
    steps = {line.split(" (")[0].split()[-1]: line for line in p.stdout.splitlines() if line.startswith("=== step")}
    for f in STEPS:
        name = f.split(".")[0]
        assert ((out / f).read_bytes() == (base / f).read_bytes()) == (f in taken), f
        if f.endswith(".pt"):  # a step taken is reused here; another is trained here, its weights its own
            assert steps[name].endswith(": training") != (f in taken), steps[name]
            assert all(torch.equal(w, load(base / f)["model"][k]) for k, w in load(out / f)["model"].items()) == (
                f in taken), f
    recorded = json.load(open(out / "run.json"))
    assert recorded["from"] == str(base) and recorded["taken"] == [f.split(".")[0] for f in taken]
    assert recorded[flag.replace("-", "_")] == float(value)
    before, after = (json.load(open(d / "results.json")) for d in (base, out))
    figures = {"knn_invariant", "knn_distinctive", "teacher_invariant", "teacher_distinctive"}
    assert all(after[k] == before[k] for k in figures if any(k.endswith(f.split(".")[0]) for f in taken))


def test_from_bad_input(chain, toy_root, tmp_path):
    """--from a folder that is not there or holds no run, --out itself, into a folder that holds a run, or from a
    run whose run.json or a checkpoint is damaged: one line naming it, exit 2, nothing written in the new folder."""
    base, new = chain[0], tmp_path / "new"
    empty, run_json, ckpt, stray = tmp_path / "empty", tmp_path / "run_json", tmp_path / "ckpt", tmp_path / "stray"
    empty.mkdir()
    stray.mkdir()
    (stray / "student.pt").write_bytes(b"a file of its own")  # no run.json: still not overwritten
    for damaged in (run_json, ckpt):
        shutil.copytree(base, damaged)
    (run_json / "run.json").write_text("{")
    (ckpt / "teacher_invariant.pt").write_bytes((base / "teacher_invariant.pt").read_bytes()[:1000])
    cases = [
        (tmp_path / "nowhere", new, f"--from {tmp_path / 'nowhere'}: no such folder"),
        (empty, new, f"--from {empty}: holds no run (no run.json)"),
        (ckpt, ckpt, f"--from {ckpt} is --out itself: --from starts a new run folder from another"),
        (base, ckpt, f"--from: {ckpt} already holds a run (or other files): give --from a new --out"),
        (base, stray, f"--from: {stray} already holds a run (or other files): give --from a new --out"),
        (run_json, new, f"{run_json / 'run.json'} is damaged (JSONDecodeError): remove it, or use another --out"),
        (ckpt, new, f"{ckpt / 'teacher_invariant.pt'}: refused: not a checkpoint of weights alone"),
    ]
    for source, out, message in cases:
        before = sorted(os.listdir(out)) if out.exists() else None
        p = train("--stage", "semisup", "--from", str(source), root=toy_root, out=out, check=False)
        assert p.returncode == 2 and last_line(p).startswith("error: " + message), (message, p.stderr[-2000:])
        assert [line for line in p.stderr.splitlines() if line.startswith("error")] == [last_line(p)]
        assert (sorted(os.listdir(out)) if out.exists() else None) == before


def test_predict_top5_against_the_evaluation_clips(chain, toy_root, tmp_path):
    """predict's probabilities against a reference built from data.py's parts: the 2 test clips of each video
    (test_indices, load_frames, center_crop of 0.8, augment_on_device) through the checkpoint's model, softmaxes
    averaged."""
    from models import compact

    out, _ = chain
    ckpt = load(out / "student.pt")
    model = compact(ckpt["arch"]["width"], ckpt["arch"]["layers"], num_classes=8)
    model.load_state_dict(ckpt["model"])
    model.eval()
    videos = [
        os.path.join(toy_root, line.strip()) for line in open(os.path.join(toy_root, "testlist01.txt"))
    ][:3]
    bad = tmp_path / "broken.avi"
    bad.write_text("not a video")
    cmd = [
        sys.executable, os.path.join(HERE, "tools", "predict.py"), "--ckpt",
        str(out / "student.pt"), "--test-clips", "2", "--device", "cpu", "--dataset", "ucf101",  # no --root read
        videos[0], str(bad), *videos[1:],
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 4 and lines[1].startswith(f"{bad}: unreadable (")
    for video, line in zip(videos, lines[:1] + lines[2:]):
        n = data.count_frames(video)
        frames = data.load_frames(video, sum(data.test_indices(n, 4, 2, 2), []), round(32 * 8 / 7))
        x = torch.stack(
            [data.center_crop(c, 32, 0.8) for c in frames.view(2, 4, *frames.shape[1:])]
        )  # (2, 3, 4, 32, 32)
        with torch.no_grad():
            prob = model(data.augment_on_device(x, torch.tensor([data.IDENTITY] * 2))).softmax(-1).mean(0)
        top = prob.topk(5)  # the classes in this order, each probability to the printed digit (+- 0.05)
        named = [part.rsplit(" ", 1) for part in line.removeprefix(f"{video}: ").split(", ")]
        assert [name for name, _ in named] == [toy.TOY_CLASSES[c] for c in top.indices.tolist()]
        assert [float(v.rstrip("%")) for _, v in named] == pytest.approx(
            [100 * v for v in top.values.tolist()], abs=0.051)


def test_knn_top1_against_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
    bank_y, query_y = torch.randint(0, 4, (30,), generator=g), torch.randint(0, 4, (12,), generator=g)
    for k in (1, 5, 50):
        hits = 0
        for q, y in zip(queries, query_y.tolist()):
            sims = sorted(((float(q @ b), j) for j, b in enumerate(bank)), reverse=True)[:k]
            votes = [0.0] * 4
            for sim, j in sims:
                votes[int(bank_y[j])] += math.exp(sim / 0.07)
            hits += max(range(4), key=lambda c: votes[c]) == y
        assert tb.knn_top1(bank, bank_y, queries, query_y, 4, k=k) == pytest.approx(100 * hits / 12)


@pytest.mark.parametrize(
    "files, flags, message",
    [
        (
            {"classInd.txt": "1 A\r\n3 B\r\n"}, ["--dataset", "ucf101"],
            "classInd.txt:2: expected 'index ClassName', the indices 1..2 each once, got '3 B'",
        ),
        (
            {"classInd.txt": "1 A\n1 B\n"}, ["--dataset", "ucf101"],
            "classInd.txt:2: expected 'index ClassName', the indices 1..2 each once, got '1 B'",
        ),
        (
            {"classInd.txt": "0 A\n"}, ["--dataset", "ucf101"],
            "classInd.txt:1: expected 'index ClassName', the indices 1..1 each once, got '0 A'",
        ),
        (
            {"train.txt": "A/a.avi 0\nA/b.avi 2\n", "names.txt": "A\nB\n"}, ["--class-names", "NAMES"],
            "train.txt:2: label 2 is out of range: there are 2 classes (0..1)",
        ),
        (
            {"train.txt": "A/a.avi 0\nA/b.avi -1\n"}, [],
            "train.txt:2: the label must be a non-negative integer, got '-1'",
        ),
        (
            {"train.txt": "A/a.avi 0\nA/b.avi one\n"}, [],
            "train.txt:2: the label must be a non-negative integer, got 'one'",
        ),
        ({"train.txt": "A/a.avi\n"}, [], "train.txt:1: lines must read 'relative/path label'"),
    ],
)
def test_bad_label_files(tmp_path, files, flags, message):
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode())
    flags = [str(tmp_path / "names.txt") if f == "NAMES" else f for f in flags]
    if "ucf101" not in flags:
        flags = [
            "--dataset", "list", "--train-list", str(tmp_path / "train.txt"), "--test-list",
            str(tmp_path / "train.txt"), *flags,
        ]
    p = train("--stage", "supervised", root=str(tmp_path), out=tmp_path / "out", check=False, extra=flags)
    assert p.returncode == 2 and last_line(p).startswith(f"error: {tmp_path}/{message}"), p.stderr


@pytest.mark.parametrize("flag, world, local_rank, index", [
    ("auto", 1, None, 0), ("cuda", 1, None, 0), ("cuda:1", 1, None, 1), ("auto", 2, "1", 1),
    ("cuda", 2, "0", 0),
])
def test_the_cuda_device_has_an_index(monkeypatch, flag, world, local_rank, index):
    """A stand-in for torch.cuda at the device set-up only: the device goes to torch.cuda.set_device, whose
    argument torch's own _get_device_index checks (it refuses a CUDA device without an index)."""
    import train as train_py
    from torch.cuda._utils import _get_device_index

    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: set_to.append(_get_device_index(device)))
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    device = train_py.pick_device(flag, world)
    torch.cuda.set_device(device)
    assert device.type == "cuda" and set_to == [index]


class TinyEncoder(torch.nn.Module):
    """A BatchNorm-free encoder with train.py's SSL outputs (g (N, D), L (N, 4, D), unit vectors), so that a
    sample's embedding does not depend on the rest of its batch."""

    def __init__(self, D=16):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 2 * 8 * 8, 4 * D)

    def forward(self, x, out="ssl", groups=1, local=None):  # no BatchNorm: the groups change nothing
        L = self.lin(x.flatten(1)).view(x.shape[0], 4, -1)  # (N, 4, D)
        return F.normalize(L.mean(dim=1), dim=-1), F.normalize(L, dim=-1)


def ssl_in_processes(rank, world, store, x, results):
    """Process `rank` of `world` (gloo): its share of the videos of x (10, B, ...), each SSL stage's terms
    with the embeddings gathered over the processes, backward through DDP; the terms and the gradient of
    each stage into results[rank]."""
    import train as train_py

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                             world_size=world)
    B = x.shape[1] // world
    mine = x[:, rank * B : (rank + 1) * B].flatten(0, 1)  # (10 B / world, ...) clip-major
    out = {}
    for stage in ("invariant", "distinctive"):
        torch.manual_seed(0)
        model = TinyEncoder()
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        gather = train_py.GatherVideos.apply if world > 1 else None
        terms = train_py.ssl_terms(net, mine, stage, 0.1, gather=gather)
        sum(terms.values()).backward()
        out[stage] = ({k: v.item() for k, v in terms.items()}, model.lin.weight.grad.clone())
    results[rank] = out
    if world > 1:
        torch.distributed.destroy_process_group()


def test_two_processes_train_the_objective_of_one(tmp_path):
    """2 processes x 3 videos give L_I (its negatives the other process's videos too) and L_D, and the
    gradient DDP averages, of 1 process x 6 videos."""
    import torch.multiprocessing as mp

    x = torch.randn(10, 6, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))  # 10 clips of 6 videos
    one = {}
    ssl_in_processes(0, 1, None, x, one)
    with mp.Manager() as manager:
        two = manager.dict()
        mp.spawn(ssl_in_processes, args=(2, str(tmp_path / "store"), x, two), nprocs=2)
        two = dict(two)
    for rank in (0, 1):
        for stage, (terms, grad) in one[0].items():
            assert two[rank][stage][0] == pytest.approx(terms, rel=1e-5), stage
            diff = (two[rank][stage][1] - grad).abs().max().item()
            assert diff <= 1e-5 * grad.abs().max().item(), (stage, diff)


def test_headroom_mixes(chain, toy_root, tmp_path):
    """The headroom mixes of tools/ablation.py: invariant / distinctive: every video 1 / 0; group: 1 for the
    classes groups.txt calls repetitive (the toy's first four), 0 for the ordered ones; class: per class the
    teacher that gives the class's unlabeled training videos the higher summed probability of their class;
    video: per training video the teacher that gives its own class the higher probability; soft: 0.5 but a
    teacher alone where only it is right and the 0.5 mix is wrong; all checked one video at a time, its clips
    as evaluation sees them; with two equal teachers, 0.5 everywhere. The controls: s permuted, s's mean."""
    import train as train_py
    from tools import ablation

    out, _ = chain
    names = ["invariant.pt", "distinctive.pt", "teacher_invariant.pt", "teacher_distinctive.pt"]
    copy_run(out, tmp_path, names)
    args = train_py.get_args(["--stage", "semisup", "--root", toy_root, "--out", str(tmp_path), *FAST])
    run = train_py.Run(args)
    teachers = [train_py.teacher(run, k) for k in train_py.ENCODERS]
    weights = {mix: ablation.mix_weights(run, mix, teachers) for mix in ablation.HEADROOM}
    assert set(weights["invariant"].values()) == {1.0} and set(weights["distinctive"].values()) == {0.0}
    assert weights["group"] == {p: float(y < 4) for p, y in run.train}
    ds = run.dataset(run.train, "test")
    right = torch.zeros(2, len(run.train))  # per teacher and training video: p of its own class
    prob_of = [[], []]  # per teacher, each training video's class probabilities
    for i, (_, y) in enumerate(run.train):
        clips, params = ds[i][:2]  # (K, 3, T, S, S), (K, P)
        x = data.augment_on_device(clips, params)
        with torch.no_grad():
            for j, t in enumerate(teachers):
                prob_of[j].append(t(x).softmax(dim=-1).mean(dim=0))
                right[j, i] = prob_of[j][-1][y]
    per_video = {p: 1.0 if a > b else 0.0 if a < b else 0.5 for (p, _), a, b in zip(run.train, *right.tolist())}
    assert weights["video"] == pytest.approx(per_video) and 0 < sum(per_video.values()) < len(per_video)
    summed = torch.zeros(2, len(run.classes))
    for i, item in enumerate(run.train):
        if item in run.unlabeled:
            summed[:, item[1]] += right[:, i]
    per_class = [1.0 if a > b else 0.0 for a, b in zip(*summed.tolist())]
    assert 0 < sum(per_class) < len(per_class)  # both teachers win somewhere: the check has two sides
    assert weights["class"] == {p: per_class[y] for p, y in run.train}
    # soft: 0.5, a teacher alone on the videos where only it is right and the 0.5 mix's target is wrong
    soft = {}
    for i, (p, y) in enumerate(run.train):
        probs = [prob_of[j][i] for j in range(2)]  # (K,) each
        right = [int(q.argmax()) == y for q in probs]
        fixed_right = int((0.5 * probs[0] + 0.5 * probs[1]).argmax()) == y
        soft[p] = 1.0 if right == [True, False] and not fixed_right else (
            0.0 if right == [False, True] and not fixed_right else 0.5)
    assert weights["soft"] == soft and set(soft.values()) != {0.5}
    # the controls: the similarity scores' own values, shuffled across the videos, or their mean for all
    s_video = train_py.scores(run)["s"]
    permuted = ablation.mix_weights(run, "permuted")
    assert sorted(permuted.values()) == pytest.approx(sorted(s_video.values())) and permuted != s_video
    assert ablation.mix_weights(run, "permuted") == permuted  # drawn from --seed
    mean = sum(s_video.values()) / len(s_video)
    assert ablation.mix_weights(run, "constant") == pytest.approx({p: mean for p in s_video})
    for mix in ("class", "video"):
        assert set(ablation.mix_weights(run, mix, teachers[:1] * 2).values()) == {0.5}
    run.args.root = str(tmp_path / "bare")  # the toy set without its groups.txt
    os.makedirs(run.args.root)
    for name in set(os.listdir(toy_root)) - {"groups.txt"}:
        os.symlink(os.path.join(toy_root, name), os.path.join(run.args.root, name))
    with pytest.raises(train_py.StageError, match=r"the group oracle \(--headroom\) needs .*bare/groups.txt, lines 'ClassName"):
        ablation.mix_weights(run, "group", teachers)


def test_ablation_tables_match_each_seeds_run(toy_root, tmp_path):
    """tools/ablation.py: each seed's whole method in OUT/seed<s> with that seed (its own encoders), and the
    tables built from their results."""
    from tools import ablation

    p = train("--seeds", "0", "1", root=toy_root, out=tmp_path, main=ablation.main)
    table = json.load(open(tmp_path / "ablation.json"))
    for k, seed in enumerate((0, 1)):
        results = json.load(open(tmp_path / f"seed{seed}" / "results.json"))
        assert {key: v[k] for key, v in table["top1"].items()} == results
        assert load(tmp_path / f"seed{seed}" / "invariant.pt")["args"]["seed"] == seed
        mix = table["mix"][str(seed)]
        assert mix["videos"] == 24 and mix["fixable"] <= mix["one_right"]
    assert not {"student_invariant", "student_group"} & set(table["top1"])  # those come with --headroom
    d = [a - b for a, b in zip(table["top1"]["student"], table["top1"]["supervised"])]
    assert numbers_in_line(p.stdout, "| student - supervised-only |")[:3] == pytest.approx(
        [sum(d) / 2, d[0], d[1]], abs=0.051)
    from tools import report  # its page: every seed's figure as ablation.json has it, the paired differences

    page = Page(report.report(str(tmp_path)))
    from tools.ablation import LABELS

    assert {r[0]: [float(v) for v in r[2:]] for r in page.tables["ablation.json"][1:]} == {
        LABELS[k]: v for k, v in table["top1"].items()}  # named as the console names them
    assert page.why == []  # an ablation's folder is not missing a run's files
    paired = dict((r[0], [float(v) for v in r[2:]]) for r in page.tables["paired"][1:])  # under its header
    assert paired["student - supervised-only"] == [round(v, 2) for v in d]
    best = [max(a, b) for a, b in zip(table["top1"]["knn_invariant"], table["top1"]["knn_distinctive"])]
    assert paired["student - best encoder kNN"] == [round(a - b, 2) for a, b in zip(table["top1"]["student"], best)]
    # seed 0's encoders copied into another folder: reused, not retrained, and the same figures come out (the
    # kNN checks too, made again on the reused encoders); --headroom adds the students of the other mixes,
    # --controls those of s permuted and constant, and the AUC of the score's split of the groups, counted
    # here pair by pair
    reused = tmp_path / "reused"
    copy_run(tmp_path / "seed0", reused / "seed0", ["invariant.pt", "distinctive.pt"])
    p = train("--seeds", "0", "--headroom", "--controls", root=toy_root, out=reused, main=ablation.main)
    first = json.load(open(tmp_path / "seed0" / "results.json"))
    again = json.load(open(reused / "seed0" / "results.json"))
    assert {k: v for k, v in again.items() if k in first} == first  # the kNN checks too, of the reused encoders
    assert {f"student_{m}" for m in ablation.HEADROOM + ablation.CONTROLS} <= set(again)
    best = max(again["knn_invariant"], again["knn_distinctive"])
    assert numbers_in_line(p.stdout, "| student - best encoder kNN (the better of the seed's two) |")[:2] == (
        pytest.approx([again["student"] - best] * 2, abs=0.051))
    assert numbers_in_line(p.stdout, "Controls, means: similarity mix")[:3] == pytest.approx(
        [again[k] for k in ("student", "student_permuted", "student_constant")], abs=0.051)
    mix = json.load(open(reused / "ablation.json"))["mix"]["0"]
    assert {"sim_fixes_permuted", "sim_breaks_permuted"} <= set(mix)
    assert "| student, group oracle (s = 1 repetitive, 0 ordered) |" in p.stdout
    gain = again["student_video"] - again["student_fixed"]
    assert numbers_in_line(p.stdout, "per-video oracle")[0] == pytest.approx(again["student_video"], abs=0.051)
    if gain > 0:
        assert numbers_in_line(p.stdout, "of the oracle's")[0] == pytest.approx(gain, abs=0.051)
    else:
        assert "The oracle gains nothing" in p.stdout
    raw = json.load(open(reused / "seed0" / "scores.json"))["raw"]
    repetitive = {p: toy.TOY_CLASSES.index(p.split("/")[0]) < 4 for p in raw}
    rep, order = ([s for p, s in raw.items() if repetitive[p] == r] for r in (True, False))
    auc = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in rep for b in order) / (len(rep) * len(order))
    assert json.load(open(reused / "ablation.json"))["auc"]["C"] == pytest.approx(auc)
    assert numbers_in_line(p.stdout, "every repetitive video above every ordered one): s")[0] == pytest.approx(
        auc, abs=0.0051)
    path = reused / "seed0" / "invariant.pt"
    reused_line = f"=== seed 0: invariant (L_I): reusing {path}"
    assert reused_line in p.stdout


def toy_in_processes(rank, store, root):
    """Process `rank` of 2 (gloo) asks for the demo's toy set in a folder that does not exist yet; rank 1 only
    once rank 0 has started writing it, as a slow process would. Every process must pass the generation's
    barrier (a timeout turns a hang into a failure) and then find the whole set."""
    import datetime
    import functools

    import train as train_py
    from tools import demo

    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=30))
    demo.toy.make_toy = functools.partial(toy.make_toy, train_per_class=4, test_per_class=1, frames=16, size=32)
    if rank == 1:
        while not os.path.exists(os.path.join(root, "Disk")):
            time.sleep(0.05)
    demo.write_toy_once(demo.ablation.parser().parse_args(["--root", root, "--device", "cpu"]))
    assert len(train_py.read_splits(argparse.Namespace(dataset="toy", root=root, splits=None, fold=1))[0]) == 32
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_the_toy_set_is_written_once_and_every_process_waits_for_it(tmp_path):
    import torch.multiprocessing as mp

    root = tmp_path / "toy"
    mp.spawn(toy_in_processes, args=(str(tmp_path / "store"), str(root)), nprocs=2)
    assert toy.toy_version(root) == toy.TOY_VERSION and len(os.listdir(root / "Disk")) == 5


def test_a_run_continued_from_another_directory(chain, toy_root, tmp_path, monkeypatch):
    """Paths given relative in one directory name the same folders when the run is continued from another:
    the encoders trained from `first` with a relative --root and --out, the steps after them from `second`
    with the absolute paths, reusing them."""
    first, second = tmp_path / "first", tmp_path / "second"
    os.makedirs(first)
    os.makedirs(second)
    out = first / "runs" / "r"
    copy_run(chain[0], out, ["invariant.pt"])
    monkeypatch.chdir(first)
    train("--stage", "distinctive", root=os.path.relpath(toy_root, first), out="runs/r")
    assert load(out / "distinctive.pt")["args"]["root"] == toy_root
    assert json.load(open(out / "run.json"))["root"] == toy_root
    monkeypatch.chdir(second)
    p = train("--stage", "finetune", root=toy_root, out=out)
    assert "teacher_distinctive: test top-1" in p.stdout and not (second / "runs").exists()


def test_a_process_without_a_test_video_stops_every_process(toy_root, tmp_path):
    """One test video for two processes: each process would evaluate a share, and one share is empty. Both
    stop at once with the same line, exit code 2, none left waiting in a collective."""
    train_list, test_list = tmp_path / "train.txt", tmp_path / "test.txt"
    train_items, test_items, _ = data.read_ucf101(toy_root, toy_root, 1)
    data.write_lines(train_list, (f"{p} {y}" for p, y in train_items))
    data.write_lines(test_list, [f"{test_items[0][0]} {test_items[0][1]}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), "--stage", "supervised", "--device", "cpu", "--dataset", "list",
           "--root", toy_root, "--train-list", str(train_list), "--test-list", str(test_list), "--out",
           str(tmp_path / "out"), *FAST]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    line = "error: 40 training and 1 test videos for 2 processes: each process needs one of each"
    assert p.returncode != 0 and p.stderr.count(line) == 2, p.stderr[-2000:]


def test_scores_are_recomputed_after_their_encoders_change(chain, toy_root, tmp_path):
    """OUT/scores.json is reused while its encoders are the ones it came from; another encoder in the run folder
    (here the distinctive one, whose settings are the invariant one's) makes the next reader compute the scores
    again, from the new encoder."""
    import train as train_py

    out, _ = chain
    copy_run(out, tmp_path, ["invariant.pt", "distinctive.pt", "scores.json"])
    args = train_py.get_args(["--stage", "semisup", "--root", toy_root, "--out", str(tmp_path), *FAST])
    cached = json.load(open(tmp_path / "scores.json"))
    assert train_py.scores(train_py.Run(args))["raw"] == cached["raw"]
    os.utime(tmp_path / "scores.json", (0, 0))  # a reuse would leave the file as it is
    assert train_py.scores(train_py.Run(args))["raw"] == cached["raw"]
    assert os.stat(tmp_path / "scores.json").st_mtime == 0
    shutil.copy(tmp_path / "distinctive.pt", tmp_path / "invariant.pt")
    again = train_py.scores(train_py.Run(args))
    assert again["raw"] != cached["raw"] and again["raw"] == json.load(open(tmp_path / "scores.json"))["raw"]


def dropout_states_in_processes(rank, store, root, out, states):
    """Process `rank` of 2 (gloo) trains the supervised classifier for one epoch; states[rank]: the global
    RNG state (what dropout draws from) at its first training forward."""
    import train as train_py

    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    run = train_py.Run(train_py.get_args(["--stage", "supervised", "--root", root, "--out", out, "--device",
                                          "cpu", *FAST]))
    build, seen = run.model, []

    def model(**kw):
        m = build(**kw)
        m.register_forward_pre_hook(lambda mod, x: seen.append(torch.get_rng_state()) if mod.training else None)
        return m

    run.model = model
    train_py.train_classifier(run, "supervised")
    states[rank] = seen[0]
    torch.distributed.destroy_process_group()


def test_each_process_draws_its_own_dropout_masks(toy_root, tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        states = manager.dict()
        mp.spawn(dropout_states_in_processes, args=(str(tmp_path / "store"), toy_root, str(tmp_path / "out"),
                                                    states), nprocs=2)
        states = dict(states)
    assert not torch.equal(states[0], states[1])


class Page(HTMLParser):
    """What a report page shows: its tables by data-source (rows of cell texts), its chart points (their
    attributes, in order) and its lines saying what is not shown."""

    def __init__(self, path):
        super().__init__()
        self.tables, self.points, self.cells, self.why, self.ids = {}, [], [], [], []
        self._cell, self._why = None, False
        self.feed(open(path).read())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._rows = self.tables.setdefault(attrs.get("data-source", ""), [])
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "svg":
            self._chart = len(self.ids) + len(self.points)  # any number that tells this chart from the others
        elif tag == "circle":
            self.points.append({**attrs, "chart": self._chart})
        elif tag == "rect" and "data-c" in attrs:
            self.cells.append(float(attrs["data-c"]))
        elif tag == "p" and attrs.get("class") == "why":
            self._why = True
            self.why.append("")
        self.ids += [attrs["id"]] if "id" in attrs else []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._rows[-1].append(self._cell)
            self._cell = None
        self._why = self._why and tag != "p"

    def handle_data(self, text):
        if self._cell is not None:
            self._cell += text
        if self._why:
            self.why[-1] += text


def test_report_page_shows_what_the_run_folder_holds(chain, tmp_path):
    """tools/report.py: every figure of its tables equals the JSON it came from, each training curve has one
    point per logged epoch at the logged value (higher values drawn higher), and a damaged or missing file
    leaves its part out with one line saying why."""
    from tools import report

    run = tmp_path / "run"
    shutil.copytree(chain[0], run)
    page = Page(report.report(str(run)))
    results, per_class = (json.load(open(run / name)) for name in ("results.json", "per_class.json"))
    from tools.ablation import LABELS

    assert {m: float(v) for _, m, v in page.tables["results.json"][1:]} == results
    labels = [label for label, m, _ in page.tables["results.json"][1:]]
    assert labels == [LABELS.get(m, m) for m in results]  # a figure with no label (eval_*, which another test of
    assert LABELS["student"] in labels  # this module may have recorded in the shared folder) shows its key
    header, *rows = page.tables["per_class.json"]
    assert {m: {r[0]: float(r[1 + k]) for r in rows} for k, m in enumerate(header[1:])} == per_class
    flags = [row for part in ("run.json",) for row in page.tables[part] if row[0] != "flag"]
    assert dict(flags)["root"] == json.load(open(run / "run.json"))["root"]
    assert "None" not in dict(flags).values() and "labeled_list" not in dict(flags)  # unset flags: one line
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    for r in log:
        for term in set(r) & {"L_I", "L_D", "CE", "distill_u", "lr", "clips_per_s"}:
            drawn = [p for p in page.points if p["data-series"] in (term, "clips/s") and p["data-x"] == repr(r["epoch"])
                     and float(p["data-y"]) == r[term]]
            assert drawn, (r["stage"], term)
    curves = {(p["chart"], p["data-series"]) for p in page.points if p["data-x"].replace(".", "").isdigit()}
    for chart, series in curves:  # within a chart, a higher value is drawn higher (a smaller cy)
        pts = sorted((float(p["data-y"]), -float(p["cy"])) for p in page.points
                     if (p["chart"], p["data-series"]) == (chart, series))
        assert [y for _, y in pts] == sorted(y for _, y in pts), series
    assert len(curves) >= 3 * len({r["stage"] for r in log})
    assert {"run", "figures", "training", "scores"} <= set(page.ids)
    assert page.why == []  # a run folder is not missing the ablation's tables
    # the score: per class its median video (by raw s) and that video's C, cell by cell as scores.json has it
    scores, train_items = json.load(open(run / "scores.json")), [line.split() for line in open(run / "labeled.txt")]
    train_items += [line.split() for line in open(run / "unlabeled.txt")]
    medians = []
    for c in range(8):
        videos = sorted((scores["raw"][p], p) for p, y in train_items if int(y) == c)
        medians.append(videos[len(videos) // 2][1])
    # C by hand from the run's two encoders on each median video's 4 score clips: (e_I e_I^T + e_D e_D^T) / 2,
    # whose mean off-diagonal gives back the score the run recorded, s = (mean + 1) / 2
    args = json.load(open(run / "run.json"))
    import models
    import train as train_py

    ckpts = [train_py.load_checkpoint(str(run / f"{k}.pt"), "ssl") for k in ("invariant", "distinctive")]
    enc = [train_py.load_into(models.build(**ckpt["arch"]), ckpt, "").eval() for ckpt in ckpts]
    ds = data.VideoDataset([(p, 0) for p in medians], args["root"], "score", args["ssl_frames"], args["ssl_stride"],
                           args["size"], test_crop=args["test_crop"])
    want = []
    for i, p in enumerate(medians):
        with torch.no_grad():
            x = data.augment_on_device(*ds[i][:2])  # (4, 3, T, S, S)
            C = sum(e @ e.T for e in (f(x, out="ssl")[0] for f in enc)) / 2  # (4, 4)
        assert (((C.sum() - C.trace()) / 12 + 1) / 2).item() == pytest.approx(scores["raw"][p], abs=1e-4)
        want += C.flatten().tolist()
    assert page.cells == pytest.approx(want, abs=1e-5)
    (run / "per_class.json").write_text("{")
    os.remove(run / "log.jsonl")
    page = Page(report.report(str(run)))
    assert "per_class.json" not in page.tables and "training" not in page.ids and "results.json" in page.tables
    assert any("per_class.json is damaged (JSONDecodeError)" in w for w in page.why)
    assert any(w.startswith("not shown: no ") and "log.jsonl" in w for w in page.why)


def test_compare_page_shows_two_runs_side_by_side(chain, toy_root, tmp_path):
    """tools/compare.py: each differing flag and only those, each figure with its difference to the first run,
    one curve per run in each chart where both ran, the last record of an epoch logged twice (a resumed run;
    the report page shows the same); one folder with itself: no differing flag, every difference 0; bad input:
    one line naming the folder or file, and nothing written."""
    from tools import compare, report

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(chain[0], a)
    train("--stage", "supervised", "--dropout", "0.2", root=toy_root, out=b, extra=["--epochs", "4"])
    log = [json.loads(line) for line in open(b / "log.jsonl")]
    again = {**log[-1], "CE": log[-1]["CE"] + 1.0, "run": "resumed"}  # the epoch logged a second time
    with open(b / "log.jsonl", "a") as f:
        f.write(json.dumps(again) + "\n")
    page = Page(compare.compare([str(a), str(b)], str(tmp_path / "page.html")))
    flags = {row[0]: row[1:] for row in page.tables["flags"][1:]}
    assert flags["dropout"] == ["0.5", "0.2"] and "size" not in flags and "root" not in flags
    ra, rb = (json.load(open(d / "results.json")) for d in (a, b))
    assert ra["supervised"] != rb["supervised"]  # a difference of the wrong sign would show
    rows = {row[1]: row[2:] for row in page.tables["results"][1:]}
    assert set(rows) == set(ra) | set(rb)
    assert float(rows["supervised"][0]) == ra["supervised"] and float(rows["supervised"][1]) == rb["supervised"]
    assert abs(float(rows["supervised"][2]) - (rb["supervised"] - ra["supervised"])) < 0.011
    assert rows["student"][1:] == ["-", "-"]  # b has no student
    by_chart = {}
    for p in page.points:
        by_chart.setdefault(p["chart"], set()).add(p["data-series"])
    assert {"run 1", "run 2"} in by_chart.values() and all(s <= {"run 1", "run 2"} for s in by_chart.values())
    for pg in (page, Page(report.report(str(b)))):  # the twice-logged epoch: its last record, once
        ce = [p for p in pg.points if p["data-x"] == repr(again["epoch"]) and p["data-series"] in ("CE", "run 2")
              and abs(float(p["data-y"]) - again["CE"]) < 1e-9]
        stale = [p for p in pg.points if p["data-series"] in ("CE", "run 2") and float(p["data-y"]) == log[-1]["CE"]]
        assert len(ce) == 1 and not stale
    same = Page(compare.compare([str(a), str(a)], str(tmp_path / "same.html")))
    assert "flags" not in same.tables and all(row[-1] in ("0.0", "-") for row in same.tables["results"][1:])
    (tmp_path / "empty").mkdir()
    (b / "results.json").write_text("{")
    for folders, named in (([a, tmp_path / "empty"], "empty: neither a run folder"),
                           ([a, b], f"{b / 'results.json'} is damaged")):
        before = {p: set(os.listdir(p)) for p in (a, b)}
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
            compare.main([str(f) for f in folders])
        assert exit_.value.code == 2 and stderr.getvalue().startswith("error: ") and named in stderr.getvalue()
        assert len(stderr.getvalue().strip().splitlines()) == 1
        assert {q: set(os.listdir(q)) for q in (a, b)} == before
