"""The toy action dataset, written in UCF101's layout on the paper's premise (docs/toy.md):

    python tools/toy.py data/toy                    # the demo's set: 8 classes, 20 + 25 videos a class
    python tools/toy.py DIR --variant pulse         # other ways to repeat and to order (docs/toy.md)

`write_video` is also what the tests and the bench write their real encoded videos with.
"""
import argparse
import ctypes
import json
import math
import os
import sys

import av
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import data  # noqa: E402

# Built on the paper's premise (docs/method.md "The idea"):
#   appearance classes: a shape bobbing in place, the same cycle all video long (repetitive: every clip of
#     a video looks alike, though not pixel for pixel: the period and phase are drawn per video, so the
#     score's clips catch the cycle at different points, as in real repetitions); what tells them apart is
#     the shape, which no time of the video lacks;
#   temporal classes: two sub-actions in order, the second undoing the first (up then down, down then up,
#     grow then shrink, shrink then grow), all with a flat bar. The two classes of a pair hold the same
#     positions, sizes and directions of motion over the video: only their order tells them apart, and the
#     clips of a video differ over time.
# Never left/right: flips are augmentation. Two other variants repeat and order otherwise: "pulse" (the
# shapes pulse in size; the bar takes a two-leg path, a pair being one path and its reverse) and "blink"
# (two shapes blink, two rock; the bar appears then moves or grows, or the reverse: moves, then vanishes).
# "ordered" has no repetitive class: bob's four ordered classes and pulse's four.

TOY_VERSION = 3  # raised whenever what make_toy writes changes
TOY_CLASSES = ["Disk", "Ring", "Cross", "StripedSquare", "UpDown", "DownUp", "GrowShrink", "ShrinkGrow"]
TOY_VARIANTS = {"bob": TOY_CLASSES,  # the first four classes repeat, the last four are ordered
                "pulse": TOY_CLASSES[:4] + ["UpAcross", "AcrossDown", "DownAcross", "AcrossUp"],
                "blink": TOY_CLASSES[:4] + ["AppearRise", "FallVanish", "AppearGrow", "ShrinkVanish"],
                "ordered": TOY_CLASSES[4:] + ["UpAcross", "AcrossDown", "DownAcross", "AcrossUp"]}  # all ordered


def _render(cls, n, H, W, g, scale=1.0, variant="bob"):
    """(n, H, W, 3) uint8 frames of one toy video of class `cls` of `variant` (a key of TOY_VARIANTS); sizes
    and motions scale with H, object sizes also with `scale`."""
    if variant == "ordered":  # bob's four ordered classes, then pulse's: every class an action or its reverse
        cls, variant = (cls + 4, "bob") if cls < 4 else (cls, "pulse")
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    # No per-video fingerprint: instance discrimination would tell videos apart by it instead of by what
    # is in them. One mid-grey background for all; the object's colour is random but its brightness is
    # always the background's - 0.3 (a random brightness survives colour jitter and greyscale).
    bg = torch.full((3,), 0.5)
    sky = (0.5 - yy / (H - 1)).unsqueeze(-1) * 0.4  # (H, W, 1): light above, dark below, in every video,
    # so that where an object is shows in what surrounds it, even after spatial pooling
    tint = torch.rand(3, generator=g)
    tint = tint - tint.mean()
    fg = 0.2 + 0.2 * tint / tint.abs().max()  # channels in [0, 0.4], mean 0.2 (background 0.5)
    # the temporal classes move a flat bar, a shape no appearance class has, nor anything like one at 32 px: a
    # disk (or a square, which a 3-labeled teacher took for one) moving up would, at every instant, look like
    # a Disk-class frame, and a time-invariant representation would have to call it Disk
    shape = TOY_VARIANTS[variant][cls] if cls < 4 else "Bar"
    # no noise, static or per frame: a fixed texture lets instance discrimination fingerprint a video, and
    # fresh noise in every frame lets L_D tell time slots apart by it instead of by what happens in them
    background = (bg + sky).clamp(0, 1)  # (H, W, 3)
    frames = []
    for cx, cy, r, angle, seen in _motion(cls, variant, n, H, W, scale, g):
        dx, dy = xx - cx, yy - cy
        if angle:  # the shape turned by `angle` radians about its centre
            dx, dy = dx * math.cos(angle) + dy * math.sin(angle), dy * math.cos(angle) - dx * math.sin(angle)
        mask = _shape_mask(shape, dx, dy, r, dy + cy if angle else yy, H)
        img = background.clone()
        img[mask] = fg if seen == 1.0 else background[mask] + seen * (fg - background[mask])
        frames.append((img * 255).round().to(torch.uint8))
    return torch.stack(frames)  # (n, H, W, 3)


