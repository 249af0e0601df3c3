"""Whether the data path keeps up with the training step, in steady state, on UCF-like videos it writes itself
(320x240, 7 s, MPEG-4 AVI; none kept decoded in memory: --cache-mb 0). For each stage (invariant, distinctive,
supervised, semisup) a row in clips/s, printed as it ends (docs/performance.md):

  step alone    the stage's step (its terms, backward, Adam; `tools/diagnostics/bench.py`'s step_fns) on random input of its
                real clip shapes: --steps steps after as many warm-up ones, the median of 3 repeats (CUDA events)
  loader alone  the stage's own loaders (semisup: both, zipped), each batch copied to the device and finished
                there (`train.Run.batches`), no model: at least --batches batches after the first
  the stage     `train.py --stage ...` for --epochs epochs: its epochs 2 on (each epoch's own clips and wall
                time in OUT/log.jsonl), so worker start-up and the first epoch's set-up are not in it

and stage / min(loader, step). On CUDA with nvidia-smi, the GPU's utilisation and power every 200 ms over each
stage (OUT/gpu_<stage>.csv); with --profile, torch.profiler over 10 steady steps of supervised and invariant on
their real data path: the top kernels by self CUDA time, the top host ops by self CPU time, the GPU busy share.

    python tools/diagnostics/pipeline.py                  # the CPU defaults
    python tools/diagnostics/pipeline.py --device cuda --width 64 --layers 2 2 2 2 --size 112 --workers 14 --videos 240 \
        --repeat 4 --profile --out /tmp/pipeline
"""
import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the four modules
import data  # noqa: E402
import train  # noqa: E402
from tools import toy  # noqa: E402
from tools.diagnostics.bench import model_flags, step_fns  # noqa: E402

STAGES = {"invariant": ("ssl", "invariant"), "distinctive": ("distinctive", "distinctive"),
          "supervised": ("supervised", "supervised"), "semisup": ("semisup", "student")}  # step_fns key, log name


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
    """args.videos UCF-like videos written into OUT/videos (one process a core), their lists, and the flags of
    train.py that read them."""
    root = os.path.join(args.out, "videos")
    os.makedirs(root, exist_ok=True)
    rels = [f"v{i:04d}.avi" for i in range(args.videos)]
    t = time.perf_counter()
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.starmap(write_ucf_like, [(os.path.join(root, r), i) for i, r in enumerate(rels)])
    print(f"\n## Pipeline: {args.videos} UCF-like videos (320x240, 7 s, MPEG-4 AVI) written in "
          f"{time.perf_counter() - t:.0f} s; train list = them x {args.repeat}", flush=True)
    data.write_lines(os.path.join(root, "train.txt"), [f"{r} {i % K}" for i, r in enumerate(rels)] * args.repeat)
    data.write_lines(os.path.join(root, "test.txt"), [f"{r} {i % K}" for i, r in enumerate(rels[:K])])
    return ["--dataset", "list", "--root", root, "--train-list", os.path.join(root, "train.txt"), "--test-list",
            os.path.join(root, "test.txt"), "--device", args.device, "--size", str(args.size), "--width",
            str(args.width), "--layers", *map(str, args.layers), "--workers", str(args.workers), "--ssl-frames",
            str(args.ssl_frames), "--test-clips", "2", "--log-every", "100000", "--labeled", "0.1",
            "--cache-mb", "0"]


def step_alone(fn, clips, steps, device, repeats=3):
    """Clips/s of fn, a training step of `clips` clips: `steps` warm-up steps, then the median of `repeats`
    timings of `steps` steps (on CUDA between events, which time the GPU's work without waiting inside)."""
    for _ in range(steps):
        fn()
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            seconds = time.perf_counter() - t
        rates.append(clips * steps / seconds)
    return statistics.median(rates)


def stage_loaders(run, stage):
    """The loaders a stage zips, built by train.py's own builders."""
    bs = train.hparams(run.args, stage)[2]
    if stage in ("invariant", "distinctive"):
        return [run.loader(run.dataset(run.train, "ssl"), bs)]
    return [train.classifier_loader(run, bs)] if stage == "supervised" else train.student_loaders(run, bs)


