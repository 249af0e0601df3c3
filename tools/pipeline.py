"""Whether the data path keeps up with the training step: on UCF-like videos it writes itself (320x240, 7 s,
MPEG-4 AVI), the step alone, the loader alone and the real stage, in clips/s (docs/performance.md):

    python tools/pipeline.py                  # the CPU defaults
    python tools/pipeline.py --device cuda --width 64 --layers 2 2 2 2 --size 112 --workers 15 \
        --videos 480 --repeat 5
"""
import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import data  # noqa: E402
import train  # noqa: E402
from tools import toy  # noqa: E402
from tools.bench import model_flags, step_fns, timed  # noqa: E402


def write_ucf_like(path, seed, n=175, H=240, W=320):
    """7 s at 25 fps, 320x240, MPEG-4 part 2 in AVI with a keyframe every 12 frames (UCF101's format): a
    texture drifting across the frame and a blob moving over it, so that every frame costs a real decode."""
    torch.set_num_threads(1)  # one process per core
    g = torch.Generator().manual_seed(seed)
    texture = F.interpolate(torch.rand(1, 3, H // 8, W // 8, generator=g), size=(H, W), mode="bilinear")[0]  # (3, H, W)
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    v = torch.randn(2, generator=g) * 2
    frames = []
    for t in range(n):
        img = texture.roll(shifts=(t // 2, t), dims=(1, 2)).clone()  # (3, H, W)
        cy, cx = (H / 2 + v[0] * t) % H, (W / 2 + v[1] * t) % W
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 900] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1)
        frames.append((img.permute(1, 2, 0) * 255).to(torch.uint8))
    toy.write_video(path, torch.stack(frames), gop=12)


def pipeline_videos(args, K=8):
    """args.videos UCF-like videos written in a temporary folder (one process a core), their lists, and the
    flags of train.py that read them."""
    tmp = tempfile.mkdtemp()
    rels = [f"v{i:04d}.avi" for i in range(args.videos)]
    t = time.perf_counter()
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.starmap(write_ucf_like, [(os.path.join(tmp, r), i) for i, r in enumerate(rels)])
    print(f"\n## Pipeline: {args.videos} UCF-like videos (320x240, 7 s, MPEG-4 AVI) written in "
          f"{time.perf_counter() - t:.0f} s; train list = them x {args.repeat}")
    data.write_lines(os.path.join(tmp, "train.txt"), [f"{r} {i % K}" for i, r in enumerate(rels)] * args.repeat)
    data.write_lines(os.path.join(tmp, "test.txt"), [f"{r} {i % K}" for i, r in enumerate(rels[:K])])
    return tmp, [
        "--dataset", "list", "--root", tmp, "--train-list", os.path.join(tmp, "train.txt"), "--test-list",
        os.path.join(tmp, "test.txt"), "--device", args.device, "--size", str(args.size), "--width",
        str(args.width), "--layers", *map(str, args.layers), "--workers", str(args.workers), "--test-clips",
        "2", "--log-every", "100000", "--labeled", "1"]


def loader_alone(flags, out, cuda):
    """Clips/s of the stages' own Run, dataset, loader and batches, no model: the second epoch, workers warm."""
    run = train.Run(train.get_args(["--stage", "supervised", "--out", out, *flags]))
    rate = {}
    for mode, bs in (("ssl", 8), ("supervised", 16)):
        loader = run.loader(run.dataset(run.train, "ssl" if mode == "ssl" else "train"), bs)
        for epoch in range(2):
            t, n = time.perf_counter(), 0
            for x, *_ in run.batches(loader, epoch):
                n += x.shape[0]
            if cuda:
                torch.cuda.synchronize()
        rate[mode] = n / (time.perf_counter() - t)
        del loader
    return rate


def stages_alone(flags, out):
    """Clips/s of the real stages (`train.py --stage ...`, OUT/log.jsonl's figure of the second epoch)."""
    rate = {}
    for stage, key, log_name in (("invariant", "ssl", "invariant"), ("supervised", "supervised", "supervised"),
                                 ("semisup", "semisup", "student")):
        if stage == "semisup":  # the second encoder only feeds the scores and a teacher: a copy will do
            shutil.copy(os.path.join(out, "invariant.pt"), os.path.join(out, "distinctive.pt"))
        p = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "train.py"), "--stage",
                            stage, "--out", out, "--epochs", "2", *flags], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{stage} failed:\n{p.stderr[-2000:]}")
        records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        rate[key] = [r for r in records if r["stage"] == log_name][-1]["clips_per_s"]
    return rate


def bench_pipeline(args):
    """Three rows per mode, in clips/s: the training step alone (random input on the device, the kernels the
    stages choose), the loader alone (`loader_alone`), and the real stage (`stages_alone`, worker start-up
    included)."""
    tmp, flags = pipeline_videos(args)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {dev} ({name}), "
          f"width {args.width}, layers {args.layers}, 8x{args.size}x{args.size}, {args.workers} workers, "
          f"AMP {'bf16' if dev.type == 'cuda' else 'off'}")
    torch.backends.cudnn.benchmark = dev.type == "cuda"  # as train.Run sets it
    fns = step_fns(args.width, args.layers, args.size, dev, amp=dev.type == "cuda")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step = {mode: fns[mode][1] / timed(fns[mode][0], args.reps, sync) for mode in ("ssl", "supervised", "semisup")}
    del fns
    loader = loader_alone(flags, os.path.join(tmp, "loader"), dev.type == "cuda")
    stage = stages_alone(flags, os.path.join(tmp, "stages"))
    print("| clips/s | invariant SSL (10 clips / video, 8 videos) | supervised (16 clips) | semisup (8 + 8 clips) |"
          "\n|---|---|---|---|")
    print(f"| step alone | {step['ssl']:.0f} | {step['supervised']:.0f} | {step['semisup']:.0f} |")
    print(f"| loader alone | {loader['ssl']:.0f} | {loader['supervised']:.0f} | - |")
    print(f"| the stage | {stage['ssl']:.0f} | {stage['supervised']:.0f} | {stage['semisup']:.0f} |")
    for key in ("ssl", "supervised"):
        print(f"- {key}: loader / step {loader[key] / step[key]:.2f}, "
              f"stage / min(loader, step) {stage[key] / min(step[key], loader[key]):.2f}")
    print(f"- semisup: stage / step {stage['semisup'] / step['semisup']:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model_flags(p, width=16, layers=[1, 1, 1, 1], size=32, workers=2)
    p.add_argument("--videos", type=int, default=32, help="UCF-like videos to write")
    p.add_argument("--repeat", type=int, default=2, help="times the train list repeats them (one epoch)")
    p.add_argument("--reps", type=int, default=10, help="repetitions of the step alone")
    bench_pipeline(p.parse_args(argv))


if __name__ == "__main__":
    main()
