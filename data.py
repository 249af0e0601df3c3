"""TimeBalance's clips: the clip samplers (`*_indices`, docs/method.md "Clips"), the frames asked for, decoded from
real video files (`load_frames`), one random augmentation a clip in two halves (`augment`: uint8, in the loader;
`augment_on_device`: float, on the device), the split formats and the labeled subset, and `VideoDataset`, what
each training stage iterates over. Runtime imports: standard library, torch, av."""
import itertools
import math
import os
import random
import sys
import warnings

import av
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="The given buffer is not writable")  # see _to_tensor


class VideoError(Exception):
    """A video file that cannot be read: it is skipped and counted, never fatal on its own."""


class DataError(Exception):
    """A bad dataset path, split file or flag: the run stops before any training (exit code 2)."""


# ----------------------------------------------------------------------------------------------
# Clip samplers. Each returns frame indices into a video of n frames.


def clip_indices(n, T, stride, start):
    """T frames at `stride` from `start`; a video shorter than the span gets a lower stride (down to 1), then its
    last frame repeated."""
    if (T - 1) * stride + 1 > n:
        stride = max(1, (n - 1) // max(1, T - 1))
    return [min(start + i * stride, n - 1) for i in range(T)]


def max_start(n, T, stride):
    """The last start of T frames at `stride` that fits in n frames (0 where none fits)."""
    return max(0, n - ((T - 1) * stride + 1))


def train_indices(n, T, stride, g):
    """Fine-tune / supervised clip: T frames at `stride` from a random start (paper: 8 frames, stride 2)."""
    start = int(torch.randint(0, max_start(n, T, stride) + 1, (1,), generator=g))
    return clip_indices(n, T, stride, start)


def ssl_indices(n, T, stride, g, n_dense=4):
    """Self-supervised clip set: a sparse clip of T frames at `stride` and `n_dense` dense clips of T frames tiling
    its span without overlap (paper: 16 frames at stride 4; dense clip j = 16 consecutive frames from sparse
    frame 4j). Returns (sparse, [dense_1..dense_n]); a short video shrinks the span to fit."""
    span = T * stride if T * stride <= n else max(n_dense, n)  # a short video: the span shrunk to fit
    start = int(torch.randint(0, n - span + 1, (1,), generator=g)) if span <= n else 0
    sparse = [min(start + (i * span) // T, n - 1) for i in range(T)]
    width = span // n_dense  # each dense clip: T frames over one of n_dense equal parts of the span
    starts = [start + (j * span) // n_dense for j in range(n_dense)]  # dense clip j's first frame
    dense = [[min(lo + (i * width) // T, n - 1) for i in range(T)] for lo in starts]
    return sparse, dense


def test_indices(n, T, stride, K=10, released=False):
    """K clips spread uniformly over the video (paper: 10), first and last starts at the ends. `released`: as
    the release's test loader (dl_semisup_2clips.py): the stride halved where T strides pass the end, the starts
    int(linspace(0, n - stride T - 10, K)), a negative one replaced by the clip's number."""
    if released:
        k = stride / 2 if stride * T > n else stride  # a float, as the release's
        stop = n - k * T - 10
        starts = [int(j * (stop / (K - 1))) for j in range(K - 1)] + [int(stop)] if K > 1 else [0]  # np.linspace
        return [clip_indices(n, T, max(1, int(k)), s if s >= 0 else j) for j, s in enumerate(starts)]
    m = max_start(n, T, stride)
    starts = [round(k * m / (K - 1)) for k in range(K)] if K > 1 else [m // 2]
    return [clip_indices(n, T, stride, s) for s in starts]


def score_indices(n, T, n_clips=4):
    """Temporal similarity score: `n_clips` consecutive non-overlapping clips covering the video,
    clip c = T frames spread evenly over the c-th quarter (docs/method.md "Temporal similarity score")."""
    seg = n / n_clips
    return [[min(n - 1, int(c * seg + i * seg / T)) for i in range(T)] for c in range(n_clips)]


# ----------------------------------------------------------------------------------------------
# Reading frames


def _open_video(path):
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot open ({getattr(e, 'strerror', None) or e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_count = 1  # one thread per DataLoader worker; the workers are the parallelism
    return container, stream


def count_frames(path):
    """Frames of the first video stream, counted from the demuxed packets, not read from the container (which may
    store none, or a wrong count for a truncated file)."""
    container, stream = _open_video(path)
    n = 0
    try:
        for packet in container.demux(stream):
            if packet.size > 0:  # the demuxer ends the stream with one empty flush packet
                n += 1
    except av.FFmpegError:
        pass  # a truncated file: count what could be read
    finally:
        container.close()
    if n == 0:
        raise VideoError(f"{path}: no video frames")
    return n


def _output_size(size, width, height):
    """size=None keeps the frame, (H, W) resizes to it, an int resizes the short side to it."""
    if isinstance(size, int):
        scale = size / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))
    return (height, width) if size is None else size


def _to_tensor(frame, out_hw):
    """One decoded frame -> (H, W, 3) uint8 view of its RGB plane, converted once at the output size."""
    H, W = out_hw
    rgb = frame.reformat(width=W, height=H, format="rgb24", interpolation="BILINEAR", threads=1)  # one a worker
    plane = rgb.planes[0]
    flat = torch.frombuffer(plane, dtype=torch.uint8)  # read-only memory: the caller copies it out
    return flat.view(H, plane.line_size)[:, : W * 3].view(H, W, 3)  # (H, W, 3), rows padded to line_size


def _decode(container, stream, first):
    """Yields (index, frame) from the keyframe at or before frame `first` to the stream's end (the caller stops at
    its last wanted frame), the index the timestamp x frame rate (display order with B-frames), or counted from
    the start where timestamps are missing or the seek overshoots."""
    rate = stream.average_rate or stream.guessed_rate
    tb = stream.time_base
    start = stream.start_time or 0
    index = lambda frame: round((frame.pts - start) * tb * rate)  # noqa: E731
    if rate and tb and first > 0:
        container.seek(start + int(first / rate / tb), stream=stream, backward=True, any_frame=False)
        frames = container.decode(stream)
        head = next(frames, None)
        if head is not None and head.pts is not None and index(head) <= first:
            for frame in itertools.chain([head], frames):
                if frame.pts is None:
                    return
                yield index(frame), frame
            return
        container.seek(0, stream=stream, backward=True, any_frame=False)
    yield from enumerate(container.decode(stream))  # sequential decode from the start


def load_frames(path, indices, size=None):
    """Frames `indices` of video `path` (in the order asked; they may repeat) as a (len(indices), H, W, 3) uint8 RGB
    tensor, decoded once from the keyframe before min(indices) to max(indices), each wanted frame converted once
    at `size` ((H, W), or an int short side). An index past the last decodable frame gets the nearest earlier one."""
    if len(indices) == 0:
        raise ValueError("load_frames: no indices")
    wanted = set(indices)
    first, last = min(wanted), max(wanted)
    container, stream = _open_video(path)
    out_hw = _output_size(size, stream.codec_context.width, stream.codec_context.height)
    got, tail = {}, None
    try:
        for index, frame in _decode(container, stream, first):
            if index in wanted and index not in got:
                got[index] = _to_tensor(frame, out_hw).clone()
            tail = frame
            if index >= last:
                break
    except av.FFmpegError as e:
        if not got and tail is None:
            raise VideoError(f"{path}: decoding failed ({getattr(e, 'strerror', None) or e})") from None
    finally:
        container.close()  # decoded frames own their data and outlive the container
    if not got and tail is not None:  # all wanted frames lie past the end: the last decodable frame
        got[first] = _to_tensor(tail, out_hw).clone()
    if not got:
        raise VideoError(f"{path}: none of frames {first}..{last} could be decoded")
    out = torch.empty(len(indices), *out_hw, 3, dtype=torch.uint8)  # (N, H, W, 3)
    for i, k in enumerate(indices):
        if k in got:
            out[i] = got[k]
        else:  # past the end of a short or truncated stream: the nearest earlier decoded frame
            out[i] = got[max((j for j in got if j <= k), default=min(got))]
    return out


_KEPT = {}  # videos decoded whole: (path, short side) -> (count_frames, (m, H, W, 3) uint8: the whole video)
_FULL = set()  # the budgets reached: nothing more is decoded to be kept


def keep_decoded(paths, size, budget):
    """Decodes each video of `paths` whole at short side `size` and keeps it for this process's datasets while
    all kept fits in `budget` bytes; the first video past it ends the keeping for good (the rest is decoded on
    demand). Run before a DataLoader forks its workers, which share the kept frames. Returns the bytes kept."""
    used = sum(frames.numel() for _, frames in _KEPT.values())
    for path in paths:
        if budget in _FULL or used >= budget:  # --cache-mb 0: nothing is decoded ahead
            break
        if (path, size) in _KEPT:
            continue
        try:
            n = count_frames(path)
            frames = load_frames(path, range(n), size)  # (n, H, W, 3): the whole video
        except VideoError:
            continue  # unreadable: left to the dataset, which skips and counts it
        if used + frames.numel() > budget:
            _FULL.add(budget)
            break
        _KEPT[(path, size)] = n, frames
        used += frames.numel()
    return used


# ----------------------------------------------------------------------------------------------
# Augmentations, in two halves; a clip travels as uint8 (3, T, S, S) with the row of parameters drawn for it:
#   per clip, in the DataLoader workers, on uint8: crop, resize, flip          `augment`, `center_crop`
#   per batch, on the device, in float: colour jitter, greyscale, normalisation, random erase   `augment_on_device`

MEAN = torch.tensor([0.45, 0.45, 0.45]).view(3, 1, 1, 1)
STD = torch.tensor([0.225, 0.225, 0.225]).view(3, 1, 1, 1)
GREY = torch.tensor([0.299, 0.587, 0.114])  # luma weights w
# a clip's parameters: brightness b, contrast c, saturation s, hue angle theta, greyscale flag, mean grey m, an
# erased box (top, left, height, width; height 0: none), gamma, a second box, a dropped channel + 1 (0: none), fill
PARAMS = tuple("b c s theta grey m et el eh ew gamma et2 el2 eh2 ew2 drop fill".split())
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.45)  # nothing changed
AUGMENTATIONS = ("light", "released")  # the classifier and student clips' recipes (`augment`)
SSL_AUGMENTATIONS = ("view", "released")  # the SSL clips' (`VideoDataset`, mode "ssl")
# The released loaders as data (`augment_released`): the crop's least side fraction; (rate, half-range) of contrast,
# hue (in turns), saturation, brightness, gamma (on greyscale clips); greyscale, channel-drop rates; each erase's rate
RELEASED = {
    "released": dict(crop=0.4, contrast=(0.125, 0.1), hue=(0.15, 0.05), saturation=(0.15, 0.1),  # dl_semisup_2clips.py
                     brightness=(0.15, 0.1), grey=0.1, drop=0.0, gamma=(0.75, 0.15), erase=(0.4, 0.4)),
    "ssl-released": dict(crop=0.5, contrast=(0.25, 0.25), hue=(0.3, 0.1), saturation=(0.3, 0.25),  # dl_ssl.py
                         brightness=(0.3, 0.25), grey=0.175, drop=0.125, gamma=(0.75, 0.25), erase=(0.7,)),
}


def _uniform(g, lo=0.0, hi=1.0):
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _resize(x, size):
    """(T, 3, h, w) uint8 -> (T, 3, size, size) uint8, bilinear (uint8 has a fast path on the CPU)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def center_crop(clip, size, fraction=0.0):
    """(T, H, W, 3) uint8 -> (3, T, size, size) uint8 for evaluation and scoring: the central square, or the central
    `fraction` of each side (the aspect squeezed, as the released test loader's 0.8), resized. Parameters: IDENTITY."""
    T, H, W, _ = clip.shape
    h, w = (round(fraction * H), round(fraction * W)) if fraction else (min(H, W),) * 2
    top, left = (H - h) // 2, (W - w) // 2
    x = clip[:, top : top + h, left : left + w].permute(0, 3, 1, 2)  # (T, 3, h, w)
    if (h, w) != (size, size):
        x = _resize(x, size)
    return x.permute(1, 0, 2, 3).contiguous()  # (3, T, size, size)


def augment(clip, size, g, recipe="ssl", source=None):
    """(T, H, W, 3) uint8 -> ((3, T, size, size) uint8, (len(PARAMS),) row): one draw for the whole clip of a
    crop resized to `size` and a flip (p 0.5), applied here, and of the float half, for `augment_on_device`.
    Recipes: "ssl" (random resized crop of area 0.3-1, colour jitter, greyscale, an erase), "light" (random
    resized crop of area 0.5-1, the flip), the released loaders' (`augment_released`, which takes `source`)."""
    if recipe in RELEASED:
        return augment_released(clip, size, g, RELEASED[recipe], source)
    T, H, W, _ = clip.shape
    for _ in range(10):
        target = H * W * _uniform(g, 0.3 if recipe == "ssl" else 0.5, 1.0)
        ratio = math.exp(_uniform(g, math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= W and 0 < h <= H:
            break
    else:
        h = w = min(H, W)
    x, p = _crop_and_flip(clip, h, w, size, g), dict(zip(PARAMS, IDENTITY))
    if recipe == "ssl":
        if _uniform(g) < 0.8:  # colour jitter
            p["b"], p["c"], p["s"] = _uniform(g, 0.8, 1.2), _uniform(g, 0.8, 1.2), _uniform(g, 0.8, 1.2)
            p["theta"] = _uniform(g, -math.pi, math.pi)
        p["grey"] = float(_uniform(g) < 0.2)
        if _uniform(g) < 0.5:  # random erase: (top, left, height, width), kept inside
            p["eh"], p["ew"] = int(size * _uniform(g, 0.1, 0.4)), int(size * _uniform(g, 0.1, 0.4))
            p["et"], p["el"] = int(_uniform(g) * (size - p["eh"])), int(_uniform(g) * (size - p["ew"]))
    return x, _as_row(p, x)


def augment_released(clip, size, g, r, source=None):
    """`augment` as the released loaders draw it (`r`: the recipe's rates and ranges, RELEASED): a crop of a side
    fraction f in [r["crop"], 1] of both sides (the aspect kept); contrast, hue, saturation and brightness each at
    its rate; greyscale (then gamma) or one colour channel dropped (one draw decides); erased boxes, each at its
    rate, sides 1/6-1/3 of the video's own frame height and width (`source`, else the clip's) times size / 224, the
    corner anywhere, clipped at the edge, black (torchvision's erase, v=0, on unnormalised pixels)."""
    T, H, W, _ = clip.shape
    H0, W0 = source or (H, W)
    f = _uniform(g, r["crop"], 1.0)
    x, p = _crop_and_flip(clip, max(1, round(f * H)), max(1, round(f * W)), size, g), dict(zip(PARAMS, IDENTITY))

    def maybe(prob, half):  # a factor 1 +- half at rate prob, else 1
        return _uniform(g, 1 - half, 1 + half) if _uniform(g) < prob else 1.0

    def randint(lo, hi):  # an integer in [lo, hi) (lo where the range is empty), as numpy's randint
        return lo + int(_uniform(g) * max(0, hi - lo))

    p["c"] = maybe(*r["contrast"])
    p["theta"] = 2 * math.pi * _uniform(g, -r["hue"][1], r["hue"][1]) if _uniform(g) < r["hue"][0] else 0.0
    p["s"], p["b"] = maybe(*r["saturation"]), maybe(*r["brightness"])
    u = _uniform(g)
    p["grey"] = float(u < r["grey"])  # greyscale, then gamma
    p["gamma"] = maybe(*r["gamma"]) if p["grey"] else 1.0
    if r["grey"] <= u < r["grey"] + r["drop"]:  # or one colour channel set to 0
        p["drop"] = 1 + int(_uniform(g) * 3)
    for box, prob in zip(("", "2"), r["erase"]):  # (top, left, height, width) of each box
        if _uniform(g) < prob:
            eh, ew = (randint(int(side / 6 * size / 224), int(side / 3 * size / 224)) for side in (H0, W0))
            et, el = randint(0, size), randint(0, size)
            p["et" + box], p["el" + box], p["eh" + box], p["ew" + box] = et, el, min(eh, size - et), min(ew, size - el)
            p["fill"] = 0.0
    return x, _as_row(p, x)


def _crop_and_flip(clip, h, w, size, g):
    """(T, H, W, 3) uint8 -> (3, T, size, size) uint8: an h x w crop at a random place, resized, flipped at p 0.5."""
    T, H, W, _ = clip.shape
    top, left = int(_uniform(g) * (H - h + 1)), int(_uniform(g) * (W - w + 1))
    x = _resize(clip[:, top : top + h, left : left + w].permute(0, 3, 1, 2), size)  # (T, 3, S, S) uint8
    if _uniform(g) < 0.5:
        x = x.flip(-1)
    return x.permute(1, 0, 2, 3).contiguous()  # (3, T, S, S)


def _as_row(p, x):
    """The parameters {PARAMS: value} as a row, with the clip's mean grey m where the contrast pivots about it."""
    if p["c"] != 1.0:
        p["m"] = float(torch.einsum("c,cthw->", GREY, x.float())) / (255 * x[0].numel())
    return torch.tensor(list(p.values()))


_CONSTANTS = {}


def _constant(name, value, like):
    """A constant tensor on `like`'s device and dtype, copied there once (a copy a batch would wait for the GPU)."""
    key = (name, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = value.to(like)
    return _CONSTANTS[key]


def colour_matrix(b, c, s, theta, grey, m):
    """Colour jitter as one affine map a clip, x -> A x + o on RGB in [0, 1], before one clamp; every argument (N,):
        brightness x b;  contrast (x - m') c + m' with m' = b m the clip's mean grey;
        saturation M_s = s I + (1 - s) 1 w^T;  hue R = cos(theta) I + (1 - cos(theta)) u u^T + sin(theta) [u]_x,
        a rotation about the grey axis u = (1, 1, 1) / sqrt(3) that keeps grey grey (Rodrigues' formula);
        A = [1 w^T where `grey`] R M_s b c
    Since M_s 1 = R 1 = 1, o = (1 - c) b m 1. torchvision clamps after each op. Returns A (N, 3, 3), o (N,)."""
    I = torch.eye(3, dtype=b.dtype, device=b.device)
    to_grey = _constant("to_grey", torch.outer(torch.ones(3), GREY), b)  # 1 w^T
    cross = _constant("cross", torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]]), b)  # sqrt(3) [u]_x
    cos, sin = theta.cos().view(-1, 1, 1), theta.sin().view(-1, 1, 1) / math.sqrt(3)
    R = cos * I + (1 - cos) / 3 * torch.ones_like(I) + sin * cross  # (N, 3, 3); u u^T = 1 1^T / 3
    M_s = s.view(-1, 1, 1) * I + (1 - s).view(-1, 1, 1) * to_grey  # (N, 3, 3)
    A = R @ M_s * (b * c).view(-1, 1, 1)
    A = torch.where(grey.view(-1, 1, 1) > 0, to_grey @ A, A)
    return A, (1 - c) * b * m


def augment_on_device(x, p):
    """The float half of the augmentation, on a whole batch on the training device: x (N, 3, T, S, S)
    uint8 clips and p (N, len(PARAMS)) their parameters -> (N, 3, T, S, S) normalised float:
        x -> clamp(A x / 255 + o, 0, 1) ** gamma   (colour, greyscale: `colour_matrix`; a dropped channel's row 0)
          -> fill inside the erased boxes          (random erase: the mean grey, or black as released)
          -> (x - mean) / std                      (normalisation)"""
    N, S = x.shape[0], x.shape[-1]
    q = dict(zip(PARAMS, p.float().unbind(1)))  # (N,) each
    A, o = colour_matrix(*(q[k] for k in ("b", "c", "s", "theta", "grey", "m")))  # (N, 3, 3), (N,)
    keep = (q["drop"].view(N, 1) != torch.arange(1, 4, device=p.device)).to(A.dtype)  # (N, 3): 0 at a dropped one
    A, o = A * keep.view(N, 3, 1), o.view(N, 1) * keep  # (N, 3, 3), (N, 3): a dropped channel maps to 0
    y = torch.einsum("nij,njthw->nithw", A / 255, x.float()).add_(o.view(N, 3, 1, 1, 1)).clamp_(0, 1)
    gamma = q["gamma"].view(N, 1, 1, 1, 1)
    y = torch.where(gamma == 1, y, y.pow(gamma))  # exactly y where gamma is 1 (a vectorised pow may round)
    pos, fill = torch.arange(S, device=x.device), q["fill"].view(N, 1, 1, 1, 1)
    for et, el, eh, ew in ([q[k + box] for k in ("et", "el", "eh", "ew")] for box in ("", "2")):  # (N,) each
        rows = (pos >= et.view(N, 1)) & (pos < (et + eh).view(N, 1))  # (N, S)
        cols = (pos >= el.view(N, 1)) & (pos < (el + ew).view(N, 1))  # (N, S)
        y = torch.where(rows.view(N, 1, 1, S, 1) & cols.view(N, 1, 1, 1, S), fill, y)  # (N, 1, 1, S, S) boxes
    return y.sub_(_constant("mean", MEAN, y)).div_(_constant("std", STD, y))  # (x - mean) / std


# ----------------------------------------------------------------------------------------------
# Dataset splits. An item is (path relative to root, 0-based label).


def _need(path, what):
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}")
    return path


def numbered_lines(path):
    """(line number, words) of each non-empty line; CRLF line ends are fine."""
    with open(_need(path, "split file")) as f:
        return [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]


def _class_index(path):
    """classInd.txt, lines 'index ClassName' with the indices 1..K, each once -> the K names in index order."""
    rows, names = numbered_lines(path), {}
    for n, words in rows:
        i = int(words[0]) if len(words) == 2 and words[0].isdecimal() else 0
        if not 1 <= i <= len(rows) or i in names:
            raise DataError(f"{path}:{n}: expected 'index ClassName', the indices 1..{len(rows)} each once, got "
                            f"{' '.join(words)!r}")
        names[i] = words[1]
    return [names[i] for i in sorted(names)]


def read_ucf101(root, splits, fold):
    """UCF101 train/test lists of `fold`. Labels are classInd.txt index - 1 (sorting the folder names instead
    would swap HammerThrow/Hammering and JumpRope/JumpingJack)."""
    _need(root, "dataset root")
    classes = _class_index(os.path.join(splits, "classInd.txt"))
    index = {name: i for i, name in enumerate(classes)}
    for name in classes:
        _need(os.path.join(root, name), "class folder")

    def parse(name):
        items = []
        for _, words in numbered_lines(os.path.join(splits, name)):
            folder = words[0].split("/")[0]
            if folder not in index:
                raise DataError(f"{os.path.join(splits, name)}: class {folder} is not in classInd.txt")
            items.append((words[0], index[folder]))
        return items

    return parse(f"trainlist0{fold}.txt"), parse(f"testlist0{fold}.txt"), classes


def read_hmdb51(root, splits, fold, use_unused=False):
    """HMDB51 split `fold` from <class>_test_split<fold>.txt: flag 1 train, 2 test, 0 unused (with `use_unused`:
    train, as semi-supervised work draws from the 5,236 non-test videos). Labels follow the sorted class names."""
    _need(root, "dataset root")
    suffix = f"_test_split{fold}.txt"
    files = sorted(f for f in os.listdir(_need(splits, "split folder")) if f.endswith(suffix))
    if not files:
        raise DataError(f"no *{suffix} files in {splits}")
    classes = [f[: -len(suffix)] for f in files]
    for name in classes:
        _need(os.path.join(root, name), "class folder")
    train, test = [], []
    for label, (name, f) in enumerate(zip(classes, files)):
        for n, words in numbered_lines(os.path.join(splits, f)):
            if len(words) != 2:
                raise DataError(f"{os.path.join(splits, f)}:{n}: expected 'video flag', got {' '.join(words)!r}")
            video, flag = words
            item = (f"{name}/{video}", label)
            if flag == "2":
                test.append(item)
            elif flag == "1" or use_unused:
                train.append(item)
    return train, test, classes


def read_list(root, train_list, test_list, class_names=None):
    """Generic lists, one `relative/path label` (0-based) a line; Kinetics users use this. `class_names`: an
    optional file with one class name a line, line k naming label k (else the classes are "0".."K-1")."""
    _need(root, "dataset root")
    classes = [" ".join(words) for _, words in numbered_lines(class_names)] if class_names else None
    K = len(classes) if classes else None
    train, test = _parse_list(train_list, K), _parse_list(test_list, K)
    return train, test, classes or [str(c) for c in range(1 + max(label for _, label in train + test))]


def _parse_list(path, num_classes=None):
    """The items of a list file: lines 'relative/path label', the label 0-based (below num_classes if given)."""
    items = []
    for n, words in numbered_lines(path):
        if len(words) != 2:
            raise DataError(f"{path}:{n}: lines must read 'relative/path label', got {' '.join(words)!r}")
        if not words[1].isdecimal():
            raise DataError(f"{path}:{n}: the label must be a non-negative integer, got {words[1]!r}")
        if num_classes is not None and int(words[1]) >= num_classes:
            raise DataError(f"{path}:{n}: label {words[1]} is out of range: there are {num_classes} classes "
                            f"(0..{num_classes - 1})")
        items.append((words[0], int(words[1])))
    return items


def split_labeled(items, labeled, seed, classes):
    """Labeled subset: `labeled` < 1 is a fraction of each class, >= 1 a count per class; at least one
    video per class, drawn per class with `seed`. Returns (labeled_items, unlabeled_items)."""
    if labeled <= 0:
        raise DataError(f"--labeled must be > 0, got {labeled}")
    if labeled >= 1 and labeled != int(labeled):
        raise DataError(f"--labeled {labeled}: a count per class must be a whole number")
    rng = random.Random(seed)
    by_class = {c: [] for c in range(len(classes))}
    for item in sorted(items):
        by_class[item[1]].append(item)
    lab, unlab = [], []
    for c, videos in by_class.items():
        if not videos:
            raise DataError(f"class {classes[c]} has no training videos")
        k = max(1, round(labeled * len(videos))) if labeled < 1 else int(labeled)
        if k > len(videos):
            raise DataError(f"--labeled {labeled}: class {classes[c]} has only {len(videos)} training videos")
        rng.shuffle(videos)
        lab += videos[:k]
        unlab += videos[k:]
    return lab, unlab


def hold_out(train, classes, n):
    """A validation split for tuning: the last `n` training videos of each class. Returns (train, held)."""
    by_class = [[j for j, (_, y) in enumerate(train) if y == c] for c in range(len(classes))]  # positions
    fewest = min(range(len(classes)), key=lambda c: len(by_class[c]))
    if len(by_class[fewest]) <= n:
        raise DataError(f"--holdout {n}: class {classes[fewest]} has {len(by_class[fewest])} training videos")
    held = {j for js in by_class for j in js[len(js) - n :]}  # by position: a video listed twice is two
    kept = [it for j, it in enumerate(train) if j not in held]
    return kept, [it for j, it in enumerate(train) if j in held]


def labeled_from_list(train, path, classes):
    """The labeled subset named by a list file (`read_list`'s format): every entry must be a training video
    with its label, and every class must have one. Returns (labeled, unlabeled) in training-list order."""
    listed = set(_parse_list(path, len(classes)))
    missing = sorted(listed - set(train))
    if missing:
        raise DataError(f"{path}: {missing[0][0]} (label {missing[0][1]}) is not a training video of this "
                        f"run ({len(missing)} entries are not)")
    empty = [classes[c] for c in range(len(classes)) if not any(y == c for _, y in listed)]
    if empty:
        raise DataError(f"{path}: no labeled video of class {empty[0]}")
    return [it for it in train if it in listed], [it for it in train if it not in listed]


def write_lines(path, lines):
    """A text file of `lines`, each ended by a newline: lists, class names, split files."""
    with open(path, "w") as f:
        f.writelines(f"{line}\n" for line in lines)


# ----------------------------------------------------------------------------------------------
# Datasets

# The 10 clips of one video in "ssl" mode: sparse A, sparse B, dense A1..A4, dense B1..B4 (A, B: two augmentations)
SSL_CLIPS = dict(sparse_A=0, sparse_B=1, dense_A=slice(2, 6), dense_B=slice(6, 10))


class VideoDataset(torch.utils.data.Dataset):
    """Items (relative path, label) under `root`, read in one of four modes; each clip comes as uint8 (3, T, S, S)
    with its row of PARAMS, for `augment_on_device`:
      train  one clip, T frames at `stride`, augmentation `aug`      -> (3, T, S, S), (P,)
      ssl    sparse + 4 dense clips, each twice (`ssl_aug`)          -> (10, 3, T, S, S), (10, P) in SSL_CLIPS order
      test   `test_clips` clips spread over the video, centre crop   -> (K, 3, T, S, S), (K, P)
      score  4 consecutive non-overlapping clips, centre crop        -> (4, 3, T, S, S), (4, P)
    `released`: the release's test starts, and in ssl mode videos of 7/8 of the sparse span or fewer frames left
    out (dl_ssl.py: 56 at 16 x 4). An item, (epoch, index) (`EpochSampler`) or a bare index (epoch 0), is (clips,
    params, label, index, bad), `bad` the items that failed to decode: a failed train/ssl item is replaced by another
    random video, a failed test/score one is zeros (counted wrong). Draws are seeded by (seed, epoch, index) alone."""

    def __init__(self, items, root, mode, frames=8, stride=2, size=64, test_clips=10, seed=0, aug="light",
                 ssl_aug="view", test_crop=0.0, released=False):
        if mode not in ("train", "ssl", "test", "score"):
            raise ValueError(f"unknown mode {mode}")
        if released and mode == "ssl":
            items = [item for item in items if _longer_than(os.path.join(root, item[0]), frames * stride * 7 // 8)]
        self.items, self.root, self.mode, self.aug, self.released = items, root, mode, aug, released
        self.ssl_aug, self.test_crop = ssl_aug, test_crop
        self.T, self.stride, self.size, self.K, self.seed = frames, stride, size, test_clips, seed
        self.decode_size = round(size * 8 / 7)  # short side before cropping (112 crop from 128)
        self._counts, self._sizes = {}, {}

    def __len__(self):
        return len(self.items)

    def path(self, i):
        return os.path.join(self.root, self.items[i][0])

    def frame_count(self, i):
        if i not in self._counts:
            kept = _KEPT.get((self.path(i), self.decode_size))
            self._counts[i] = kept[0] if kept else count_frames(self.path(i))
        return self._counts[i]

    def source_size(self, i):
        """The video's own frame (height, width), by which the released erase sizes its boxes."""
        if i not in self._sizes:
            container, stream = _open_video(self.path(i))
            self._sizes[i] = stream.codec_context.height, stream.codec_context.width
            container.close()
        return self._sizes[i]

    def frames(self, i, indices):
        """`load_frames` of item i at the decoding size, from memory where the video is kept."""
        kept = _KEPT.get((self.path(i), self.decode_size))
        if kept is None:
            return load_frames(self.path(i), indices, self.decode_size)
        return kept[1][[min(k, len(kept[1]) - 1) for k in indices]]  # past the end: the last frame

    def _load(self, i, g):
        n = self.frame_count(i)
        S = self.size
        if self.mode == "train":
            frames = self.frames(i, train_indices(n, self.T, self.stride, g))
            return augment(frames, S, g, self.aug, self.source_size(i) if self.aug in RELEASED else None)
        if self.mode == "ssl":
            sparse, dense = ssl_indices(n, self.T, self.stride, g)
            frames = self.frames(i, sparse + sum(dense, []))  # one decode for the whole clip set: (5T, H, W, 3)
            if self.ssl_aug == "released":  # each of the 10 clips its own draw (dl_ssl.py: one row a clip)
                clips = frames.view(5, self.T, *frames.shape[1:])  # (5, T, H, W, 3): sparse, dense 1..4
                source = self.source_size(i)
                drawn = [augment(clips[c], S, g, "ssl-released", source) for c in (0, 0, 1, 2, 3, 4, 1, 2, 3, 4)]
                return torch.stack([x for x, _ in drawn]), torch.stack([p for _, p in drawn])  # SSL_CLIPS order
            A, p_A = augment(frames, S, g)  # "view": one draw a view, so that its clips differ only by time
            B, p_B = augment(frames, S, g)
            A, B = (v.view(3, 5, self.T, S, S).transpose(0, 1) for v in (A, B))  # (5, 3, T, S, S): sparse, dense 1..4
            clips = torch.cat([A[:1], B[:1], A[1:], B[1:]])  # (10, 3, T, S, S): the order of SSL_CLIPS
            return clips, torch.stack([p_A, p_B] + [p_A] * 4 + [p_B] * 4)  # (10, P)
        sets = (test_indices(n, self.T, self.stride, self.K, self.released) if self.mode == "test"
                else score_indices(n, self.T))
        frames = self.frames(i, sum(sets, []))
        clips = frames.view(len(sets), self.T, *frames.shape[1:])  # (K, T, H, W, 3)
        return torch.stack([center_crop(c, S, self.test_crop) for c in clips]), torch.tensor([IDENTITY] * len(sets))

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
        bad = []
        for _ in range(20):
            try:
                return *self._load(i, g), self.items[i][1], i, bad
            except VideoError as e:
                bad.append((i, str(e)))
                if self.mode in ("test", "score"):
                    n = self.K if self.mode == "test" else 4
                    zeros = torch.zeros(n, 3, self.T, self.size, self.size, dtype=torch.uint8)
                    return zeros, torch.tensor([IDENTITY] * n), self.items[i][1], i, bad
                i = int(torch.randint(0, len(self.items), (1,), generator=g))
        raise VideoError(f"20 videos in a row failed to decode, the last: {bad[-1][1]}")


def _longer_than(path, n):
    """Whether the video has more than n frames; an unreadable one is kept (skipped and counted when drawn)."""
    try:
        return count_frames(path) > n
    except VideoError:
        return True


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys for `VideoDataset`: with `shuffle`, the first `length` x `world` of a permutation
    drawn from (seed, epoch) (`length` per rank: at most and by default n // world), every world-th from `rank` on;
    else the items in order. The epoch in each key seeds the item, in persistent workers and after a resume alike."""

    def __init__(self, n, seed, shuffle=True, rank=0, world=1, length=None):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.length = min(length, n // world) if length is not None else n // world
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length if self.shuffle else self.n

    def __iter__(self):
        if not self.shuffle:
            return ((self.epoch, i) for i in range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        order = order[: len(self) * self.world][self.rank :: self.world]  # (length,)
        return ((self.epoch, i) for i in order.tolist())


def collate(batch):
    """torch's default_collate (into shared memory in a worker) of all but the unreadable videos' lists, joined."""
    clips, params, labels, index = torch.utils.data.default_collate([item[:4] for item in batch])
    return clips, params, labels, index, [b for item in batch for b in item[4]]


class BadVideos(dict):
    """Unreadable videos, {item index: message}, gathered across DataLoader workers; warns once per video."""

    def add(self, failed):
        for i, msg in failed:
            if i not in self:
                print(f"warning: skipping unreadable video: {msg}", file=sys.stderr, flush=True)
            self[i] = msg