def loader_alone(run, stage, batches):
    """Clips/s of the stage's loaders through `run.batches` (copy, `data.augment_on_device`), no model. The batches
    the workers prefetched while starting (prefetch_factor 2 a worker) are not timed, then exactly `batches`
    batches, over as many epochs as it takes (stopping inside an epoch)."""
    loaders = stage_loaders(run, stage)
    skip = 1 + 2 * max(loader.num_workers for loader in loaders)
    n, clips, epoch = 0, 0, 0
    while n < skip + batches:
        for group in zip(*(run.batches(loader, epoch) for loader in loaders)):
            n += 1
            if n == skip:
                t = time.perf_counter()
            elif n > skip:
                clips += sum(x.shape[0] for x, *_ in group)
            if n == skip + batches:
                break
        epoch += 1
    if run.cuda:
        torch.cuda.synchronize()
    return clips / (time.perf_counter() - t)


def gpu_summary(rows, start, end):
    """nvidia-smi's samples (timestamp, utilisation %, power W, memory MiB as it prints them) from `start` to
    `end` (seconds since the epoch): the stage's steady part. A field it reports as [N/A] is left out."""
    def t(stamp):
        return datetime.datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
    rows = [r for r in rows if start <= t(r[0]) <= end]
    util, power = ([float(r[k]) for r in rows if r[k].strip() not in ("", "[N/A]")] for k in (1, 2))
    parts = [f"GPU utilisation mean {statistics.mean(util):.0f} % (median {statistics.median(util):.0f})"
             ] if util else []
    parts += [f"power mean {statistics.mean(power):.0f} W"] if power else []
    return (", ".join(parts) or "no GPU sample") + f" over the steady epochs ({len(rows)} samples)"


def workers_that_fit(workers, batch_bytes, shm_bytes):
    """Workers whose batches in flight (2 a worker, prefetched, plus one being handed over) fit in 0.8 of
    /dev/shm, which holds them: a small /dev/shm (64 MB in some containers) otherwise ends the first batch
    with a bus error."""
    fit = int(0.8 * shm_bytes // batch_bytes - 1) // 2
    return max(0, min(workers, fit))


def stage_run(flags, out, stage, epochs):
    """Clips/s of `train.py --stage stage` over its epochs 2 on, from OUT/log.jsonl, and on CUDA nvidia-smi's
    samples over the same epochs (from the moment epoch 1's line is logged to the moment the last one's is)."""
    smi, log_path = None, os.path.join(out, "run", "log.jsonl")
    if "cuda" in flags[flags.index("--device") + 1] and shutil.which("nvidia-smi"):
        csv = open(os.path.join(out, f"gpu_{stage}.csv"), "w")
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,power.draw,memory.used",
                                "--format=csv,noheader,nounits", "-lms", "200"], stdout=csv)
    logged = len(open(log_path).readlines()) if os.path.exists(log_path) else 0
    with open(os.path.join(out, f"stage_{stage}.txt"), "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "..", "..", "train.py"), "--stage",
                                 stage, "--out", os.path.join(out, "run"), "--epochs", str(epochs), *flags],
                                stdout=subprocess.DEVNULL, stderr=err)
        seen = {}  # lines of log.jsonl -> when they were first seen
        while proc.poll() is None:
            n = len(open(log_path).readlines()) if os.path.exists(log_path) else 0
            seen.setdefault(n, time.time())
            time.sleep(0.1)
    if smi:
        smi.terminate()
        smi.wait()
        csv.close()
    if proc.returncode:
        sys.exit(f"{stage} failed:\n{open(os.path.join(out, f'stage_{stage}.txt')).read()[-2000:]}")
    log = [json.loads(line) for line in open(os.path.join(out, "run", "log.jsonl"))]
    log = [r for r in log if r["stage"] == STAGES[stage][1] and r["run"] == log[-1]["run"]]
    walls = [0.0] + [r["wall_s"] for r in log]
    steady = [(r["clips_per_s"] * (w1 - w0), w1 - w0) for r, w0, w1 in zip(log, walls, walls[1:]) if r["epoch"] >= 2]
    rate = sum(c for c, _ in steady) / sum(s for _, s in steady)
    if not smi:
        return rate, ""
    rows = [line.split(", ") for line in open(os.path.join(out, f"gpu_{stage}.csv")) if line.count(",") == 3]
    start, end = seen.get(logged + 1, time.time()), seen.get(logged + epochs, time.time())
    return rate, gpu_summary(rows, start, end)


