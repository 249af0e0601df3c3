"""Benchmarks that print figures (never timed tests): `python tools/diagnostics/bench.py` on the CPU (data path and
training steps), `python tools/diagnostics/bench.py --gpu` for the GPU-scale model (AMP, channels_last_3d),
`python tools/diagnostics/bench.py --estimate` the paper-scale run's hours on one GPU from the released networks' FLOPs;
`tools/diagnostics/pipeline.py` whether the data path keeps up with the training step (docs/performance.md).

Decoding floors: the necessary work only - seek to the keyframe before the first wanted frame, decode to
the last wanted frame, convert each wanted frame once, single-threaded - written here as a bare PyAV loop.
"""

import argparse
import itertools
import math
import os
import resource
import sys
import tempfile
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import models  # noqa: E402
import train  # noqa: E402
from models import compact  # noqa: E402
from tools import toy  # noqa: E402

SIZE = 32  # train.py's --size default


def model_flags(p, width, layers, size, workers):
    """The flags of a bench's model and data path, with its defaults (the pipeline bench, the GPU check)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--width", type=int, default=width, help="compact network's width (64: R3D-18's parameters)")
    p.add_argument("--layers", type=int, nargs=4, default=layers, help="compact network's blocks per stage")
    p.add_argument("--size", type=int, default=size, help="crop size in pixels")
    p.add_argument("--workers", type=int, default=workers, help="DataLoader workers a process")


def count_flops(model, x):
    """Multiply-accumulates x2 of the conv and linear layers for one forward of input x."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        k = m.weight.numel() // (m.out_channels if isinstance(m, nn.Conv3d) else m.out_features)
        total += 2 * k * out.numel()

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


