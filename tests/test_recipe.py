"""--recipe released and the released behaviours it turns on, each against a reference: the released schedules
against a literal replay of the released loops, the student's two forwards against a by-hand forward, the
released epoch by the optimizer's step count, the recipe's table in a tiny run of the three commands; and the
run folder's check of every flag it records."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

import train as train_py
from models import compact
from test_train import FAST, last_line, load, train


def released_ssl_loop(base, losses):
    """pretraining.py's bookkeeping, line for line: the rate each epoch trains at, given each epoch's loss."""
    warmup, warmup_array, patience, drop_factor = True, [0.01 + 0.11 * e for e in range(10)], 5, 2
    learning_rate1 = learning_rate2 = base
    scheduler_epoch, scheduler_step, best_score, rates = 0, 1, 10000, []
    for epoch, loss in enumerate(losses):
        if epoch < warmup:
            learning_rate2 = warmup_array[epoch] * base
        if scheduler_epoch == patience:
            learning_rate2 = learning_rate1 / (drop_factor**scheduler_step)
            scheduler_epoch = 0
            scheduler_step += 1
        rates.append(learning_rate2)
        if loss < best_score:
            best_score, scheduler_epoch = loss, 0
        if loss > best_score:
            scheduler_epoch += 1
    return rates


def released_classifier_loop(base, losses):
    """finetune.py's and train_semisup.py's loss_based schedule, line for line."""
    warmup_array = [0.01 + 0.11 * e for e in range(10)]
    learning_rate2, train_loss, rates = base, 1000, []
    for epoch, loss in enumerate(losses):
        if epoch < len(warmup_array):
            learning_rate2 = warmup_array[epoch] * base
        elif 0.5 <= train_loss < 0.8:
            learning_rate2 = base / 2
        elif train_loss < 0.4:
            learning_rate2 = base / 10
        elif train_loss < 0.25:
            learning_rate2 = base / 20
        rates.append(learning_rate2)
        train_loss = loss
    return rates


def test_released_schedules_against_the_released_loops():
    g = torch.Generator().manual_seed(0)
    # a loss that falls, stalls (plateaus of more than 5 epochs, ties included), and falls again
    ssl = [10 - 0.1 * e for e in range(8)] + [9.5] * 7 + [9.2] + [9.3, 9.2, 9.4, 9.6, 9.25, 9.21] + [9.0] * 12
    cls = [2.0, 1.5, 1.2, 0.9, 0.7, 0.6, 0.55, 0.45, 0.42, 0.9] + [0.7, 0.45, 0.3, 0.2, 0.5, 0.9, 0.1, 0.04, 0.45]
    cls += (torch.rand(30, generator=g) * 1.2).tolist()
    for base in (5e-3, 1e-4):
        want = released_ssl_loop(base, ssl)
        assert len({round(w / base, 9) for w in want}) >= 3  # the sequence reaches the drops
        for epoch, rate in enumerate(want):
            assert math.isclose(train_py.released_lr(base, epoch, ssl[:epoch], ssl=True), rate, rel_tol=1e-9)
        want = released_classifier_loop(base, cls)
        assert {round(w / base, 9) for w in want[10:]} == {1.0, 0.5, 0.1}
        for epoch, rate in enumerate(want):
            assert math.isclose(train_py.released_lr(base, epoch, cls[:epoch], ssl=False), rate, rel_tol=1e-9)


def test_student_forwards_separate_and_joint():
    """--student-forward separate: each batch through the student alone (BatchNorm normalises each batch with
    its own statistics), against a by-hand forward; joint: one forward of both batches together. Both against
    the loss written out: CE + w_l MSE(p_S, p_T) on labeled + w_u MSE on unlabeled."""
    torch.manual_seed(0)
    K, B = 5, 3
    net = compact(8, (1, 1, 1, 1), num_classes=K).train()
    teachers = [compact(8, (1, 1, 1, 1), num_classes=K).eval().requires_grad_(False) for _ in range(2)]
    x_l, x_u = torch.randn(B, 3, 4, 32, 32), torch.randn(B, 3, 4, 32, 32) * 2 + 1  # batches of other statistics
    y, s = torch.randint(0, K, (B,)), torch.rand(2 * B)
    x = torch.cat([x_l, x_u])
    with torch.no_grad():
        p_I, p_D = (t(x).softmax(-1) for t in teachers)
        p_T = s[:, None] * p_I + (1 - s[:, None]) * p_D
    for forward in ("separate", "joint"):
        args = train_py.get_args(["--stage", "semisup", "--student-forward", forward])
        state = {k: v.clone() for k, v in net.state_dict().items()}
        terms = train_py.student_terms(net, teachers, x_l, y, x_u, s, args)
        net.load_state_dict(state)  # the running statistics as before the call
        logits = torch.cat([net(x_l), net(x_u)]) if forward == "separate" else net(x)
        net.load_state_dict(state)
        p_S = logits.softmax(-1)
        want = {"CE": F.cross_entropy(logits[:B], y),
                "distill_l": 50 * (p_S[:B] - p_T[:B]).square().mean(),
                "distill_u": 100 * (p_S[B:] - p_T[B:]).square().mean()}
        for k, v in want.items():
            assert torch.allclose(terms[k], v, rtol=1e-5, atol=1e-7), (forward, k)
        if forward == "separate":
            separate = terms["CE"]
    assert not torch.allclose(separate, terms["CE"])  # BatchNorm's statistics: the two forwards differ


def adam_steps(path):
    """How many steps the optimizer of a checkpoint took (Adam's step count)."""
    return int(next(iter(load(path)["optimizer"]["state"].values()))["step"])


def test_released_epoch_is_a_pass_over_the_labeled_videos(toy_root, tmp_path):
    """--epoch labeled: the classifiers and the student take len(labeled) // batch steps an epoch (the release's
    zip ends with its labeled loader); --epoch train: the classifiers' labeled subset is repeated to the
    training set's size and the student passes over the unlabeled videos."""
    # the toy set: 8 classes x 5 training videos, --labeled 2: 16 labeled, 24 unlabeled; batches of 4
    for epoch, want_sup, want_student in (("labeled", 16 // 4, 16 // 4), ("train", 32 // 4, 24 // 4)):
        out = tmp_path / epoch
        for stage in ("invariant", "distinctive", "semisup", "supervised"):
            train("--stage", stage, "--epoch", epoch, "--teacher", "finetune", root=toy_root, out=out)
        assert adam_steps(out / "supervised.pt") == want_sup
        assert adam_steps(out / "teacher_invariant.pt") == want_sup
        assert adam_steps(out / "student.pt") == want_student


def test_recipe_released_in_a_tiny_run_of_the_three_commands(toy_root, tmp_path):
    """The three commands with --recipe released and the sizes of a toy run: the first lines name what the
    recipe set and the released values the given flags overrode; the stages train as released (two optimizer
    groups at the same rate, no dropout, no weight decay, the released epoch); run.json records the recipe and
    the folder refuses to go on without it."""
    for stage in ("invariant", "distinctive", "semisup"):
        p = train("--stage", stage, "--recipe", "released", "--arch", "compact", "--width", "8", "--layers", "1", "1",
                  "1", "1", root=toy_root, out=tmp_path)
        first = p.stdout.splitlines()[:2]
        assert first[0].startswith("--recipe released set ") and "--ssl-aug released" in first[0]
        assert "--schedule released" in first[0] and "--ssl-forward per-clip" in first[0] and "--arch" not in first[0]
        assert "--arch compact (released: r3d50)" in first[1]
        assert "--size 32 (released: 224)" in first[1] and "--epochs 1" in first[1]
    recorded = json.load(open(tmp_path / "run.json"))
    assert recorded["recipe"] == "released" and recorded["ssl_aug"] == "released"
    assert recorded["dropout"] == 0.5 and recorded["schedule"] == "released" and recorded["test_crop"] == 0.8
    assert recorded["ssl_forward"] == "per-clip" and recorded["last_batch"] == "keep"
    student = load(tmp_path / "student.pt")
    assert student["args"]["student_init"] == "both" and (tmp_path / "both.pt").exists()
    assert student["optimizer"]["param_groups"][0]["weight_decay"] == 0.0
    assert adam_steps(tmp_path / "student.pt") == 16 // 4  # the released epoch: 16 labeled videos, batches of 4
    teacher = load(tmp_path / "teacher_distinctive.pt")
    assert [g["scale"] for g in teacher["optimizer"]["param_groups"]] == [1.0, 1.0]  # backbone at the full rate
    assert student["args"]["dropout"] == 0.5 and student["args"]["student_forward"] == "separate"
    # an SSL stage at the released schedule's first epoch: 0.01 of the released rate
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert math.isclose(next(e["lr"] for e in log if e["stage"] == "invariant"), 0.01 * 5e-3, rel_tol=1e-6)
    p = train("--stage", "semisup", "--arch", "compact", "--width", "8", "--layers", "1", "1", "1", "1",
              root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "--recipe default differs from released" in last_line(p)


def test_a_flag_given_with_the_recipe_wins(toy_root, tmp_path):
    args = train_py.get_args(["--stage", "semisup", "--recipe", "released", "--dropout", "0.3", "--test-crop=0",
                              "--teacher", "class-mean", "--root", toy_root])
    assert args.dropout == 0.3 and args.test_crop == 0.0 and args.teacher == "class-mean"
    assert args.ssl_aug == "released" and args.arch == "r3d50" and args.schedule == "released"
    assert train_py.hparams(args, "invariant") == (1000, 5e-3, 40, 1e-9)
    assert train_py.hparams(args, "semisup") == (150, 1e-4, 16, 0.0)
    text = train_py.recipe_text(args)
    assert "--dropout 0.3 (released: 0.5)" in text and "--teacher class-mean (released: finetune)" in text
    default = train_py.get_args(["--stage", "semisup", "--root", toy_root])
    assert default.dropout == 0.5 and default.ssl_aug == "view" and default.test_crop == 0.8 and default.overrode == {}
    assert train_py.hparams(default, "semisup") == (25, 5e-4, 16, 1e-4)
    p = train("--stage", "invariant", "--recipe", "paper", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "argument --recipe: invalid choice: 'paper'" in p.stderr


# What a step records, as the flag and another value: a later command with the other value must stop, naming the
# flag. Written out here (not read from train.NOT_DEFINING and the lists of flags that reach only some steps), so
# that a flag left out of a step's settings fails this test.
RECORDED = {
    "invariant": [("recipe", "released"), ("width", "12"), ("layers", "1 1 2 1"), ("ssl_frames", "8"),
                  ("ssl_stride", "8"), ("size", "28"), ("balance", "authors"), ("ssl_aug", "released"),
                  ("holdout", "1"), ("fold", "2"),
                  ("tau", "0.5"), ("seed", "5"), ("schedule", "released"), ("labeled", "1"), ("test_crop", "0.5"),
                  ("arch", "r3d18"), ("ssl_forward", "per-clip"), ("last_batch", "keep")],
    "student": [("recipe", "released"), ("frames", "2"), ("stride", "3"), ("labeled", "1"), ("seed", "5"),
                ("aug", "released"), ("teacher", "finetune"), ("teacher_t", "0.5"), ("dropout", "0.1"),
                ("test_crop", "0.5"), ("student_forward", "joint"), ("epoch", "labeled"),
                ("schedule", "released"), ("width", "12"), ("size", "28"), ("w_labeled", "0"), ("mix", "fixed"),
                ("epochs", "3"), ("lr", "0.1"), ("batch_size", "2"), ("weight_decay", "0.5"), ("arch", "r3d50"),
                ("last_batch", "keep")],
}


@pytest.mark.parametrize("step, flag, value", [(k, f, v) for k, pairs in RECORDED.items() for f, v in pairs])
def test_each_step_refuses_each_flag_it_records(toy_root, tmp_path, step, flag, value):
    def run(*flags):  # what check_step reads of a run
        stage = "semisup" if step == "student" else step
        args = train_py.get_args(["--stage", stage, "--root", toy_root, "--out", str(tmp_path), *FAST, *flags])
        return argparse.Namespace(args=args, stage=stage)

    recorded = train_py.settings(run().args, step)
    assert flag in recorded, f"{step} does not record --{flag}"
    with pytest.raises(train_py.StageError, match=f"^--{flag.replace('_', '-')} .* differs from .*, recorded in "):
        train_py.check_step(run(f"--{flag.replace('_', '-')}", *value.split()), step,
                            train_py.Record(recorded, True, "x", None))


def test_a_step_trained_on_a_subset_by_flag_is_refused(toy_root, tmp_path):
    """Older versions recorded --classes, --per-class and --test-per-class (now tools/subset.py's lists): a step
    trained on such a subset is refused in one line, never reused or taken for a run of the whole dataset."""
    args = train_py.get_args(["--stage", "invariant", "--root", toy_root, "--out", str(tmp_path), *FAST])
    run = argparse.Namespace(args=args, stage="invariant")
    recorded = {**train_py.settings(args, "invariant"), "test_per_class": None}
    train_py.check_step(run, "invariant", train_py.Record(recorded, True, "x", None))  # None: the whole dataset
    for k, value in (("classes", ["A", "B"]), ("per_class", 4), ("test_per_class", 1)):
        with pytest.raises(train_py.StageError, match=rf"^x was trained on a subset \(--{k.replace('_', '-')} "):
            train_py.check_step(run, "invariant", train_py.Record({**recorded, k: value}, True, "x", None))


def test_released_test_clip_starts_by_hand():
    """--recipe released's test clips (dl_semisup_2clips.py): starts int(linspace(0, n - stride T - 10, 10)), a
    negative one replaced by the clip's number, the stride halved where T strides pass the end; by hand."""
    import data

    starts = lambda n, T, k: [c[0] for c in data.test_indices(n, T, k, 10, released=True)]  # noqa: E731
    assert starts(100, 8, 2) == [0, 8, 16, 24, 32, 41, 49, 57, 65, 74]  # linspace(0, 74, 10)
    assert starts(20, 8, 2) == [0, 0, 2, 3, 4, 5, 6, 7, 8, 9]  # linspace(0, -6, 10): -0.67 truncates to 0
    assert data.test_indices(100, 8, 2, 10, released=True)[1] == list(range(8, 24, 2))
    assert data.test_indices(12, 8, 2, 10, released=True)[9] == [9, 10, 11, 11, 11, 11, 11, 11]  # stride 1
    assert starts(100, 8, 2) != [c[0] for c in data.test_indices(100, 8, 2, 10)]  # the default spreads 0 .. n - 15


def test_released_ssl_leaves_out_short_videos(tmp_path):
    """--recipe released: an SSL video of 7/8 of the sparse span or fewer frames is left out (dl_ssl.py: 56 at
    16 x 4); an unreadable one stays, to be skipped and counted when drawn; other modes keep every video."""
    import data
    from conftest import moving_frames
    from tools import toy

    for n in (13, 14, 15, 40):
        toy.write_video(str(tmp_path / f"v{n}.avi"), moving_frames(n))
    (tmp_path / "bad.avi").write_bytes(b"not a video")
    items = [(f"v{n}.avi", 0) for n in (13, 14, 15, 40)] + [("bad.avi", 0)]
    ds = data.VideoDataset(items, str(tmp_path), "ssl", frames=4, stride=4, size=16, released=True)  # span 16: 14
    assert [p for p, _ in ds.items] == ["v15.avi", "v40.avi", "bad.avi"]
    assert len(data.VideoDataset(items, str(tmp_path), "ssl", frames=4, stride=4, size=16)) == 5
    assert len(data.VideoDataset(items, str(tmp_path), "train", frames=4, stride=4, size=16, released=True)) == 5


def test_last_batch_kept_or_dropped(toy_root, tmp_path):
    """--last-batch keep: a stage's steps are ceil(items / batch) where drop gives floor, and an SSL batch of one
    video (no negative) is left out: 40 training videos, 16 labeled (2 a class), 24 unlabeled."""
    for bs, want in ((6, 7), (13, 3)):  # 40 = 6 x 6 + 4: a partial batch of 4; 40 = 3 x 13 + 1: the one dropped
        train("--stage", "invariant", "--batch-size", str(bs), "--last-batch", "keep", root=toy_root, out=tmp_path / str(bs))
        assert adam_steps(tmp_path / str(bs) / "invariant.pt") == want
    for flag, sup, student in (("keep", 7, 5), ("drop", 6, 4)):  # 32 labeled clips (16 x 2) and 24 unlabeled, by 5
        folder = tmp_path / flag
        for stage in ("invariant", "distinctive"):
            train("--stage", stage, "--last-batch", flag, root=toy_root, out=folder)
        for stage in ("semisup", "supervised"):
            train("--stage", stage, "--batch-size", "5", "--last-batch", flag, "--teacher", "finetune",
                  root=toy_root, out=folder)
        assert adam_steps(folder / "supervised.pt") == sup and adam_steps(folder / "teacher_invariant.pt") == sup
        assert adam_steps(folder / "student.pt") == student


@pytest.mark.parametrize("arch", ["r3d18", "r3d50"])
def test_paper_scale_commands_end_to_end_small(toy_root, tmp_path, arch):
    """The README's paper-scale commands with --recipe released and the released network, small: 2 classes, 3
    videos each, 4 x 16 x 16 clips, batch 2, 1 epoch; every stage through the student (the recipe's
    'both' encoder and fine-tuned teachers included); the checkpoints are of the network asked for."""
    from tools import subset

    lists = tmp_path / "lists"  # 2 classes, 3 training videos and 1 test video of each
    subset.main(["--root", toy_root, "--lists", str(lists), "--classes", "2", "--per-class", "3",
                 "--test-per-class", "1"])
    small = ["--recipe", "released", "--arch", arch, "--dataset", "list", "--train-list", str(lists / "train.txt"),
             "--test-list", str(lists / "test.txt"), "--class-names", str(lists / "classes.txt"),
             "--ssl-frames", "4", "--frames", "4", "--size", "16", "--batch-size", "2", "--labeled", "2"]

    for stage in ("invariant", "distinctive", "semisup"):
        train("--stage", stage, *small, root=toy_root, out=tmp_path)
    for name in ("invariant", "distinctive", "both", "teacher_invariant", "teacher_distinctive", "student"):
        assert load(tmp_path / f"{name}.pt")["arch"]["name"] == arch
    assert "student" in json.load(open(tmp_path / "results.json"))
    p = train("--stage", "semisup", *small, "--arch", "compact", root=toy_root, out=tmp_path, check=False)
    assert p.returncode == 2 and "--arch compact differs from " + arch in last_line(p)


def test_released_erase_sized_by_the_videos_own_frame(tmp_path):
    """--aug released through the dataset: a 240 x 320 video decoded at short side 37 for 32-px clips still gets
    boxes of 1/6-1/3 of 240 and of 320, times 32 / 224 (by hand: heights 5-10, widths 7-14, before clipping)."""
    import data
    from conftest import moving_frames
    from tools import toy

    toy.write_video(str(tmp_path / "v.avi"), moving_frames(24, H=240, W=320))
    ds = data.VideoDataset([("v.avi", 0)], str(tmp_path), "train", 4, 2, 32, aug="released")
    rows = torch.stack([ds[(epoch, 0)][1] for epoch in range(150)])  # (150, P)
    q = dict(zip(data.PARAMS, rows.unbind(1)))
    for top, left, h, w in ((q["et"], q["el"], q["eh"], q["ew"]), (q["et2"], q["el2"], q["eh2"], q["ew2"])):
        whole = (h > 0) & (top + 10 < 32) & (left + 14 < 32)  # boxes the edge did not clip
        assert whole.sum() > 10 and ((h[whole] >= 5) & (h[whole] <= 10) & (w[whole] >= 7) & (w[whole] <= 14)).all()
    assert ds.source_size(0) == (240, 320) and ds.decode_size == 37
