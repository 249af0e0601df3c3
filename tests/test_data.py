import math
import os
import random

import av
import pytest
import torch
import torch.nn.functional as F

import data
from tools import toy
from conftest import write_audio_only



def sequential(path, size=None):
    """Reference: every frame of one full sequential decode, converted with PyAV."""
    with av.open(path) as c:
        frames = []
        for f in c.decode(video=0):
            H, W = size or (f.height, f.width)
            rgb = f.reformat(width=W, height=H, format="rgb24", interpolation="BILINEAR")
            plane = bytes(rgb.planes[0])
            frames.append(
                torch.frombuffer(bytearray(plane), dtype=torch.uint8)
                .view(H, rgb.planes[0].line_size)[:, : W * 3]
                .reshape(H, W, 3)
            )
    return torch.stack(frames)


@pytest.mark.parametrize("kind", ["avi", "mp4"])
def test_load_frames_equals_sequential_decode(videos, kind):
    path = videos[kind]
    ref = sequential(path)
    assert len(ref) == 60
    rng = random.Random(kind)
    for _ in range(25):
        idx = [rng.randrange(len(ref)) for _ in range(rng.randint(1, 12))]  # random order, repeats allowed
        assert torch.equal(data.load_frames(path, idx), ref[idx]), idx
    idx = [59, 0, 30, 30, 13]
    assert torch.equal(data.load_frames(path, idx), ref[idx])


def test_load_frames_resizes_during_conversion(videos):
    ref = sequential(videos["mp4"], size=(24, 40))
    idx = [3, 17, 44]
    assert torch.equal(data.load_frames(videos["mp4"], idx, size=(24, 40)), ref[idx])
    short = data.load_frames(videos["mp4"], [5], size=24)  # int: short side, aspect kept (48x64 -> 24x32)
    assert short.shape == (1, 24, 32, 3)


def test_mp4_really_has_b_frames(videos):
    with av.open(videos["mp4"]) as c:
        pts = [p.pts for p in c.demux(video=0) if p.size]
    assert pts != sorted(pts)  # decode order differs from presentation order


def test_count_frames(videos, tmp_path):
    for path in videos.values():
        assert data.count_frames(path) == len(sequential(path))
    # MPEG-TS stores no frame count at all
    ts = str(tmp_path / "clip.ts")
    toy.write_video(ts, toy._render(4, 30, 32, 32, torch.Generator().manual_seed(0)), codec="mpeg4")
    with av.open(ts) as c:
        assert c.streams.video[0].frames == 0
    assert data.count_frames(ts) == 30 == len(sequential(ts))


def test_bad_files_raise_video_error(videos, tmp_path):
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    text = tmp_path / "text.avi"
    text.write_text("this is not a video\n" * 20)
    audio = str(tmp_path / "audio.wav")
    write_audio_only(audio)
    for bad in (str(empty), str(text), audio, str(tmp_path / "missing.avi")):
        with pytest.raises(data.VideoError, match=os.path.basename(bad)):
            data.load_frames(bad, [0])
        with pytest.raises(data.VideoError):
            data.count_frames(bad)