def _motion(cls, variant, n, H, W, scale, g):
    """Per frame of a toy video the object's centre (cx, cy), size r, angle and visibility (0-1)."""
    name = TOY_VARIANTS[variant][cls]
    cx0 = W * (0.35 + 0.3 * float(torch.rand((), generator=g)))
    cy0 = H * (0.4 + 0.2 * float(torch.rand((), generator=g)))
    phase = 6.283 * float(torch.rand((), generator=g))
    turn = 0.4 + 0.2 * float(torch.rand((), generator=g))  # when the second sub-action starts (fraction)
    # the bobbing period, 3-7 frames, not a whole number: clips a fixed number of frames apart do not see
    # the same pixels, so a high temporal similarity has to be earned by the encoders
    period = 3 + 4 * float(torch.rand((), generator=g))
    side = 1 if float(torch.rand((), generator=g)) < 0.5 else -1  # "pulse" paths: the turn left or right
    for t in range(n):
        a = t / (n - 1)  # 0 -> 1 over the video
        there = a / turn if a < turn else (1 - a) / (1 - turn)  # 0 -> 1 (first sub-action) -> 0 (second)
        r, cx, cy, angle, seen = 0.2 * H * scale, cx0, cy0, 0.0, 1.0
        cycle = math.sin(phase + 6.283 * t / period)
        if variant != "bob" and cls >= 4:  # an action (even classes) or its time reversal (odd ones)
            b = a if cls % 2 == 0 else 1 - a
            leg = b / turn if b < turn else (b - turn) / (1 - turn)  # 0 -> 1 in each of the two parts
            if variant == "pulse":  # up (or down) 0.5 H, then across 0.4 W
                down = 1 if cls >= 6 else -1
                cx = cx0 - side * 0.2 * W + (side * 0.4 * W * leg if b >= turn else 0)
                cy = cy0 - down * 0.25 * H + (down * 0.5 * H * leg if b < turn else down * 0.5 * H)
            elif b < turn:  # "blink": nothing yet, then the bar rises 0.5 H or grows 0.08 H -> 0.32 H
                seen = 0.0
            elif cls < 6:
                cy = cy0 + H * (0.25 - 0.5 * leg)
            else:
                r = H * scale * (0.08 + 0.24 * leg)
        elif variant == "pulse" and cls < 4:  # in place, the size pulsing by +- 25 %
            r = r * (1 + 0.25 * cycle)
        elif variant == "blink" and cls < 4:  # in place: disk and ring blink, cross and square rock
            seen, angle = (0.625 + 0.375 * cycle, 0.0) if cls < 2 else (1.0, 0.5 * cycle)
        elif name == "UpDown":  # rises 0.5 H, then falls back: positions cy0 +- 0.25 H, like DownUp's
            cy = cy0 + H * (0.25 - 0.5 * there)
        elif name == "DownUp":
            cy = cy0 + H * (-0.25 + 0.5 * there)
        elif name == "GrowShrink":  # radius 0.08 H -> 0.32 H -> 0.08 H, ShrinkGrow the other way
            r = H * scale * (0.08 + 0.24 * there)
        elif name == "ShrinkGrow":
            r = H * scale * (0.32 - 0.24 * there)
        else:  # appearance classes bob in place (a repetitive action), the same over the whole video
            wobble = 0.06 * H * cycle
            cy, cx = cy0 + wobble, cx0 + 0.5 * wobble
        yield cx, cy, r, angle, seen


