"""Every stage of train.py, run for real on toy videos in subprocesses."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
from conftest import write_audio_only

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--size", "32", "--frames", "4", "--ssl-frames", "4", "--batch-size", "4", "--test-clips", "2",
        "--labeled", "2", "--workers", "0", "--epochs", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: float sums in the same order in every process


def train(*args, root, out, check=True, extra=()):
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--root", root, "--out", str(out), *FAST, *args, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def chain(toy_root, tmp_path_factory):
    """invariant -> distinctive -> both -> finetune -> supervised -> semisup, one epoch each."""
    out = tmp_path_factory.mktemp("run")
    logs = {st: train("--stage", st, root=toy_root, out=out).stdout
            for st in ("invariant", "distinctive", "both", "finetune", "supervised", "semisup")}
    return out, logs


def test_checkpoint_chain_and_results(chain, toy_root):
    out, logs = chain
    for name in ("invariant", "distinctive", "both", "teacher_invariant", "teacher_distinctive", "supervised", "student"):
        ckpt = load(out / f"{name}.pt")
        assert ckpt["epoch"] == ckpt["epochs"] == 1 and set(ckpt) >= {"model", "optimizer", "rng", "args", "arch"}
    assert "skipped 14 head keys" in logs["finetune"]
    results = json.load(open(out / "results.json"))
    assert set(results) == {"teacher_invariant", "teacher_distinctive", "supervised", "student"}
    assert all(0 <= v <= 100 for v in results.values())
    labeled = open(out / "labeled.txt").read().split("\n")[:-1]
    assert len(labeled) == 16 and len(open(out / "unlabeled.txt").read().split("\n")[:-1]) == 24
    scores = json.load(open(out / "scores.json"))["raw"]
    train_paths = [line.split()[0] for line in open(os.path.join(toy_root, "trainlist01.txt"))]
    assert sorted(scores) == sorted(train_paths) and all(0 <= s <= 1 for s in scores.values())
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {r["stage"] for r in log} >= {"invariant", "both", "student"} and all("bad_videos" in r for r in log)
    # eval of the saved student reproduces the recorded accuracy
    p = train("--stage", "eval", "--ckpt", str(out / "student.pt"), root=toy_root, out=out)
    assert f"test top-1 {results['student']:.2f}%" in p.stdout


def test_missing_inputs_name_the_stage(toy_root, tmp_path):
    p = train("--stage", "semisup", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "run --stage both first" in p.stderr
    shutil.copy(os.path.join(toy_root, "classInd.txt"), tmp_path / "classInd.txt")


def test_missing_teacher(chain, toy_root, tmp_path):
    out, _ = chain
    for name in ("invariant", "distinctive", "both", "teacher_invariant"):
        shutil.copy(out / f"{name}.pt", tmp_path / f"{name}.pt")
    p = train("--stage", "semisup", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "teacher_distinctive.pt not found: run --stage finetune first" in p.stderr


@pytest.mark.parametrize("flags, message", [
    (["--stage", "nope"], "invalid choice"),
    (["--stage", "supervised", "--frames", "0"], "--frames must be positive"),
    (["--stage", "supervised", "--labeled", "0"], "--labeled must be > 0"),
    (["--stage", "supervised", "--labeled", "9"], "class Disk has only 5 training videos"),
    (["--stage", "supervised", "--holdout", "5"], "--holdout 5: class Disk has 5 training videos"),
    (["--stage", "supervised", "--root", "/no/such/dir"], "dataset root not found: /no/such/dir"),
    (["--stage", "supervised", "--dataset", "ucf101", "--root", "/no/such/dir"], "dataset root not found: /no/such/dir"),
    (["--stage", "supervised", "--dataset", "list", "--train-list", "/no/list.txt", "--test-list", "/no/list.txt"],
     "split file not found: /no/list.txt"),
])
def test_bad_cli_input(toy_root, tmp_path, flags, message):
    t0 = time.time()
    p = train(*flags, root=toy_root, out=tmp_path, check=False, extra=flags[flags.index("--root"):] if "--root" in flags else ())
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()[-1]) < 300 and time.time() - t0 < 60


def test_holdout_replaces_the_test_split_by_training_videos(toy_root, tmp_path):
    import train as train_py

    run = train_py.Run(train_py.get_args(["--stage", "supervised", "--root", toy_root, "--out", str(tmp_path), "--holdout", "2"]))
    full, test, classes = data.read_ucf101(toy_root, toy_root, 1)
    by_class = [[it for it in full if it[1] == c] for c in range(len(classes))]  # naive reference
    assert run.test == [it for c in by_class for it in c[-2:]]
    assert run.train == [it for it in full if it not in run.test] and not set(run.test) & set(test)
    assert set(run.labeled) | set(run.unlabeled) == set(run.train)


def test_checkpoint_of_other_width_or_classes(chain, toy_root, tmp_path):
    out, _ = chain
    p = train("--stage", "eval", "--ckpt", str(out / "student.pt"), "--width", "8", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "student.pt" in p.stderr and "--width" in p.stderr
    ckpt = load(out / "supervised.pt")
    ckpt["arch"]["num_classes"] = 5
    torch.save(ckpt, tmp_path / "five.pt")
    p = train("--stage", "eval", "--ckpt", str(tmp_path / "five.pt"), root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "five.pt: 5 classes, dataset has 8" in p.stderr


def test_same_seed_same_everything(chain, toy_root, tmp_path):
    out, _ = chain
    train("--stage", "supervised", root=toy_root, out=tmp_path)
    assert open(tmp_path / "labeled.txt").read() == open(out / "labeled.txt").read()
    a, b = load(out / "supervised.pt")["model"], load(tmp_path / "supervised.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "results.json"))["supervised"] == json.load(open(out / "results.json"))["supervised"]
    # scores recomputed from fresh copies of the SSL encoders are the same
    for name in ("invariant", "distinctive", "both", "teacher_invariant", "teacher_distinctive"):
        shutil.copy(out / f"{name}.pt", tmp_path / f"{name}.pt")
    train("--stage", "semisup", root=toy_root, out=tmp_path)
    assert json.load(open(tmp_path / "scores.json"))["raw"] == json.load(open(out / "scores.json"))["raw"]
    assert json.load(open(tmp_path / "results.json"))["student"] == json.load(open(out / "results.json"))["student"]
    # and the student does not depend on whether the scores were computed or read from the cache
    first = load(tmp_path / "student.pt")["model"]
    p = train("--stage", "semisup", root=toy_root, out=tmp_path)
    assert "scores:" not in p.stdout  # cached this time
    again = load(tmp_path / "student.pt")["model"]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_resume_after_sigkill_matches_uninterrupted_run(toy_root, tmp_path):
    args = ["--stage", "distinctive", "--epochs", "3"]
    train(*args, root=toy_root, out=tmp_path / "full")
    killed = tmp_path / "killed"
    os.makedirs(killed)
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--root", toy_root, "--out", str(killed), *FAST, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ckpt = killed / "distinctive.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load(ckpt)["epoch"] < 3, "the run finished before it could be killed"
    # a kill during a save leaves the temporary file half-written, never the checkpoint itself
    (killed / "distinctive.pt.tmp").write_bytes(b"half a checkpoint")
    p = train(*args, "--resume", root=toy_root, out=killed)
    assert "resuming distinctive after epoch" in p.stdout
    a, b = load(tmp_path / "full" / "distinctive.pt"), load(ckpt)
    assert b["epoch"] == 3 and a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_training_survives_bad_videos(toy_root, tmp_path):
    root = tmp_path / "toy"
    shutil.copytree(toy_root, root)
    train_list = [line.split()[0] for line in open(root / "trainlist01.txt")]
    test_list = [line.split()[0] for line in open(root / "testlist01.txt")]
    (root / train_list[0]).write_bytes(b"")  # zero bytes
    write_audio_only(str(root / train_list[1]))  # audio only, named like a video
    data.write_video(str(root / train_list[2]), data._render(0, 3, 64, 64, torch.Generator()))  # 3 frames < a clip
    (root / test_list[0]).write_text("not a video\n")  # text named .avi
    out = tmp_path / "out"
    p = train("--stage", "supervised", "--labeled", "5", "--epochs", "2", root=str(root), out=out)
    assert p.stderr.count(train_list[0]) == 1 and p.stderr.count(train_list[1]) == 1  # warned once each
    assert train_list[2] not in p.stderr  # short, but readable
    assert "1 unreadable, counted wrong" in p.stdout and "over 16 videos" in p.stdout
    assert [json.loads(line)["bad_videos"] for line in open(out / "log.jsonl")] == [2, 2]


def test_torchrun_two_processes_gloo(chain, toy_root, tmp_path):
    out, _ = chain
    for name in ("invariant", "distinctive"):
        shutil.copy(out / f"{name}.pt", tmp_path / f"{name}.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(HERE, "train.py"), "--stage", "finetune", "--device", "cpu", "--root", toy_root,
           "--out", str(tmp_path), *FAST]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("teacher_invariant: test top-1") == 1  # rank 0 logs alone
    assert "over 16 videos" in p.stdout  # 8 + 8 across the ranks, none padded or dropped
    assert not list(tmp_path.glob("*.tmp"))
    results = json.load(open(tmp_path / "results.json"))
    # the 2-process evaluation (8 + 8 of 16 videos, nothing padded) agrees with a single process
    p = train("--stage", "eval", "--ckpt", str(tmp_path / "teacher_invariant.pt"), root=toy_root, out=tmp_path / "single")
    assert f"test top-1 {results['teacher_invariant']:.2f}% over 16 videos" in p.stdout
