"""The temporal similarity score drawn without fonts, OUT/scores.png: per class the median-score training
video's 4 score clips (middle frames), the 4x4 cosine matrix C (white = alike), the raw s (blue bar) and the
normalised s (orange bar). Takes train.py's flags of the run (its encoders must be there; the scores are
read from OUT/scores.json, or computed and cached):

    python tools/score_picture.py --out runs/default
"""
import os
import sys

import av
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import data  # noqa: E402
import train  # noqa: E402
from tools import toy  # noqa: E402


def draw(run, cache, P=64):
    """OUT/scores.png (`score_picture`): per class its median-score training video, the middle frames
    of its 4 score clips, C, raw and normalised s. Drawn by the first process alone."""
    if run.rank:
        return
    rows = []
    for c in range(len(run.classes)):
        videos = sorted((cache["raw"][p], p) for p, y in run.train if y == c)
        if videos:
            p = videos[len(videos) // 2][1]
            rows.append((score_frames(os.path.join(run.args.root, p), run.args.ssl_frames, P), cache["C"][p],
                         cache["raw"][p], cache["s"][p]))
    write_png(os.path.join(run.args.out, "scores.png"), score_picture(rows, P))
    run.log(f"wrote {os.path.join(run.args.out, 'scores.png')}: per class, the median-score video's 4 score "
            "clips, C, raw and normalised s")


def write_png(path, img):
    """(H, W, 3) uint8 tensor -> a lossless PNG file, with PyAV's png encoder (no imaging library)."""
    H, W, _ = img.shape
    with av.open(path, "w", format="image2", options={"update": "1"}) as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = W, H, "rgb24"
        for packet in list(stream.encode(toy.video_frame(img))) + list(stream.encode()):
            container.mux(packet)


def score_frames(path, T, P=64):
    """The middle frame of each of the 4 score clips of a video of T-frame clips (`score_indices`), centre
    cropped to P: (4, P, P, 3) uint8, grey where the video cannot be read."""
    try:
        middles = [clip[len(clip) // 2] for clip in data.score_indices(data.count_frames(path), T)]
        return data.center_crop(data.load_frames(path, middles, P), P).permute(1, 2, 3, 0)  # (4, P, P, 3)
    except data.VideoError:
        return torch.full((4, P, P, 3), 128, dtype=torch.uint8)


RAW_BAR, NORM_BAR = (70, 130, 255), (255, 150, 30)  # colours of the raw and normalised score bars


def score_picture(rows, P=64, gap=4):
    """The temporal similarity score, drawn without fonts: one row per video, rows = [(frames (4, P, P, 3)
    uint8, C (4, 4), raw s, normalised s)]. Each row shows the middle frame of each of the 4 score clips,
    then C as a 4x4 heat map in a black frame (grey level 255 * clamp(C_ij, 0, 1): white = the same,
    black = orthogonal or opposite), then the raw s as a blue bar and the normalised s as an orange bar
    (full height = 1).
    Returns (H, W, 3) uint8. P must be a multiple of 4."""
    bar = P // 5
    W = gap + 5 * (P + gap) + 2 * (bar + gap)
    img = torch.full((gap + len(rows) * (P + gap), W, 3), 255, dtype=torch.uint8)
    for r, (frames, C, s_raw, s_norm) in enumerate(rows):
        y = gap + r * (P + gap)
        for k in range(4):
            img[y : y + P, gap + k * (P + gap) : gap + k * (P + gap) + P] = frames[k]
        x = gap + 4 * (P + gap)
        img[y - 1 : y + P + 1, x - 1 : x + P + 1] = 0  # a black frame: a white matrix on the white page
        cells = (torch.as_tensor(C).float().clamp(0, 1) * 255).round().to(torch.uint8)  # (4, 4)
        img[y : y + P, x : x + P] = cells.repeat_interleave(P // 4, 0).repeat_interleave(P // 4, 1)[..., None]
        for j, (s, colour) in enumerate(((s_raw, RAW_BAR), (s_norm, NORM_BAR))):
            x = gap + 5 * (P + gap) + j * (bar + gap)
            img[y : y + P, x : x + bar] = 40  # the bar's empty part
            h = round(P * min(max(s, 0.0), 1.0))
            img[y + P - h : y + P, x : x + bar] = torch.tensor(colour, dtype=torch.uint8)
    return img


def main(argv=None):
    args = train.get_args(argv, train.parser(command=False))

    def picture():
        run = train.Run(args, "scores")
        draw(run, train.scores(run))

    train.command(picture)


if __name__ == "__main__":
    main()
