"""Every GPU check in one run, for a machine with CUDA: the CUDA tests, each stage for --epochs in one process
and under torchrun on every visible GPU, and the pipeline bench, on data it writes itself (the R3D-18 layout
at 112 px by default: under 10 minutes on one H100); it ends with one table. `--device cpu` with tiny sizes
runs the same steps on a CPU (2 gloo processes), which is how it is tested:

    python tools/gpu_check.py                                    # a CUDA machine
    python tools/gpu_check.py --device cpu --width 8 --layers 1 1 1 1 --size 32 --epochs 1 --workers 0
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import data  # noqa: E402
from tools import toy  # noqa: E402

STAGES = (("invariant", "invariant"), ("distinctive", "distinctive"), ("semisup", "student"),
          ("supervised", "supervised"))  # (stage, the log.jsonl name of its last step)


def run(cmd, log):
    """Runs cmd, its output into `log`; returns (exit code, seconds, output)."""
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    with open(log, "w") as f:
        f.write(p.stdout + p.stderr)
    return p.returncode, time.time() - t, p.stdout + p.stderr


def stages(args, flags, out, launcher, rows, key):
    """Each stage of STAGES with `launcher`, then eval and predict of the student: rows[stage][key] = clips/s
    of its last epoch, or the failure."""
    for stage, name in STAGES + (("eval", None), ("predict", None)):
        extra = ["--ckpt", os.path.join(out, "student.pt")] if name is None else []
        if stage == "predict":
            extra += [os.path.join(args.out, "toy", "Disk", "v_Disk_g00_c01.avi")]
            cmd = [sys.executable, "train.py", "--stage", stage, "--device", args.device, *extra]
        else:
            cmd = [*launcher, "train.py", "--stage", stage, *flags, "--out", out, *extra]
        code, seconds, text = run(cmd, os.path.join(out + f"_{stage}.log"))
        if code:
            rows.setdefault(stage, {})[key] = f"FAILED ({text.strip().splitlines()[-1][:60]})"
        elif name is None:
            rows.setdefault(stage, {})[key] = f"ok, {seconds:.0f} s"
        else:
            records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
            last = [r for r in records if r["stage"] == name][-1]
            rows.setdefault(stage, {})[key] = f"{last['clips_per_s']:.0f} clips/s"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the data, runs and logs")
    p.add_argument("--width", type=int, default=64, help="R3D width (64: the R3D-18 layout)")
    p.add_argument("--layers", type=int, nargs=4, default=[2, 2, 2, 2], help="residual blocks per stage")
    p.add_argument("--size", type=int, default=112, help="crop size in pixels")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every stage")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers a process")
    p.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True, help="the pipeline bench")
    args = p.parse_args()
    t0, rows, lines = time.time(), {}, []
    cuda = args.device == "cuda"
    n = torch.cuda.device_count() if cuda else 2
    toy = os.path.join(args.out, "toy")
    if not os.path.exists(os.path.join(toy, "toy.json")):
        side = max(64, args.size * 8 // 7 + 8)  # frames a little larger than the crop's decoding size
        toy.make_toy(toy, train_per_class=8, test_per_class=2, frames=48, size=side)
    flags = ["--root", toy, "--device", args.device, "--width", str(args.width), "--layers",
             *map(str, args.layers), "--size", str(args.size), "--epochs", str(args.epochs), "--workers",
             str(args.workers), "--labeled", "2", "--batch-size", "4"]

    # 1. the CUDA tests (skipped on a CPU)
    code, _, text = run([sys.executable, "-m", "pytest", "-q", os.path.join(ROOT, "tests", "test_train.py"), "-k",
                         "cuda or gpus or nccl"], os.path.join(args.out, "tests.log"))
    lines.append(f"CUDA tests: {(text.strip().splitlines() or ['no output'])[-1]}")
    # 2. each stage in one process, 3. under torchrun on every GPU (2 gloo processes on a CPU)
    stages(args, flags, os.path.join(args.out, "one"), [sys.executable], rows, "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port=29531"]
    stages(args, flags, os.path.join(args.out, "many"), torchrun, rows, "many")
    # 4. the pipeline bench: step alone, loader alone, the stage
    if args.bench:
        code, _, text = run([sys.executable, os.path.join(HERE, "bench.py"), "--pipeline", "--device",
                             args.device, "--width", str(args.width), "--layers", *map(str, args.layers),
                             "--size", str(args.size), "--workers", str(args.workers), "--videos", "48",
                             "--repeat", "2"], os.path.join(args.out, "bench.log"))
        table = [line for line in text.splitlines() if re.match(r"^(\||- |device)", line)]
        lines += table or ["bench FAILED"]

    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{name}, torch {torch.__version__}, R3D width {args.width} layers {args.layers}, "
          f"{args.size} px, {args.epochs} epochs, {args.workers} workers, {time.strftime('%Y-%m-%d')}\n")
    print(f"| stage | 1 process | {n} processes (torchrun) |\n|---|---|---|")
    for stage, cells in rows.items():
        print(f"| {stage} | {cells.get('one', '-')} | {cells.get('many', '-')} |")
    print("\n" + "\n".join(lines) + f"\n\nwall time {time.time() - t0:.0f} s; logs in {args.out}")
    failed = [stage for stage, cells in rows.items() if any("FAILED" in c for c in cells.values())]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
