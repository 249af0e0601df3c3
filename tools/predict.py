"""Each video's top-5 classes by name, from a trained classifier (a teacher, the student, supervised):

    python tools/predict.py --ckpt runs/default/student.pt VIDEO ...

A video's clips are seen as evaluation sees them (--test-clips clips, centre crop, softmaxes averaged); the
network, the clips' length and size and the class names come from the checkpoint. An unreadable video gets a
line naming it and the others are still answered (exit code 1 if any was unreadable).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import train  # noqa: E402

CLIP_FLAGS = ("arch", "width", "layers", "frames", "stride", "size")  # what a classifier's clips are


def with_checkpoint_clips(args, ckpt):
    """args with the network and clip flags the classifier checkpoint `ckpt` was trained with."""
    return argparse.Namespace(**{**vars(args), **{k: ckpt["args"][k] for k in CLIP_FLAGS if k in ckpt["args"]}})


def predict(args):
    ckpt = train.load_checkpoint(args.ckpt, "classifier")
    args = argparse.Namespace(**{**vars(with_checkpoint_clips(args, ckpt)), "root": ""})  # paths as given
    run = train.Run(args, "predict", dataset=False)
    model = run.classifier(ckpt, args.ckpt, ckpt["classes"]).eval()
    p, bad = train.probabilities(run, model, [(v, -1) for v in args.videos])  # (N, K)
    for i, video in enumerate(args.videos):
        top = p[i].topk(min(5, p.shape[1]))
        named = ", ".join(f"{ckpt['classes'][c]} {100 * v:.1f}%"
                          for v, c in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{video}: unreadable ({bad[i]})" if i in bad else f"{video}: {named}", flush=True)
    if bad:
        sys.exit(1)


def main(argv=None):
    p = train.parser(command=False)
    p.description = __doc__
    p.add_argument("--ckpt", required=True, help="the classifier checkpoint")
    p.add_argument("videos", nargs="+", help="the video files to classify")
    args = train.get_args(argv, p, dataset=False)
    train.command(lambda: predict(args))


if __name__ == "__main__":
    main()
