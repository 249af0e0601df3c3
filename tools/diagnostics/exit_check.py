"""Whether every process of a stage ends with exit code 0: the stage run N times under torchrun, 2 gloo
processes on the CPU, after the encoder it needs, counting the runs that did not end with 0 (and what
the first process to fail printed last):

    python tools/diagnostics/exit_check.py --root data/toy --stage supervised --tries 20
"""
import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/toy", help="toy set (python tools/toy.py DIR writes one)")
    p.add_argument("--stage", default="supervised", help="the stage to repeat")
    p.add_argument("--tries", type=int, default=20, help="how many times")
    p.add_argument("--processes", type=int, default=2, help="processes per run")
    args = p.parse_args(argv)
    out = tempfile.mkdtemp(prefix="exit_check_")
    flags = ["--root", os.path.abspath(args.root), "--device", "cpu", "--width", "8", "--layers", "1", "1", "1",
             "1", "--size", "32", "--epochs", "1", "--workers", "0", "--labeled", "2", "--batch-size", "4",
             "--out", out]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
              os.path.join(ROOT, "train.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run([*launch, "--stage", "invariant", *flags], capture_output=True, text=True, env=env)
    if first.returncode:
        sys.exit(f"the invariant stage failed: {first.stderr.strip().splitlines()[-1:]}")
    failed = 0
    for k in range(args.tries):
        r = subprocess.run([*launch, "--stage", args.stage, *flags], capture_output=True, text=True, env=env)
        if r.returncode:
            failed += 1
            why = [line for line in r.stderr.splitlines() if "terminate" in line or "rror" in line][:1]
            print(f"try {k + 1}: exit {r.returncode} {why}", flush=True)
    print(f"{args.tries - failed} of {args.tries} ended with exit code 0 (--stage {args.stage}, "
          f"{args.processes} processes)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
