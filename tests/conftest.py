"""Real encoded videos for the tests, written with PyAV by the toy tool's encoder."""

import os
import re
import sys
import warnings

import pytest

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's, as in train.py
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tools import toy  # noqa: E402

torch.set_num_threads(1)


def numbers_in_line(text, start):
    """The numbers of the first line of `text` that contains `start`, after it, parsed: a test compares a
    printed figure with a tolerance, never by its digits (a value on a rounding boundary prints either way
    on another CPU)."""
    line = next(line for line in text.splitlines() if start in line)
    return [float(v) for v in re.findall(r"[-+]?\d+(?:\.\d+)?", line.split(start, 1)[1])]


def moving_frames(n, H=48, W=64, seed=0):
    """(n, H, W, 3) uint8: noise plus a bar whose position encodes the frame number, so every frame
    differs from every other."""
    g = torch.Generator().manual_seed(seed)
    frames = (torch.rand(n, H, W, 3, generator=g) * 60).to(torch.uint8)
    for t in range(n):
        x = (t * 5) % (W - 6)
        frames[t, :, x : x + 6] = 230
        frames[t, (t * 3) % (H - 4) : (t * 3) % (H - 4) + 4, :, 1] = 200
    return frames


def write_audio_only(path):
    """A real .wav with one audio stream and no video stream."""
    import av

    with av.open(path, "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame(format="s16", layout="mono", samples=800)
        frame.planes[0].update(bytes(1600))
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """An MPEG-4 AVI (UCF101's format, keyframe every 12 frames) and an H.264 MP4 with B-frames."""
    d = tmp_path_factory.mktemp("videos")
    out = {}
    for name in ("clip.avi", "clip.mp4"):
        path = str(d / name)
        toy.write_video(path, moving_frames(60, seed=len(name)), gop=12)
        out[name.split(".")[1]] = path
    return out


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy action set: 8 classes x (5 train + 2 test) videos of 40 frames at 64 px."""
    root = str(tmp_path_factory.mktemp("toy"))
    toy.make_toy(root, train_per_class=5, test_per_class=2, frames=40, size=64, seed=1)
    return root


UCF_CLASSES = [
    "ApplyEyeMakeup", "Basketball", "Archery", "BoxingPunchingBag", "Drumming", "Bowling",
]  # classInd order


@pytest.fixture(scope="session")
def ucf_root(tmp_path_factory):
    """A tree in UCF101's layout and split-file format: classInd.txt ('index Name', not in alphabetical
    order), trainlist01.txt ('Class/v_Class_gNN_cMM.avi index'), testlist01.txt (the path alone), all with
    CRLF line ends; 6 classes x (5 train + 2 test) MPEG-4 AVIs at 320x240, 20 frames, drawn like the toy set.
    """
    root = tmp_path_factory.mktemp("UCF-101")
    train, test = [], []
    for c, name in enumerate(UCF_CLASSES):
        os.makedirs(root / name)
        for k in range(7):
            rel = f"{name}/v_{name}_g{k + 1:02d}_c01.avi"
            frames = toy._render(
                c % len(toy.TOY_CLASSES), 20, 240, 320, torch.Generator().manual_seed(10 * c + k)
            )
            toy.write_video(str(root / rel), frames)
            (train if k < 5 else test).append(rel)
    (root / "classInd.txt").write_bytes(
        "".join(f"{c + 1} {n}\r\n" for c, n in enumerate(UCF_CLASSES)).encode()
    )
    (root / "trainlist01.txt").write_bytes(
        "".join(f"{r} {UCF_CLASSES.index(r.split('/')[0]) + 1}\r\n" for r in train).encode()
    )
    (root / "testlist01.txt").write_bytes("".join(f"{r}\r\n" for r in test).encode())
    return str(root)
