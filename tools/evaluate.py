"""A trained classifier's test top-1 on a dataset (a teacher, the student, supervised), overall and per class,
recorded in --out's results.json and per_class.json as eval_<name> beside the training stage's own figure:

    python tools/evaluate.py --ckpt runs/default/student.pt --dataset ucf101 --root UCF-101 --out runs/eval

The network and its clips' length and size come from the checkpoint; the data, --test-clips and --test-crop as
given. An unreadable test video is counted wrong and named.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import train  # noqa: E402
from tools.predict import with_checkpoint_clips  # noqa: E402


def evaluate(args):
    ckpt = train.load_checkpoint(args.ckpt, "classifier")
    args = with_checkpoint_clips(args, ckpt)
    run = train.Run(args, "eval")
    name = "eval_" + os.path.basename(args.ckpt).removesuffix(".pt")
    train.evaluate(run, run.classifier(ckpt, args.ckpt), name)


def main(argv=None):
    p = train.parser(command=False)
    p.description = __doc__
    p.add_argument("--ckpt", required=True, help="the classifier checkpoint")
    args = train.get_args(argv, p)
    train.command(lambda: evaluate(args))


if __name__ == "__main__":
    main()
