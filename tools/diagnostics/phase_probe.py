"""What an encoder of a run sees in a repetitive toy video: clips starting at every frame of a fresh video
of one class, read as scoring reads them (a written file, the centre crop, `data.augment_on_device`), each compared with
the first clip (cosine of the projection head's embeddings), against how far apart the two clips are in the
cycle (its phase, known from the video's own draws). An encoder that tells the phases of a cycle apart puts
a repetitive video's score clips apart, and so gives it a low temporal similarity.

    python tools/diagnostics/phase_probe.py RUN_DIR --variant pulse --cls 0
"""
import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import data  # noqa: E402
from models import compact  # noqa: E402
from tools import toy  # noqa: E402


def period_of(seed):
    """The cycle's period in frames of the toy video drawn from `seed` (the draws of `toy._render`)."""
    g = torch.Generator().manual_seed(seed)
    torch.rand(3, generator=g)  # the colour
    for _ in range(4):  # centre x, centre y, phase, turn
        torch.rand((), generator=g)
    return 3 + 4 * float(torch.rand((), generator=g))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder with invariant.pt and distinctive.pt")
    p.add_argument("--variant", choices=sorted(toy.TOY_VARIANTS), default="bob")
    p.add_argument("--cls", type=int, default=0, help="a repetitive class: 0-3")
    p.add_argument("--videos", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(1)
    encoders = {}
    for name in ("invariant", "distinctive"):
        ckpt = torch.load(os.path.join(a.run, f"{name}.pt"), map_location="cpu", weights_only=True)
        args = ckpt["args"]
        encoders[name] = compact(args["width"], args["layers"], proj_dim=128).eval()
        encoders[name].load_state_dict(ckpt["model"])
    T, S = args["frames"], args["size"]
    pairs = {name: [] for name in encoders}  # (phase apart in [0, 0.5] cycles, cosine)
    with tempfile.TemporaryDirectory() as tmp:
        for v in range(a.videos):
            path = os.path.join(tmp, f"{v}.avi")
            g = torch.Generator().manual_seed(1000 + v)
            toy.write_video(path, toy._render(a.cls, 48, 80, 80, g, 1.0, a.variant))
            period, starts = period_of(1000 + v), range(30)
            # 8 frames 1.5 apart, as a score clip of a 48-frame video takes them
            clips = [data.center_crop(data.load_frames(path, [o + round(1.5 * i) for i in range(T)],
                                                       round(S * 8 / 7)), S) for o in starts]
            x = data.augment_on_device(torch.stack(clips), torch.tensor([data.IDENTITY] * 30))  # (30, 3, T, S, S)
            with torch.no_grad():
                for name, enc in encoders.items():
                    e = enc(x, out="ssl")[0]  # (30, D), unit vectors
                    for o in starts[1:]:
                        apart = (o / period) % 1
                        pairs[name].append((min(apart, 1 - apart), float(e[o] @ e[0])))
    for name, p in pairs.items():
        r = float(torch.corrcoef(torch.tensor(p).T)[0, 1])
        near = statistics.mean(c for d, c in p if d < 0.1)
        far = statistics.mean(c for d, c in p if d > 0.4)
        cls = toy.TOY_VARIANTS[a.variant][a.cls]
        print(f"{a.variant} class {cls}, {name} encoder: correlation of phase apart and cosine {r:+.2f}; "
              f"cosine in phase (< 0.1 cycle) {near:.3f}, half a cycle apart (> 0.4) {far:.3f}")


if __name__ == "__main__":
    main()
