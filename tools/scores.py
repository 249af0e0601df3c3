"""What each video's temporal similarity score is made of, for the tools: the core (`train.video_scores`)
computes s alone; the ablation's tables and the report's matrices read C and each encoder's s from here."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import data  # noqa: E402
import models  # noqa: E402
import tb  # noqa: E402
import train  # noqa: E402


@torch.no_grad()
def score_parts(out, args, items):
    """What each video's score is made of, for the tools (the core keeps s alone): {path: (C as 4 rows of 4, s of
    C_I alone, s of C_D alone)} of each (path, label) of `items`, from run folder `out`'s two encoders on the
    video's 4 score clips, one video at a time (`train.video_scores` takes batches). `args`: the run's flags."""
    encoders = []
    for k in train.ENCODERS:
        path = os.path.join(out, f"{k}.pt")
        ckpt = train.load_checkpoint(path, "ssl")
        encoders.append(train.load_into(models.build(**ckpt["arch"]), ckpt, path).eval())
    ds = data.VideoDataset(items, args["root"], "score", args["ssl_frames"], args["ssl_stride"], args["size"],
                           test_crop=args["test_crop"])
    parts = {}
    for i, (p, _) in enumerate(items):
        clips, params, *_ = ds[i]
        x = data.augment_on_device(clips, params)  # (4, 3, T, S, S)
        e_I, e_D = (f(x, out="ssl")[0][None] for f in encoders)  # (1, 4, D)
        C = tb.similarity_matrix(e_I, e_D)[0]  # (4, 4)
        parts[p] = (C.tolist(), *(tb.temporal_similarity(e, e).item() for e in (e_I, e_D)))
    return parts