def profile(flags, out, stage, steps=10):
    """torch.profiler over `steps` steady steps of `stage` on its real data path, after as many steps as the
    workers prefetch while starting and `steps` more, as `train.fit` runs them: its tables into
    OUT/profile_<stage>.txt, a summary printed."""
    run = train.Run(train.get_args(["--stage", stage, "--out", os.path.join(out, "profile"), *flags]))
    ssl = stage == "invariant"
    model = run.model(proj_dim=128) if ssl else run.model(num_classes=len(run.classes), dropout=run.args.dropout)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    batches = (b for epoch in range(10**6) for b in run.batches(stage_loaders(run, stage)[0], epoch))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if run.cuda else [])
    warm = steps + 1 + 2 * run.args.workers  # past the batches prefetched while the workers started
    for k in range(warm + steps):
        if k == warm:
            prof = torch.profiler.profile(activities=activities)
            prof.__enter__()
            t = time.perf_counter()
        x, y, *_ = next(batches)
        terms = train.ssl_terms(model, x, stage, 0.1, run.autocast) if ssl else \
            train.classifier_terms(model, x, y, run.autocast)
        opt.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        opt.step()
    if run.cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    prof.__exit__(None, None, None)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    tables = [events.table(sort_by="self_device_time_total", row_limit=12) if run.cuda else "",
              events.table(sort_by="self_cpu_time_total", row_limit=12)]
    with open(os.path.join(out, f"profile_{stage}.txt"), "w") as f:
        f.write("\n\n".join(tables))
    busy = (f"GPU busy {100 * device_us / 1e6 / wall:.0f} % of the wall time" if device_us else
            "GPU busy not measured (no CUDA kernel recorded: is CUPTI missing?)") if run.cuda else "no GPU"
    top_host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:3]
    print(f"- profile of {steps} steady {stage} steps: {wall:.2f} s, {busy}; top host ops: " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms" for e in top_host), flush=True)


def bench_pipeline(args):
    """The three rows of each stage in --stages order (the encoders before semisup, which needs them)."""
    os.makedirs(args.out, exist_ok=True)
    flags = pipeline_videos(args)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {dev} ({name}), width {args.width}, layers {args.layers}, {args.ssl_frames} SSL / 8 frames at "
          f"{args.size} px, {args.workers} workers, AMP {'bf16' if dev.type == 'cuda' else 'off'}", flush=True)
    torch.backends.cudnn.benchmark = dev.type == "cuda"  # as train.Run sets it
    print("| stage | step alone | loader alone | the stage (epochs 2 on) | stage / min(loader, step) | loader / step |"
          "\n|---|---|---|---|---|---|", flush=True)
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    if shm:  # the largest batch in flight: an SSL batch of uint8 clips
        batch = train.STEPS["invariant"][2] * 10 * 3 * args.ssl_frames * args.size**2
        fit = workers_that_fit(args.workers, batch, shm.f_bavail * shm.f_frsize)
        print(f"/dev/shm: {shm.f_bavail * shm.f_frsize / 2**20:.0f} MiB free; SSL batches of {batch / 2**20:.0f} MiB"
              + (f": --workers lowered from {args.workers} to {fit}" if fit < args.workers else ""), flush=True)
        flags[flags.index("--workers") + 1], args.workers = str(fit), fit
    run = train.Run(train.get_args(["--stage", "semisup", "--out", os.path.join(args.out, "loader"), *flags]))
    for stage in args.stages:
        key = STAGES[stage][0]
        fns = step_fns(args.width, args.layers, args.size, dev, amp=dev.type == "cuda", T_ssl=args.ssl_frames)
        fn, clips = fns[key]
        step = step_alone(fn, clips, args.steps, dev)
        del fn, fns
        loader = loader_alone(run, stage, args.batches)
        rate, gpu = stage_run(flags, args.out, stage, args.epochs)
        print(f"| {stage} | {step:.0f} | {loader:.0f} | {rate:.0f} | {rate / min(step, loader):.2f} | "
              f"{loader / step:.2f} |" + (f" {gpu}" if gpu else ""), flush=True)
    if args.profile:
        for stage in ("supervised", "invariant"):
            profile(flags, args.out, stage)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(p, width=16, layers=[1, 1, 1, 1], size=32, workers=2)
    p.add_argument("--ssl-frames", type=int, default=8, help="frames of the SSL clips (the classifiers': 8)")
    p.add_argument("--videos", type=int, default=32, help="UCF-like videos to write")
    p.add_argument("--repeat", type=int, default=2, help="times the train list repeats them (one epoch)")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="the stages measured")
    p.add_argument("--steps", type=int, default=10, help="steps of each timing of the step alone")
    p.add_argument("--batches", type=int, default=300, help="batches of the loader alone, after the first")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each stage (the first is left out)")
    p.add_argument("--profile", action="store_true", help="torch.profiler over 10 steady steps (supervised, invariant)")
    p.add_argument("--out", default=None, help="folder of the videos, runs, GPU samples, profiles (default: temporary)")
    args = p.parse_args(argv)
    args.out = args.out or tempfile.mkdtemp()
    bench_pipeline(args)


if __name__ == "__main__":
    main()
