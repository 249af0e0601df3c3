"""A smaller dataset for smoke tests and runs that grow: some of the classes, at most N training and M test videos of
each, drawn per class with --seed, written as the list files `--dataset list` reads:

    python tools/subset.py --dataset ucf101 --root UCF-101 --splits ucfTrainTestlist --classes 5 --per-class 10 \\
        --test-per-class 4 --lists lists/ucf5
    python train.py --stage invariant --dataset list --root UCF-101 --train-list lists/ucf5/train.txt \\
        --test-list lists/ucf5/test.txt --class-names lists/ucf5/classes.txt

The classes are relabeled 0..N-1 in the order chosen; the videos keep their split files' order and their paths
relative to --root, which train.py is then given too. A --lists folder is never rewritten with other lists: a run
folder knows its lists by their paths.
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules
import data  # noqa: E402
import train  # noqa: E402


def take_subset(train_items, test_items, classes, which=None, per_class=None, test_per_class=None, seed=0):
    """The classes `which` (an int N: the first N; a list of names; None: all), relabeled 0..N-1 in that order,
    and at most `per_class` training and `test_per_class` test videos of each, drawn per class with `seed`, in
    list order. Returns (train, test, classes)."""
    if which is None:
        keep = list(range(len(classes)))
    elif isinstance(which, int):
        if not 1 <= which <= len(classes):
            raise data.DataError(f"--classes {which}: the dataset has {len(classes)} classes")
        keep = list(range(which))
    else:
        unknown = [name for name in which if name not in classes]
        if unknown:
            raise data.DataError(f"--classes: no class named {unknown[0]!r} in the dataset "
                                 f"(its first: {', '.join(classes[:5])})")
        keep = [classes.index(name) for name in which]
    new = {old: k for k, old in enumerate(keep)}

    def take(items, per, salt):
        items = [(p, new[y]) for p, y in items if y in new]
        if per is None:
            return items
        rng, chosen = random.Random(seed * 2 + salt), set()
        for c in range(len(keep)):
            videos = [it for it in items if it[1] == c]
            chosen.update(rng.sample(videos, min(per, len(videos))))
        return [it for it in items if it in chosen]

    return take(train_items, per_class, 0), take(test_items, test_per_class, 1), [classes[c] for c in keep]


def write_subset(args):
    train_items, test_items, classes = take_subset(*train.read_splits(args), args.classes, args.per_class,
                                                   args.test_per_class, args.seed)
    files = {"train.txt": [f"{p} {label}" for p, label in train_items],
             "test.txt": [f"{p} {label}" for p, label in test_items], "classes.txt": classes}
    if os.path.exists(args.lists) and not os.path.isdir(args.lists):
        raise data.DataError(f"--lists {args.lists} is a file, not a folder")
    for name, lines in files.items():
        path = os.path.join(args.lists, name)
        if os.path.exists(path) and text_of(path) != "".join(f"{line}\n" for line in lines):
            raise data.DataError(f"{path} holds other lists: write these to another --lists folder (or remove it)")
    os.makedirs(args.lists, exist_ok=True)
    for name, lines in files.items():
        if not os.path.exists(os.path.join(args.lists, name)):  # the same lists already there are left alone
            data.write_lines(os.path.join(args.lists, name), lines)
    print(f"{args.lists}: {len(classes)} classes, {len(train_items)} training and {len(test_items)} test videos "
          f"(train.txt, test.txt, classes.txt)")


def text_of(path):
    """The text of the file `path`; None where it is a folder or cannot be read as text."""
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def classes_flag(text):
    """--classes: "5" -> 5 (the first five), "A,B" -> ["A", "B"]."""
    if text.isdecimal():
        return int(text)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"expected N or comma-separated class names, each once, got {text!r}")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=train.HelpFormatter)
    p.add_argument("--lists", required=True, help="the folder to write train.txt, test.txt and classes.txt to")
    p.add_argument("--classes", type=classes_flag, default=None, help="the first N classes, or names 'A,B,C' "
                   "(default: all)")
    p.add_argument("--per-class", type=train.at_least(1), default=None,
                   help="at most N training videos a class (default: all)")
    p.add_argument("--test-per-class", type=train.at_least(1), default=None,
                   help="at most N test videos a class (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class draws")
    train.dataset_flags(p.add_argument)
    args = p.parse_args(argv)
    args.root = args.root or (train.DEFAULT_TOY if args.dataset == "toy" else None)
    if args.root is None:
        p.error(f"--dataset {args.dataset} needs --root")
    train.command(lambda: write_subset(args))


if __name__ == "__main__":
    main()