def _shape_mask(shape, dx, dy, r, row, H):
    """(H, W) bool: the pixels of `shape` of size r at offsets (dx, dy) from its centre; `row`: each pixel's
    row in the shape's own frame (the stripes turn with the square)."""
    if shape == "Disk":
        return dx**2 + dy**2 < r**2
    if shape == "Ring":
        return (dx**2 + dy**2 < r**2) & (dx**2 + dy**2 > (0.55 * r) ** 2)
    if shape == "Cross":
        return (torch.minimum(dx.abs(), dy.abs()) < 0.3 * r) & (torch.maximum(dx.abs(), dy.abs()) < r)
    if shape == "Bar":  # 2r wide, r/2 high
        return (dx.abs() < r) & (dy.abs() < 0.25 * r)
    return (torch.maximum(dx.abs(), dy.abs()) < r * 0.9) & (row // (0.06 * H) % 2 == 0)  # stripes 6 % of H


def toy_version(root):
    """The version of the toy set in `root` (None: none there, damaged, or older than versions)."""
    try:
        with open(os.path.join(root, "toy.json")) as f:
            return json.load(f).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def write_video(path, frames, fps=25, codec=None, gop=12):
    """Encodes (n, H, W, 3) uint8 frames. .avi: MPEG-4 part 2 (UCF101's format); .mp4: H.264 (Kinetics-like)
    or the `codec` given, with 2 B-frames, so that decode order differs from display order."""
    codec = codec or ("libx264" if path.endswith(".mp4") else "mpeg4")
    n, H, W, _ = frames.shape
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = gop
        options = {"bf": "2"} if path.endswith(".mp4") else {}
        if codec == "libx264":
            options.update(preset="veryfast", crf="20", threads="1")
        else:
            stream.codec_context.bit_rate = 2_000_000
        stream.options = options
        for f in frames:
            for packet in stream.encode(video_frame(f)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_frame(img):
    """(H, W, 3) uint8 tensor -> av.VideoFrame, without NumPy (from_bytes takes RGBA)."""
    H, W, _ = img.shape
    rgba = torch.cat([img, torch.full((H, W, 1), 255, dtype=torch.uint8)], dim=-1).contiguous()  # (H, W, 4)
    return av.VideoFrame.from_bytes(ctypes.string_at(rgba.data_ptr(), rgba.numel()), W, H, format="rgba")


def make_toy(root, train_per_class=20, test_per_class=25, frames=48, size=80, seed=0, object_scale=1.0,
             variant="bob"):
    """Writes the toy action dataset, frames `size` pixels square or (H, W), in the UCF101 layout:
    root/<Class>/v_<Class>_gNN_c01.{avi,mp4}, root/classInd.txt, trainlist01.txt, testlist01.txt. Alternate
    videos are MPEG-4 part 2 in AVI (no B-frames) and in MP4 (2 B-frames). Not H.264: x264's output here
    changed from one process to the next under CPU load (measured: 111 of 160 files differed), the MPEG-4
    encoder's never did, so a toy set written anew is byte-identical and the figures reproduce. Also
    root/groups.txt: each class's kind, repetitive or ordered (`read_groups`)."""
    H, W = (size, size) if isinstance(size, int) else size
    os.makedirs(root, exist_ok=True)
    train, test = [], []
    classes = TOY_VARIANTS[variant]
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(train_per_class + test_per_class):
            rel = f"{name}/v_{name}_g{k:02d}_c01.{'mp4' if k % 2 else 'avi'}"
            # each video draws from its own generator, keyed by (seed, class, split, index in the split): a
            # test video is never a training video of a set written with other counts, and the training
            # videos of two sets with the same seed are the same
            split, j = (0, k) if k < train_per_class else (1, k - train_per_class)
            g = torch.Generator().manual_seed(((seed * 64 + c) * 2 + split) * 100_000 + j)
            video = _render(c, frames, H, W, g, object_scale, variant)
            write_video(os.path.join(root, rel), video, codec="mpeg4")
            (train if k < train_per_class else test).append(rel)
    # what made it: a default toy folder of another version is written anew
    with open(os.path.join(root, "toy.json"), "w") as f:
        json.dump(dict(version=TOY_VERSION, train_per_class=train_per_class, test_per_class=test_per_class,
                       frames=frames, size=size, seed=seed, object_scale=object_scale, variant=variant), f)
    data.write_lines(os.path.join(root, "classInd.txt"), (f"{c + 1} {name}" for c, name in enumerate(classes)))
    data.write_lines(os.path.join(root, "groups.txt"), (
        f"{name} {'repetitive' if c < 4 and variant != 'ordered' else 'ordered'}" for c, name in enumerate(classes)))
    data.write_lines(os.path.join(root, "trainlist01.txt"),
                     (f"{rel} {classes.index(rel.split('/')[0]) + 1}" for rel in train))
    data.write_lines(os.path.join(root, "testlist01.txt"), test)


def _frame_size(text):
    """--size: "80" -> 80, "96x128" -> (96, 128)."""
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 16:
        raise argparse.ArgumentTypeError(f"expected S or HxW in pixels, each >= 16, got {text!r}")
    return size[0] if len(size) == 1 else size


def read_groups(root, classes):
    """ROOT/groups.txt, lines 'ClassName group' (`make_toy` writes one: repetitive or ordered), as each class's
    group in class order; None without the file. What a group oracle needs to know of a dataset."""
    path = os.path.join(root, "groups.txt")
    if not os.path.exists(path):
        return None
    groups = {}
    for n, words in data.numbered_lines(path):
        if len(words) != 2:
            raise data.DataError(f"{path}:{n}: expected 'ClassName group', got {' '.join(words)!r}")
        groups[words[0]] = words[1]
    missing = [name for name in classes if name not in groups]
    if missing:
        raise data.DataError(f"{path}: no group for class {missing[0]}")
    return [groups[name] for name in classes]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dir", type=str, help="output folder")
    p.add_argument("--train-per-class", type=int, default=20, help="training videos per class")
    p.add_argument("--test-per-class", type=int, default=25,
                   help="test videos per class (25 x 8: one video is 0.5 points)")
    p.add_argument("--object-scale", type=float, default=1.0, help="object sizes, times the default")
    p.add_argument("--frames", type=int, default=48, help="frames per video (25 fps)")
    p.add_argument("--size", type=_frame_size, default=80,
                   help="frame size in pixels: S (square) or HxW, e.g. 96x128")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--variant", choices=sorted(TOY_VARIANTS), default="bob",
                   help="how the classes repeat and order their actions (docs/toy.md)")
    args = p.parse_args(argv)
    make_toy(args.dir, args.train_per_class, args.test_per_class, args.frames, args.size, args.seed,
             args.object_scale, args.variant)
    print(f"wrote {len(TOY_VARIANTS[args.variant])} classes to {args.dir}")


if __name__ == "__main__":
    main()