def test_truncated_avi_gives_the_frames_it_has(videos, tmp_path):
    raw = open(videos["avi"], "rb").read()
    cut = tmp_path / "half.avi"
    cut.write_bytes(raw[: len(raw) // 2])
    n = data.count_frames(str(cut))
    assert 0 < n < 60
    ref = sequential(videos["avi"])
    got = data.load_frames(str(cut), [0, n // 2])
    assert torch.equal(got, ref[[0, n // 2]])
    past = data.load_frames(str(cut), [59])  # past the end: the last decodable frame, no crash
    assert torch.equal(past[0], sequential(str(cut))[-1])


def test_samplers():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = data.train_indices(100, 8, 2, g)
        assert [b - a for a, b in zip(idx, idx[1:])] == [2] * 7 and 0 <= idx[0] and idx[-1] < 100
    sparse, dense = data.ssl_indices(100, 16, 4, g)  # paper: 16 frames at stride 4, span 64
    assert [b - a for a, b in zip(sparse, sparse[1:])] == [4] * 15
    for j, clip in enumerate(dense):  # dense clip j = 16 consecutive frames from sparse frame 4j
        assert clip == list(range(sparse[4 * j], sparse[4 * j] + 16))
    sparse, dense = data.ssl_indices(100, 8, 4, g)  # CPU default: 8 frames, dense at stride 1
    assert sum(dense, []) == list(range(sparse[0], sparse[0] + 32))
    clips = data.test_indices(100, 8, 2, K=10)
    assert clips[0][0] == 0 and clips[-1][-1] == 99 and len(clips) == 10
    starts = [c[0] for c in clips]
    assert (
        max(b - a for a, b in zip(starts, starts[1:])) - min(b - a for a, b in zip(starts, starts[1:])) <= 1
    )
    quarters = data.score_indices(40, 8)
    assert [c[0] for c in quarters] == [0, 10, 20, 30] and quarters[-1][-1] < 40
    assert all(max(a) < min(b) for a, b in zip(quarters, quarters[1:]))  # consecutive, no overlap
    # a video shorter than a clip: stride lowered first, then the last frame repeated
    assert data.clip_indices(10, 8, 2, 0) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert data.clip_indices(5, 8, 2, 0) == [0, 1, 2, 3, 4, 4, 4, 4]
    s, d = data.ssl_indices(12, 8, 4, g)
    assert max(s + sum(d, [])) < 12


def test_augment_shares_parameters_across_frames():
    frame = (torch.rand(1, 40, 50, 3) * 255).to(torch.uint8)
    clip = frame.expand(8, -1, -1, -1)  # 8 identical frames
    for seed in range(10):
        x, p = data.augment(clip, 32, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 8, 32, 32) and x.dtype == torch.uint8 and p.shape == (len(data.PARAMS),)
        y = data.augment_on_device(x[None], p[None])[0]
        assert torch.equal(y, y[:, :1].expand_as(y))  # still identical after augmentation
    a = data.augment(clip, 32, torch.Generator().manual_seed(1))
    b = data.augment(clip, 32, torch.Generator().manual_seed(2))
    assert not torch.equal(a[0], b[0])


def _one_by_one_colour(x, b, c, s, theta, grey):
    """Reference colour jitter on one clip (T, 3, H, W) float in [0, 1]: each op in turn, torchvision's
    order (brightness, contrast about the clip's mean grey, saturation, hue), then greyscale."""
    luma = lambda v: torch.einsum("c,tchw->thw", data.GREY.to(v.dtype), v)[:, None]  # noqa: E731
    m = float(luma(x).mean())
    x = x * b  # brightness
    x = (x - b * m) * c + b * m  # contrast about the clip's mean grey
    x = (x - luma(x)) * s + luma(x)  # saturation
    u = torch.ones(3, dtype=x.dtype) / 3**0.5  # hue: rotation about the grey axis, Rodrigues' formula
    ux = torch.tensor([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]], dtype=x.dtype)
    R = (
        math.cos(theta) * torch.eye(3, dtype=x.dtype)
        + (1 - math.cos(theta)) * torch.outer(u, u)
        + math.sin(theta) * ux
    )
    x = torch.einsum("ij,tjhw->tihw", R, x)
    return luma(x).expand_as(x) if grey else x


# The released loaders' numbers, read off dataloaders/dl_semisup_2clips.py (classifiers) and dl_ssl.py (SSL):
# (rate, low, high) of contrast, hue (in turns), saturation, brightness; greyscale and channel-drop rates; gamma's
# rate among greyscale clips and its range; each erase's rate; the crop's least side fraction
RELEASED_NUMBERS = {
    "released": dict(contrast=(0.125, 0.9, 1.1), hue=(0.15, -0.05, 0.05), saturation=(0.15, 0.9, 1.1),
                     brightness=(0.15, 0.9, 1.1), grey=0.1, drop=0.0, gamma=(0.75, 0.85, 1.15), erase=(0.4, 0.4),
                     crop=0.4),
    "ssl-released": dict(contrast=(0.25, 0.75, 1.25), hue=(0.3, -0.1, 0.1), saturation=(0.3, 0.75, 1.25),
                         brightness=(0.3, 0.75, 1.25), grey=0.175, drop=0.125, gamma=(0.75, 0.75, 1.25),
                         erase=(0.7, 0.0), crop=0.5),
}


def old_augment(clip, size, g, recipe="ssl"):
    """The augmentation as a float function per clip (as it was before the uint8 / device split), with the
    colour ops one by one: the reference that the split path must reproduce, for each recipe."""
    T, H, W, _ = clip.shape
    if recipe in RELEASED_NUMBERS:  # a side factor, the aspect kept
        f = data._uniform(g, RELEASED_NUMBERS[recipe]["crop"], 1.0)
        h, w = max(1, round(f * H)), max(1, round(f * W))
    else:
        for _ in range(10):
            target = H * W * data._uniform(g, 0.3 if recipe == "ssl" else 0.5, 1.0)
            ratio = math.exp(data._uniform(g, math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= W and 0 < h <= H:
                break
        else:
            h = w = min(H, W)
    top, left = int(data._uniform(g) * (H - h + 1)), int(data._uniform(g) * (W - w + 1))
    x = clip[:, top : top + h, left : left + w].permute(0, 3, 1, 2).double()  # (T, 3, h, w)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) / 255
    if data._uniform(g) < 0.5:
        x = x.flip(-1)
    b, c, s, theta, grey, gamma, boxes, drop = 1, 1, 1, 0, False, 1, [], 0
    if recipe == "ssl":
        if data._uniform(g) < 0.8:
            b, c, s = data._uniform(g, 0.8, 1.2), data._uniform(g, 0.8, 1.2), data._uniform(g, 0.8, 1.2)
            theta = data._uniform(g, -math.pi, math.pi)
        grey, boxes = data._uniform(g) < 0.2, [(0.5, 0.1, 0.4)]
    elif recipe in RELEASED_NUMBERS:
        r = RELEASED_NUMBERS[recipe]
        maybe = lambda p, lo, hi: data._uniform(g, lo, hi) if data._uniform(g) < p else 1  # noqa: E731
        c = maybe(*r["contrast"])
        theta = 2 * math.pi * data._uniform(g, *r["hue"][1:]) if data._uniform(g) < r["hue"][0] else 0
        s, b = maybe(*r["saturation"]), maybe(*r["brightness"])
        u = data._uniform(g)
        grey = u < r["grey"]
        gamma = maybe(*r["gamma"]) if grey else 1
        drop = 1 + int(data._uniform(g) * 3) if r["grey"] <= u < r["grey"] + r["drop"] else 0
        boxes = [(p, 1 / 6, 1 / 3) for p in r["erase"] if p]
    x = _one_by_one_colour(x, b, c, s, theta, grey).clamp(0, 1) ** gamma
    if drop:
        x[:, drop - 1] = 0
    x = (x.permute(1, 0, 2, 3) - data.MEAN.double()) / data.STD.double()  # (3, T, S, S)
    randint = lambda lo, hi: lo + int(data._uniform(g) * max(0, hi - lo))  # noqa: E731  numpy's [lo, hi)
    for p, lo, hi in boxes:
        if data._uniform(g) >= p:
            continue
        if recipe in RELEASED_NUMBERS:  # dl_ssl.py, dl_semisup_2clips.py: erase(v=0)
            eh = randint(int(H / 6 * size / 224), int(H / 3 * size / 224))  # of the frame's height, times size/224
            ew = randint(int(W / 6 * size / 224), int(W / 3 * size / 224))
            et, el = randint(0, size), randint(0, size)
            x[:, :, et : et + eh, el : el + ew] = (-data.MEAN.double() / data.STD.double()).view(3, 1, 1, 1)  # black
        else:
            eh, ew = int(size * data._uniform(g, lo, hi)), int(size * data._uniform(g, lo, hi))
            et, el = int(data._uniform(g) * (size - eh)), int(data._uniform(g) * (size - ew))
            x[:, :, et : et + eh, el : el + ew] = 0.0
    return x.float()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_split_augmentation_equals_the_old_path(device):
    """uint8 crop / resize / flip in the worker + `augment_on_device` on the batch == the float path one clip at a time,
    for the same drawn parameters (same seeds), every recipe: within 2 levels of 255 after normalisation (the
    uint8 resize rounds; colour maps and gamma stretch that by at most ~1.5)."""
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(8, 60, 80, 3, generator=g) * 255).to(torch.uint8)
    clips, params, refs = [], [], []
    for seed in range(80):
        recipe = ("ssl", "light", "released", "ssl-released")[seed % 4]
        x, p = data.augment(video, 28, torch.Generator().manual_seed(seed), recipe)
        clips.append(x), params.append(p)
        refs.append(old_augment(video, 28, torch.Generator().manual_seed(seed), recipe))
    got = data.augment_on_device(torch.stack(clips).to(device), torch.stack(params).to(device)).cpu()  # one batch
    want = torch.stack(refs)
    assert (got - want).abs().max() < 2 * 1.5 / 255 / 0.225
    drawn = torch.stack(params)
    assert (drawn[:, 4] == 1).any() and (drawn[:, 8] > 0).any() and (drawn[:, 0] != 1).any()  # grey, erase, jitter
    assert (drawn[:, 10] != 1).any() and (drawn[:, 13] > 0).any()  # gamma, a second box
    ssl = torch.arange(80) % 4 == 0  # boxes of the mean grey: 0 after normalisation
    erased = (got[ssl] == 0).flatten(1).float().mean(1) > 0.004
    assert erased.sum() == ((drawn[ssl, 8] > 0) | (drawn[ssl, 13] > 0)).sum()
    boxed = (drawn[:, 8] > 0) | (drawn[:, 13] > 0)  # the released recipes' boxes are black, the others mean grey
    assert ((drawn[:, 16] == 0) == (boxed & ~ssl & (torch.arange(80) % 4 != 1))).all()


@pytest.mark.parametrize("recipe", sorted(RELEASED_NUMBERS))
def test_released_recipe_ranges_and_rates(recipe):
    """The released recipes: each parameter within its range, drawn at its rate (within 4 binomial standard
    deviations over 4,000 clips), one draw for the whole clip (the crop itself: against the float path)."""
    want = RELEASED_NUMBERS[recipe]
    frame = torch.arange(240 * 320 * 3).remainder(251).to(torch.uint8).view(1, 240, 320, 3)  # UCF101's frames
    clip = frame.expand(4, -1, -1, -1)  # 4 identical frames: any per-frame draw would tell them apart
    n, S = 4000, 24
    rows = []
    for seed in range(n):
        x, p = data.augment(clip, S, torch.Generator().manual_seed(seed), recipe)
        if seed < 50:
            y = data.augment_on_device(x[None], p[None])[0]
            assert torch.equal(y, y[:, :1].expand_as(y))
        rows.append(p)
    b, c, s, theta, grey, m, et, el, eh, ew, gamma, et2, el2, eh2, ew2, drop, fill = torch.stack(rows).double().unbind(1)

    def rate(changed, p, lo, hi, value, among=n):
        assert abs(changed.double().mean() - p) <= 4 * math.sqrt(p * (1 - p) / among)
        assert ((value[changed] >= lo) & (value[changed] <= hi)).all()

    rate(c != 1, *want["contrast"], c)
    hue_p, lo, hi = want["hue"]
    rate(theta != 0, hue_p, 2 * math.pi * lo, 2 * math.pi * hi, theta)
    rate(s != 1, *want["saturation"], s)
    rate(b != 1, *want["brightness"], b)
    rate(grey == 1, want["grey"], 1, 1, grey)
    rate(drop > 0, want["drop"], 1, 3, drop)
    assert not ((drop > 0) & (grey == 1)).any()  # one draw decides between them
    if want["drop"]:  # each channel about as often
        counts = torch.bincount(drop[drop > 0].long(), minlength=4)[1:].double()
        assert (counts - counts.mean()).abs().max() < 4 * math.sqrt(counts.mean())
    assert ((gamma != 1) <= (grey == 1)).all()  # gamma only on greyscale clips
    rate(gamma[grey == 1] != 1, *want["gamma"], gamma[grey == 1], among=int((grey == 1).sum()))
    for (top, left, h, w), p in zip(((et, el, eh, ew), (et2, el2, eh2, ew2)), want["erase"]):
        # sides 1/6-1/3 of the 240x320 frame's times S / 224 (clipped at the edge), the corner anywhere, black
        side = lambda n, lo: int(n * lo * S / 224)  # noqa: E731
        rate(h > 0, p, 1, side(240, 1 / 3) - 1, h)
        assert ((w[h > 0] >= 1) & (w[h > 0] <= side(320, 1 / 3) - 1)).all()
        full = (top + side(240, 1 / 3) < S) & (left + side(320, 1 / 3) < S) & (h > 0)  # not clipped
        assert ((h[full] >= side(240, 1 / 6)) & (w[full] >= side(320, 1 / 6))).all()
        assert ((top + h <= S) & (left + w <= S)).all() and (fill[h > 0] == 0).all()
        assert p == 0 or top[h > 0].max() >= S - 3
    # the crop: a side fraction f in [crop, 1] of both sides, read back from a frame whose pixels count columns
    cols = torch.arange(60).view(1, 1, 60, 1).expand(4, 40, 60, 3).to(torch.uint8)
    spans = []
    for seed in range(300):
        x, _ = data.augment(cols, 60, torch.Generator().manual_seed(seed), recipe)  # (3, 4, 60, 60)
        spans.append(float(x[0, 0, 0].max() - x[0, 0, 0].min() + 1) / 60)  # about the side fraction
    assert min(spans) >= want["crop"] - 0.05 and max(spans) > 0.95 and min(spans) < want["crop"] + 0.1


def test_a_dropped_channel_is_black():
    """`augment_on_device` with a channel dropped: that channel 0 before normalisation, the others as without."""
    x = (torch.rand(1, 3, 2, 8, 8) * 255).to(torch.uint8)
    keep = torch.tensor([data.IDENTITY])
    for k in (1, 2, 3):
        p = keep.clone()
        p[0, data.PARAMS.index("drop")] = k
        y, ref = data.augment_on_device(x, p)[0], data.augment_on_device(x, keep)[0]
        black = (0 - data.MEAN[k - 1]) / data.STD[k - 1]
        assert torch.allclose(y[k - 1], black.expand_as(y[k - 1]))
        others = [c for c in range(3) if c != k - 1]
        assert torch.equal(y[others], ref[others])


def test_center_crop_of_a_fraction_of_each_side():
    """The released test crop: the central 0.8 of each side, squeezed into the square (a 40x50 frame whose
    central 32x40 is white and border black comes out white everywhere)."""
    clip = torch.zeros(2, 40, 50, 3, dtype=torch.uint8)
    clip[:, 4:36, 5:45] = 255
    x = data.center_crop(clip, 16, 0.8)
    assert x.shape == (3, 2, 16, 16) and (x == 255).all()
    assert (data.center_crop(clip, 16) < 255).any()  # the short side's square reaches the black border


def test_center_crop_against_hand():
    clip = torch.zeros(2, 4, 6, 3, dtype=torch.uint8)
    clip[:, :, 1:5] = 255  # the central 4x4 square is white
    x = data.center_crop(clip, 4)
    assert x.dtype == torch.uint8 and torch.equal(x, torch.full((3, 2, 4, 4), 255, dtype=torch.uint8))
    y = data.augment_on_device(x[None], torch.tensor([data.IDENTITY]))[0]
    white = (1 - data.MEAN.flatten()) / data.STD.flatten()
    assert torch.allclose(y, white.view(3, 1, 1, 1).expand(3, 2, 4, 4))


def write_ucf_like(root, classes, per_class=2):
    os.makedirs(root / "splits", exist_ok=True)
    (root / "splits" / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    train, test = [], []
    for i, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for k in range(per_class):
            train.append(f"{c}/v_{c}_g{k:02d}_c01.avi {i + 1}\n")
        test.append(f"{c}/v_{c}_g99_c01.avi\n")
    (root / "splits" / "trainlist01.txt").write_text("".join(train))
    (root / "splits" / "testlist01.txt").write_text("".join(test))


def test_ucf101_labels_come_from_classind(tmp_path):
    classes = [
        "Hammering", "HammerThrow", "JumpingJack", "JumpRope",
    ]  # UCF101's classInd order (36-37, 47-48)
    assert sorted(classes) != classes
    write_ucf_like(tmp_path, classes)
    train, test, names = data.read_ucf101(str(tmp_path), str(tmp_path / "splits"), 1)
    assert names == classes
    assert ("HammerThrow/v_HammerThrow_g01_c01.avi", 1) in train and (
        "JumpingJack/v_JumpingJack_g99_c01.avi", 2,
    ) in test


def test_split_errors_name_the_path(tmp_path):
    write_ucf_like(tmp_path, ["A", "B"])
    with pytest.raises(data.DataError, match="nope"):
        data.read_ucf101(str(tmp_path / "nope"), str(tmp_path / "splits"), 1)
    with pytest.raises(data.DataError, match="trainlist02.txt"):
        data.read_ucf101(str(tmp_path), str(tmp_path / "splits"), 2)
    os.rmdir(tmp_path / "B")
    with pytest.raises(data.DataError, match="class folder not found: .*B"):
        data.read_ucf101(str(tmp_path), str(tmp_path / "splits"), 1)


def test_hmdb51_flags(tmp_path):
    splits = tmp_path / "splits"
    os.makedirs(splits)
    for c in ("brush_hair", "cartwheel"):
        os.makedirs(tmp_path / c)
        (splits / f"{c}_test_split1.txt").write_text(f"{c}_a.avi 1 \n{c}_b.avi 2 \n{c}_c.avi 0 \n")
    train, test, classes = data.read_hmdb51(str(tmp_path), str(splits), 1)
    assert classes == ["brush_hair", "cartwheel"]
    assert train == [("brush_hair/brush_hair_a.avi", 0), ("cartwheel/cartwheel_a.avi", 1)]
    assert test == [("brush_hair/brush_hair_b.avi", 0), ("cartwheel/cartwheel_b.avi", 1)]
    train, _, _ = data.read_hmdb51(str(tmp_path), str(splits), 1, use_unused=True)
    assert ("cartwheel/cartwheel_c.avi", 1) in train and len(train) == 4
    (splits / "cartwheel_test_split1.txt").write_text("cartwheel_a.avi 1\ncartwheel b.avi 2\n")
    with pytest.raises(data.DataError, match=r"cartwheel_test_split1.txt:2: expected 'video flag', got"):
        data.read_hmdb51(str(tmp_path), str(splits), 1)


def test_list_format(tmp_path):
    (tmp_path / "train.txt").write_text("a/x.mp4 0\nb/y.mp4 2\n")
    (tmp_path / "test.txt").write_text("a/z.mp4 1\n")
    train, test, classes = data.read_list(
        str(tmp_path), str(tmp_path / "train.txt"), str(tmp_path / "test.txt")
    )
    assert train == [("a/x.mp4", 0), ("b/y.mp4", 2)] and test == [("a/z.mp4", 1)] and len(classes) == 3


def test_split_labeled():
    items = [(f"c{c}/v{k}.avi", c) for c in range(3) for k in range(10)]
    classes = ["a", "b", "c"]
    lab, unlab = data.split_labeled(items, 3, seed=0, classes=classes)
    assert sorted(lab + unlab) == sorted(items)
    assert [sum(1 for _, c in lab if c == k) for k in range(3)] == [3, 3, 3]
    assert data.split_labeled(items, 3, 0, classes) == (lab, unlab)  # same seed, same split
    assert data.split_labeled(items, 3, 1, classes)[0] != lab
    frac, _ = data.split_labeled(items, 0.2, 0, classes)
    assert len(frac) == 6
    assert len(data.split_labeled(items, 0.01, 0, classes)[0]) == 3  # at least one per class
    with pytest.raises(data.DataError, match="--labeled must be > 0"):
        data.split_labeled(items, 0, 0, classes)
    with pytest.raises(data.DataError, match="only 10"):
        data.split_labeled(items, 11, 0, classes)


def test_ssl_released_draws_each_clip_apart(toy_root):
    """--ssl-aug released: each of an item's 10 clips its own draw (dl_ssl.py draws one row a clip), against a
    by-hand build from the decoded frames: the clip set's indices, then `augment` of each clip's frames in the
    order of SSL_CLIPS, from the item's generator."""
    train, _, _ = data.read_ucf101(toy_root, toy_root, 1)
    ds = data.VideoDataset(train[:2], toy_root, "ssl", 8, 4, 32, seed=3, ssl_aug="released")
    x, p, *_ = ds[(2, 1)]
    g = torch.Generator().manual_seed((3 * 1_000_003 + 2) * 1_000_003 + 1)  # (seed, epoch, index)
    n = data.count_frames(os.path.join(toy_root, train[1][0]))
    sparse, dense = data.ssl_indices(n, 8, 4, g)
    clips = [data.load_frames(os.path.join(toy_root, train[1][0]), idx, ds.decode_size) for idx in [sparse] + dense]
    with av.open(os.path.join(toy_root, train[1][0])) as c:  # the video's own frame: the erase's boxes scale by it
        source = c.streams.video[0].height, c.streams.video[0].width
    want = [data.augment(clips[c], 32, g, "ssl-released", source) for c in (0, 0, 1, 2, 3, 4, 1, 2, 3, 4)]
    assert torch.equal(x, torch.stack([w[0] for w in want])) and torch.equal(p, torch.stack([w[1] for w in want]))
    rows = {tuple(r.tolist()) for r in p}
    assert len(rows) == 10  # no two clips share a draw (with "view", two rows: one a view)
    assert len({tuple(r.tolist()) for r in data.VideoDataset(train[:2], toy_root, "ssl", 8, 4, 32)[1][1]}) == 2


def test_dataset_modes_and_bad_videos(toy_root, tmp_path, capsys):
    train, test, classes = data.read_ucf101(toy_root, toy_root, 1)
    assert len(classes) == 8 and len(train) == 40 and len(test) == 16
    exts = {os.path.splitext(p)[1] for p, _ in train}
    assert exts == {".avi", ".mp4"}
    shapes = {
        "train": (3, 8, 32, 32), "ssl": (10, 3, 8, 32, 32), "test": (3, 3, 8, 32, 32),
        "score": (4, 3, 8, 32, 32),
    }
    for mode, shape in shapes.items():
        ds = data.VideoDataset(train[:3], toy_root, mode, 8, 4 if mode == "ssl" else 2, 32, test_clips=3)
        x, p, y, i, bad = ds[1]
        assert x.shape == shape and x.dtype == torch.uint8 and p.shape == (*shape[:-4], len(data.PARAMS))
        assert y == train[1][1] and i == 1 and bad == []
        assert torch.equal(ds[1][0], x) and torch.equal(ds[(0, 1)][0], x)  # seeded by (seed, epoch, index)
        if mode in ("train", "ssl"):
            assert not torch.equal(ds[(1, 1)][0], x)
        if mode == "ssl":  # one parameter row per view: sparse A, sparse B, dense A x 4, dense B x 4
            assert all(torch.equal(p[k], p[0]) for k in (2, 3, 4, 5)) and all(
                torch.equal(p[k], p[1]) for k in (6, 7, 8, 9)
            )
    # a bad file in training is replaced by another video and reported; at test it comes back marked
    (tmp_path / "Bad").mkdir()
    (tmp_path / "Bad" / "zero.avi").write_bytes(b"")
    items = [("Bad/zero.avi", 0)] + [
        (os.path.relpath(os.path.join(toy_root, p), tmp_path), c) for p, c in train[:2]
    ]
    ds = data.VideoDataset(items, str(tmp_path), "train", 8, 2, 32)
    x, p, y, i, bad = ds[0]
    assert x.shape == (3, 8, 32, 32) and i in (1, 2) and bad[0][0] == 0 and "zero.avi" in bad[0][1]
    x, p, y, i, bad = data.VideoDataset(items, str(tmp_path), "test", 8, 2, 32, test_clips=2)[0]
    assert i == 0 and bad and not x.any()
    counter = data.BadVideos()
    counter.add(bad)
    counter.add(bad)  # warned and counted once
    assert len(counter) == 1 and capsys.readouterr().err.count("zero.avi") == 1
    all_bad = data.VideoDataset([("Bad/zero.avi", 0)], str(tmp_path), "train", 8, 2, 32)
    with pytest.raises(data.VideoError, match="in a row"):
        all_bad[0]


def test_colour_matrix_equals_the_ops_one_by_one():
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    m = float(torch.einsum("c,tchw->", data.GREY.double(), x)) / x[:, 0].numel()
    params = [(1.3, 0.7, 1.2, 2.0), (0.9, 1.1, 0.8, -2.5), (1.0, 1.0, 1.0, 0.0)]
    for to_grey in (False, True):
        A, o = data.colour_matrix(
            *(torch.tensor(v, dtype=torch.float64) for v in zip(*params)),
            torch.tensor([float(to_grey)] * 3, dtype=torch.float64),
            torch.full((3,), m, dtype=torch.float64),
        )
        for k, (b, c, s, theta) in enumerate(params):  # one matrix per clip of the batch
            got = torch.einsum("ij,tjhw->tihw", A[k], x) + o[k]
            assert torch.allclose(got, _one_by_one_colour(x, b, c, s, theta, to_grey), atol=1e-6)


def test_epoch_sampler_against_a_naive_shuffle():
    s = data.EpochSampler(10, seed=3, shuffle=True, rank=1, world=3)
    for epoch in (0, 5):
        s.set_epoch(epoch)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003 + epoch)).tolist()
        assert list(s) == [(epoch, i) for i in perm[:9][1::3]] and len(s) == 3
    shards = []
    for rank in range(3):
        r = data.EpochSampler(10, seed=3, rank=rank, world=3)
        r.set_epoch(5)
        shards += [i for _, i in r]
    assert len(shards) == 9 == len(set(shards))  # disjoint, one dropped so that every rank has 3
    assert list(data.EpochSampler(4, 0, shuffle=False)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    # a sampler of `length` items per rank draws the first items of the same permutation
    for rank in range(3):
        full, short = data.EpochSampler(10, 3, rank=rank, world=3), data.EpochSampler(
            10, 3, rank=rank, world=3, length=2
        )
        full.set_epoch(5)
        short.set_epoch(5)
        assert len(short) == 2 and list(short) == list(full)[:2]


def _collate_in_worker(batch):
    """data.collate, reporting whether it stacked the batch into shared memory where it ran."""
    out = data.collate(batch)
    return out, out[0].is_shared() and out[1].is_shared()


def test_collate_stacks_into_shared_memory_in_workers(toy_root):
    train, _, _ = data.read_ucf101(toy_root, toy_root, 1)
    ds = data.VideoDataset(train[:4], toy_root, "train", 4, 2, 32)
    for workers, shared in ((0, False), (1, True)):
        loader = torch.utils.data.DataLoader(ds, 2, num_workers=workers, collate_fn=_collate_in_worker)
        for k, ((clips, params, y, idx, bad), in_shm) in enumerate(loader):
            assert in_shm == shared
            want = [ds[i] for i in (2 * k, 2 * k + 1)]  # against a plain stack of the items
            assert torch.equal(clips, torch.stack([w[0] for w in want])) and torch.equal(
                params, torch.stack([w[1] for w in want])
            )


def test_persistent_workers_give_the_items_of_each_epoch(toy_root):
    """Workers that persist across epochs still draw every item by (seed, epoch, index): a 2-worker loader
    over two epochs equals the items computed one by one in this process."""
    train, _, _ = data.read_ucf101(toy_root, toy_root, 1)
    ds = data.VideoDataset(train[:6], toy_root, "train", 4, 2, 32)
    sampler = data.EpochSampler(len(ds), seed=0)
    loader = torch.utils.data.DataLoader(
        ds, 3, sampler=sampler, num_workers=2, collate_fn=data.collate, persistent_workers=True
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        for k, (clips, params, y, idx, bad) in enumerate(loader):
            want = [ds[key] for key in keys[3 * k : 3 * k + 3]]
            assert torch.equal(clips, torch.stack([w[0] for w in want])) and torch.equal(
                params, torch.stack([w[1] for w in want])
            )
            assert idx.tolist() == [key[1] for key in keys[3 * k : 3 * k + 3]]
    assert not torch.equal(ds[(0, 0)][0], ds[(1, 0)][0])


def test_kept_videos_give_what_decoding_gives(videos, toy_root, tmp_path):
    """A video kept in memory (`keep_decoded`) gives the frames `load_frames` decodes, B-frames, a truncated
    file and indices past the end included; a dataset gives the same clips and parameters with its videos
    kept or not, in every mode; the keeping stops for good at the first video past the budget."""
    raw = open(videos["avi"], "rb").read()
    cut = tmp_path / "half.avi"
    cut.write_bytes(raw[: len(raw) // 2])
    for path in (videos["avi"], videos["mp4"], str(cut)):
        n = data.count_frames(path)
        assert data.keep_decoded([path], 40, 10**9) > 0
        kept = data._KEPT[(path, 40)]
        indices = [0, 5, 13, n // 2, n - 1, n + 3, 2]
        assert kept[0] == n and torch.equal(kept[1][[min(k, len(kept[1]) - 1) for k in indices]],
                                            data.load_frames(path, indices, 40))
    train = data.read_ucf101(toy_root, toy_root, 1)[0][:6]
    for mode in ("train", "ssl", "test", "score"):
        ds = data.VideoDataset(train, toy_root, mode, 4, 2, 32, test_clips=3, seed=1)
        before = [ds[(1, i)][:2] for i in range(len(train))]
        data.keep_decoded([ds.path(i) for i in range(len(train))], ds.decode_size, 10**9)
        fresh = data.VideoDataset(train, toy_root, mode, 4, 2, 32, test_clips=3, seed=1)
        for i, (x, p) in enumerate(before):
            y, q = fresh[(1, i)][:2]
            assert torch.equal(x, y) and torch.equal(p, q), (mode, i)
    data._KEPT.clear()
    one = data.count_frames(videos["avi"]) * 30 * 40 * 3  # the avi's bytes at short side 30 (48x64 -> 30x40)
    assert data.keep_decoded([videos["avi"], videos["mp4"]], 30, one + 1) == one and 1 + one in data._FULL
    assert data.keep_decoded([str(cut)], 30, one + 1) == one  # nothing more once the budget was reached
    data._KEPT.clear()
