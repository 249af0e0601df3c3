"""The demo, the README's first command: the toy set written into --root (default data/toy) where it is
missing or of another version, then the seed ablation on it (`tools/ablation.py`), then a report page for
its folder and each seed's (`tools/report.py`). Every flag of the ablation applies, --dataset aside:

    python tools/demo.py                      # seeds 0 1 2 into runs/default
    torchrun --nproc_per_node=2 tools/demo.py --device cpu
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import train  # noqa: E402
from tools import ablation, report, toy  # noqa: E402


def write_toy_once(args):
    """The toy set in --root, written by the first process where it is missing or of another version; every
    process waits for it (the process group is started here, as `train.Run` would)."""
    world, rank, _ = train.start_processes(args.device)
    if rank == 0 and toy.toy_version(args.root) != toy.TOY_VERSION:
        print(f"generating the toy dataset in {args.root}", flush=True)
        toy.make_toy(args.root)
    if world > 1:
        train.dist.barrier()


def demo(args):
    write_toy_once(args)
    runs = ablation.ablation(args)
    if runs[-1].rank == 0:  # each seed's page first, so that the ablation's page links to them
        pages = [report.report(run.args.out) for run in runs] + [report.report(args.out)]
        print(f"report: {pages[-1]} (and one per seed, {', '.join(pages[:-1])})")


def main(argv=None):
    p = ablation.parser()
    p.description = __doc__
    args = train.get_args(argv, p)
    if args.dataset != "toy":
        p.error(f"the demo runs on the toy set: python tools/ablation.py --dataset {args.dataset} ...")
    train.command(lambda: demo(args))


if __name__ == "__main__":
    main()
