"""The GPU check, one command for a CUDA machine (under 8 minutes on one H100/H200 at the defaults), on data
it writes itself into a fresh folder OUT/<date-time>-<pid>:

    python tools/diagnostics/gpu_check.py                                   # a CUDA machine: compact, width 64, 2-2-2-2, at 112 px
    python tools/diagnostics/gpu_check.py --device cpu --width 8 --layers 1 1 1 1 --size 32 --epochs 1 --workers 0

Its parts, each printed as a row the moment it ends: each stage in one process (clips/s of its last epoch),
eval and predict of the student; the same stages in N processes under torchrun where N >= 2 GPUs are
visible (NCCL; on a CPU, 2 gloo processes; with one GPU the row says NOT RUN, and a probe tries the
collectives train.py uses with 2 gloo processes on that one GPU, naming the first that refuses); the CUDA
tests; the pipeline bench. Every part runs under a time limit and is FAILED past it; the check exits 1 if
any part FAILED.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import models  # noqa: E402
import train  # noqa: E402
from tools import toy  # noqa: E402
from tools.diagnostics.bench import model_flags  # noqa: E402

STAGES = (("invariant", "invariant"), ("distinctive", "distinctive"), ("semisup", "student"),
          ("supervised", "supervised"))  # (stage, the log.jsonl name of its last step)


class Check:
    """The rows of the check: each part runs under the time left (at most --timeout), and its row is printed
    as soon as it ends."""

    def __init__(self, args, out):
        self.args, self.out, self.t0, self.failed = args, out, time.time(), []

    def part(self, name, cmd, how=None):
        """Runs cmd (output into OUT/<name>.log); the row is how(output) or "ok", FAILED on a non-zero exit
        or past the time limit. Returns the output, or None if the part failed."""
        limit = min(self.args.timeout, self.args.budget - (time.time() - self.t0))
        t, log = time.time(), os.path.join(self.out, name.replace(" ", "_") + ".log")
        try:
            if limit <= 0:
                raise subprocess.TimeoutExpired(cmd, 0)
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=limit,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
            text, code = p.stdout + p.stderr, p.returncode
            result = f"FAILED (exit {code}: {(text.strip().splitlines() or ['no output'])[-1][:70]})" if code \
                else (how(text) if how else "ok")
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            result = f"FAILED (timed out after {limit:.0f} s)" if limit > 0 else "FAILED (no time left)"
        with open(log, "w") as f:
            f.write(text)
        self.row(name, result, time.time() - t)
        return None if result.startswith("FAILED") else text

    def row(self, name, result, seconds=0.0):
        if result.startswith("FAILED"):
            self.failed.append(name)
        print(f"| {name} | {result} | {seconds:.0f} s |", flush=True)


def stages(check, launcher, flags, out, label):
    """Each stage with `launcher` into `out`, then eval and predict of its student."""
    for stage, name in STAGES:
        cmd = [*launcher, "train.py", "--stage", stage, *flags, "--out", out]
        check.part(f"{stage}, {label}", cmd, lambda text, name=name: last_rate(out, name))
    student = os.path.join(out, "student.pt")
    check.part(f"eval, {label}", [*launcher, "tools/evaluate.py", "--ckpt", student, *flags, "--out", out])
    video = os.path.join(flags[flags.index("--root") + 1], "Disk", "v_Disk_g00_c01.avi")
    check.part(f"predict, {label}", [sys.executable, "tools/predict.py", "--ckpt", student,
                                     "--device", check.args.device, video])


def probe_result(text):
    """The probe's line in torchrun's output (which adds its own lines around it)."""
    lines = [line for line in text.splitlines() if line.startswith(("ran:", "refused"))]
    return lines[-1] if lines else "FAILED (the probe printed no result)"


def last_rate(out, stage_name):
    """Clips/s of the last epoch of `stage_name` in OUT/log.jsonl."""
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return f"{[r for r in records if r['stage'] == stage_name][-1]['clips_per_s']:.0f} clips/s"


def gloo_probe(device):
    """In each of 2 processes under torchrun, on the same `device`, gloo: the objective's gather and its
    backward (all_gather, all_reduce), then a DDP step of a SyncBatchNorm model; rank 0 prints the first
    collective that refused, or that all ran."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    done = []
    try:
        x = torch.randn(4, 8, device=device, requires_grad=True)
        train.GatherVideos.apply(x).square().sum().backward()  # all_gather, then all_reduce of the gradient
        done.append("all_gather + all_reduce")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(models.compact(width=4, num_classes=3)).to(device)
        net = torch.nn.parallel.DistributedDataParallel(model)
        net(torch.randn(2, 3, 4, 16, 16, device=device)).square().mean().backward()  # SyncBatchNorm, DDP
        done.append("DDP step with SyncBatchNorm")
        result = "ran: " + ", ".join(done)
    except Exception as e:  # the row names what refused
        result = f"refused after [{', '.join(done)}]: {type(e).__name__}: {str(e).strip().splitlines()[0][:90]}"
    if dist.get_rank() == 0:
        print(result, flush=True)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(p, width=64, layers=[2, 2, 2, 2], size=112, workers=8)
    p.add_argument("--out", default="runs/gpu_check", help="each run writes a fresh folder in it")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every stage")
    p.add_argument("--timeout", type=float, default=240, help="seconds a part may take before it is FAILED")
    p.add_argument("--budget", type=float, default=470,
                   help="seconds for all the parts; none runs past it")
    p.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True, help="the CUDA tests")
    p.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True, help="the pipeline bench")
    p.add_argument("--gloo-probe", action="store_true", help=argparse.SUPPRESS)  # one process of the probe
    args = p.parse_args(argv)
    if args.gloo_probe:
        return gloo_probe(torch.device(args.device))
    cuda = args.device == "cuda"
    out = os.path.abspath(os.path.join(args.out, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
    os.makedirs(out)  # fresh: nothing of an earlier check is reused or reported
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, compact width {args.width} layers {args.layers}, {args.size} px, "
          f"{args.epochs} epochs, {args.workers} workers, {time.strftime('%Y-%m-%d')}; logs in {out}\n\n"
          "| part | result | time |\n|---|---|---|", flush=True)
    root = os.path.join(out, "toy")
    toy.make_toy(root, train_per_class=8, test_per_class=2, frames=48, size=max(64, args.size * 8 // 7 + 8))
    check = Check(args, out)
    flags = ["--root", root, "--device", args.device, "--width", str(args.width), "--layers",
             *map(str, args.layers), "--size", str(args.size), "--epochs", str(args.epochs), "--workers",
             str(args.workers), "--labeled", "2", "--batch-size", "4"]
    stages(check, [sys.executable], flags, os.path.join(out, "one"), "1 process")
    n = torch.cuda.device_count() if cuda else 2
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={max(n, 2)}"]
    if n >= 2:
        stages(check, torchrun, flags, os.path.join(out, "many"), f"{n} processes")
    else:
        check.row("multi-process CUDA", f"NOT RUN ({n} GPU: no process group, DDP, SyncBatchNorm or NCCL)")
        check.part("2 gloo processes on 1 GPU (probe)", [*torchrun, __file__, "--gloo-probe", "--device",
                                                        args.device], probe_result)
    if args.tests:
        check.part("CUDA tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                  os.path.join(ROOT, "tests", "test_train.py"), "-k", "cuda or gpus or nccl"],
                   lambda text: text.strip().splitlines()[-1])
    if args.bench:
        bench = [sys.executable, "tools/diagnostics/pipeline.py", "--device", args.device, "--width", str(args.width),
                 "--layers", *map(str, args.layers), "--size", str(args.size), "--workers", str(args.workers),
                 "--videos", "48", "--repeat", "2"]
        text = check.part("pipeline bench", bench)
        print("\n".join(line for line in (text or "").splitlines() if line.startswith(("|", "- ", "device"))))
    print(f"\n{len(check.failed)} part(s) FAILED{': ' + ', '.join(check.failed) if check.failed else ''}; "
          f"wall time {time.time() - check.t0:.0f} s", flush=True)
    sys.exit(1 if check.failed else 0)


if __name__ == "__main__":
    main()