def timed(fn, reps, sync=lambda: None, warmup=1):
    """Seconds per call of fn, after `warmup` calls; `sync` waits for queued GPU work."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def floor_decode(av, path, indices, size):
    """Bare PyAV: seek to the keyframe before min(indices), decode to max(indices), convert wanted ones."""
    wanted = set(indices)
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_count = 1
        rate, tb_, start = s.average_rate, s.time_base, s.start_time or 0
        c.seek(start + int(min(indices) / rate / tb_), stream=s, backward=True)
        for f in c.decode(s):
            i = round((f.pts - start) * tb_ * rate)
            if i in wanted:
                f.reformat(width=size[1], height=size[0], format="rgb24", threads=1)
            if i >= max(indices):
                break


def from_start(av, path, last, size):
    """Decode every frame from the start to `last`, converting each (the naive way)."""
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_count = 1
        for i, f in enumerate(c.decode(s)):
            f.reformat(width=size[1], height=size[0], format="rgb24", threads=1)
            if i >= last:
                break


def bench_decoding(reps):
    import av

    import data

    tmp = tempfile.mkdtemp()
    g = torch.Generator().manual_seed(0)
    files = {
        "UCF-like 320x240 MPEG-4 AVI": (os.path.join(tmp, "ucf.avi"), 240, 320),
        "Kinetics-like 340x256 H.264 MP4": (os.path.join(tmp, "kin.mp4"), 256, 340),
    }
    for path, H, W in files.values():  # 10 s at 25 fps, keyframe every 12 frames
        toy.write_video(path, toy._render(4, 250, H, W, g), gop=12)
    print("\n## Decoding (ms; floor = bare PyAV doing only the necessary work; size 128 short side)")
    print("| file | what | load_frames | floor | ratio | decode all from start | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, (path, H, W) in files.items():
        n = data.count_frames(path)
        out = data._output_size(128, W, H)
        sets = {
            "train clip (8 x stride 2, random start)": lambda: data.train_indices(n, 8, 2, g),
            "SSL clip set (16 x 4 sparse + 4 dense)":
                lambda: (lambda s, d: s + sum(d, []))(*data.ssl_indices(n, 16, 4, g)),
            "test video (10 clips of 8 x 2)": lambda: sum(data.test_indices(n, 8, 2, 10), []),
            "score clip set (4 x 8)": lambda: sum(data.score_indices(n, 8), []),
        }
        for what, draw in sets.items():
            draws = [draw() for _ in range(reps)]
            ours = sum(timed(lambda: data.load_frames(path, d, 128), 1) for d in draws) / reps
            floor = sum(timed(lambda: floor_decode(av, path, d, out), 1) for d in draws) / reps
            naive = sum(timed(lambda: from_start(av, path, max(d), out), 1) for d in draws) / reps
            print(f"| {name} | {what} | {1000 * ours:.1f} | {1000 * floor:.1f} | {ours / floor:.2f} "
                  f"| {1000 * naive:.1f} | {ours / naive:.2f} |")


def bench_toy_loader(root, workers_list, steps_clips):
    import data

    train, test, classes = data.read_ucf101(root, root, 1)
    print("\n## Toy set through VideoDataset (clips/s, one process)")
    for mode, T, k, per in (("train", 8, 2, 1), ("ssl", 8, 4, 10), ("test", 8, 2, 10), ("score", 8, 2, 4)):
        ds = data.VideoDataset(train, root, mode, T, k, SIZE)
        dt = timed(lambda: [ds[i] for i in range(16)], 1) / 16
        print(f"- {mode}: {1000 * dt:.1f} ms per item, {per / dt:.0f} clips/s")
    print("\n## Loader (train clips, batch 16) vs step, clips/s")
    ds = data.VideoDataset(train, root, "train", 8, 2, SIZE)
    for w in workers_list:
        loader = torch.utils.data.DataLoader(ds, 16, shuffle=True, num_workers=w, collate_fn=data.collate)
        t = time.perf_counter()
        n = sum(data.augment_on_device(x, p).shape[0] for x, p, *_ in loader)  # the float half too, as train.py does
        print(f"- workers {w}: loader {n / (time.perf_counter() - t):.0f} clips/s vs supervised step "
              f"{steps_clips:.0f} clips/s")


def step_fns(width, layers, size, device, amp=False, channels_last=False, K=8, T_ssl=8):
    """The training steps of train.py on random input, each the body of `train.fit`'s loop as it runs (the
    learning rate, the stage's terms, backward and step, the terms added to the sums on the device; the
    sums are read only every --log-every steps): the invariant and distinctive stages (10 clips per video of
    T_ssl frames, L_I / L_D), supervised and the semisup student (its default batch of labeled and as many
    unlabeled clips, its default forward, both teachers), the classifiers' clips 8 frames."""
    import train

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format

    def model(**kw):
        return compact(width, layers, **kw).to(device, memory_format=fmt)

    def clips(n, T=8):
        return torch.randn(n, 3, T, size, size, device=device).contiguous(memory_format=fmt)

    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    clf, ssl = model(num_classes=K), model(proj_dim=128)
    teachers = [model(num_classes=K).eval().requires_grad_(False) for _ in range(2)]
    opt_c, opt_s = torch.optim.Adam(clf.parameters()), torch.optim.Adam(ssl.parameters())
    B = train.STEPS["supervised"][2]  # the stages' batches: 16 clips (supervised), 8 videos (SSL)
    h = train.STEPS["semisup"][2]  # the student's: h labeled + h unlabeled clips
    x_sup, y_sup, y = clips(B), torch.randint(0, K, (B,), device=device), torch.randint(0, K, (2 * h,), device=device)
    x_ssl, x_semi, s = clips(10 * (B // 2), T_ssl), clips(2 * h), torch.rand(2 * h, device=device)
    forward = train.parser().get_default("student_forward")
    args = argparse.Namespace(w_labeled=50.0, w_unlabeled=100.0, distill="mse", student_forward=forward)

    def loop_step(opt, terms_of, n):
        sums, step = {}, iter(range(10**9))

        def fn():
            lr = train.lr_at(next(step), 10**9, 1e-3, 10)
            for group in opt.param_groups:
                group["lr"] = lr
            terms = terms_of()
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()

        return fn, n

    def teacher_fwd():
        with torch.no_grad(), autocast():
            return [t(x_semi).float().softmax(-1) for t in teachers]

    def student_only():
        return train.classifier_terms(clf, x_semi, y, autocast)

    return {
        "ssl": loop_step(opt_s, lambda: train.ssl_terms(ssl, x_ssl, "invariant", 0.1, autocast), 10 * (B // 2)),
        "distinctive": loop_step(opt_s, lambda: train.ssl_terms(ssl, x_ssl, "distinctive", 0.1, autocast),
                                 10 * (B // 2)),
        "supervised": loop_step(opt_c, lambda: train.classifier_terms(clf, x_sup, y_sup, autocast), B),
        "semisup": loop_step(opt_c, lambda: train.student_terms(clf, teachers, x_semi[:h], y[:h], x_semi[h:], s,
                                                                args, autocast), 2 * h),
        "_student": loop_step(opt_c, student_only, 2 * h),
        "_teachers": (teacher_fwd, 2 * h),
    }


def bench_steps_cpu(reps, size=SIZE):
    dev = torch.device("cpu")
    m = compact(16, (1, 1, 1, 1), num_classes=8)
    print(f"\n## Default model (width 16, 1 block per stage) at 8x{size}x{size}: "
          f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters (classifier), "
          f"{count_flops(m, torch.zeros(1, 3, 8, size, size)) / 1e9:.3f} GFLOPs per clip forward")
    fns = step_fns(16, (1, 1, 1, 1), size, dev)
    times = {k: timed(fn, reps) for k, (fn, _) in fns.items()}
    print("| step | clips/s (forward + backward) |\n|---|---|")
    for k in ("supervised", "ssl", "semisup"):  # ssl: the invariant stage's step (L_I)
        print(f"| {k} | {fns[k][1] / times[k]:.0f} |")
    parts = times["_student"] + times["_teachers"]
    print(f"- semisup step {1000 * times['semisup']:.0f} ms vs its parts (student fwd+bwd "
          f"{1000 * times['_student']:.0f} ms + both teachers no-grad fwd {1000 * times['_teachers']:.0f} ms): "
          f"ratio {times['semisup'] / parts:.2f}")
    print(f"- peak resident memory of this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return fns["supervised"][1] / times["supervised"]


def bench_gpu():
    dev = torch.device("cuda")
    print(f"\n## GPU: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    print("| model | input | AMP bf16 | channels_last_3d | supervised clips/s | SSL clips/s | semisup clips/s "
          "| peak GiB |\n|---|---|---|---|---|---|---|---|")
    for size, amp, cl in itertools.product((112, 224), (False, True), (False, True)):
        torch.cuda.reset_peak_memory_stats()
        fns = step_fns(64, (2, 2, 2, 2), size, dev, amp, cl)
        row = [fns[k][1] / timed(fns[k][0], 10, torch.cuda.synchronize, 3) for k in ("supervised", "ssl", "semisup")]
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"| compact, width 64, 2-2-2-2 | 8x{size}x{size} | {amp} | {cl} | "
              + " | ".join(f"{v:.0f}" for v in row) + f" | {peak:.1f} |", flush=True)
        del fns
        torch.cuda.empty_cache()


def flops(arch, T, S):
    """Forward FLOPs of one clip (T, S, S) through the network's backbone, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        models.build(arch).features(torch.empty(1, 3, T, S, S))
    return counter.get_total_flops()


def estimate(arch="r3d50", peak=989e12, fraction=0.3, videos=9537, test=3783, labeled=101, ssl_epochs=1000):
    """Hours of each step of --recipe released on one GPU of `peak` FLOP/s at `fraction` of it, from the FLOPs of
    `arch`'s backbone (heads and classifier: under 0.01 %) at the recipe's clips, a training clip's forward and
    backward as 3 forwards. UCF101 split 1: `videos` training and `test` test videos, 1 % labeled = 1 a class."""
    R, (ssl_e, _, _, _), (cls_e, _, bs, _) = train.RELEASED, train.RELEASED_STEPS["invariant"], train.RELEASED_STEPS["semisup"]
    f_ssl, f_clip = flops(arch, R["ssl_frames"], R["size"]), flops(arch, R["frames"], R["size"])
    rate, steps = peak * fraction, math.ceil(labeled / bs)  # the labeled epoch, its last batch kept
    evaluation = test * R["test_clips"] * f_clip  # one test-split evaluation: 10 clips a video
    rows = [("each SSL encoder (invariant, distinctive, both), an epoch", videos * 10 * 3 * f_ssl),
            (f"each SSL encoder, {ssl_epochs} epochs", ssl_epochs * videos * 10 * 3 * f_ssl),
            ("scores: 4 clips a video through both encoders", videos * 4 * 2 * f_ssl),
            (f"each teacher, {cls_e} epochs of {steps} steps and its evaluation", cls_e * labeled * 3 * f_clip + evaluation),
            (f"student, {cls_e} epochs of {steps} steps of {bs} + {bs} clips (teachers' forwards too)",
             cls_e * steps * 2 * bs * (3 + 2) * f_clip + evaluation)]
    print(f"## {arch} at the recipe's clips: {f_ssl / 1e9:.1f} GFLOPs per {R['ssl_frames']}x{R['size']}x{R['size']} "
          f"SSL clip, {f_clip / 1e9:.1f} per {R['frames']}x{R['size']}x{R['size']} clip (forward); one GPU at "
          f"{fraction:g} of {peak / 1e12:g} TFLOP/s\n| step | PFLOPs | hours |\n|---|---|---|")
    for what, total in rows:
        print(f"| {what} | {total / 1e15:.1f} | {total / rate / 3600:.3g} |")
    return {what: total / rate / 3600 for what, total in rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--estimate", action="store_true", help="print the paper-scale estimate (no benchmark)")
    p.add_argument("--gpu", action="store_true", help="benchmark the GPU-scale model instead")
    p.add_argument("--reps", type=int, default=10, help="repetitions per figure")
    p.add_argument("--toy", type=str, default="data/toy", help="toy dataset folder (generated if missing)")
    args = p.parse_args()
    if args.estimate:
        for arch in ("r3d50", "r3d18"):
            estimate(arch)
        return
    if args.gpu:
        bench_gpu()
        return
    if not os.path.exists(os.path.join(args.toy, "classInd.txt")):
        toy.make_toy(args.toy)
    bench_decoding(args.reps)
    step = bench_steps_cpu(args.reps)
    bench_toy_loader(args.toy, (0, 1, 2), step)


if __name__ == "__main__":
    main()
