"""support/flags.py -- command-line flags checked before anything loads, and the --tiny presets applied.

`check_args` refuses, with one line each, every value that would do nothing, lose data, divide by zero or train on
NaN: a number that is not finite, one out of its range, a --data that is not a file, an --out that is a file.
`apply_preset` fills in a preset's values (--tiny) for the flags the user did not give: a flag given explicitly
wins, even when it equals the default.
"""
import argparse
import math
import os


# ----------------------------------------------------------------------------------------------------- training helpers
def apply_preset(ap, args, argv, preset):
    """A preset's values (--tiny) for the flags the user did not give: a flag given explicitly wins, even when its
    value equals the default (`--tiny --lr 1e-5` trains at 1e-5)."""
    defaults = {a.dest: a.default for a in ap._actions}
    for a in ap._actions:   # parse again with every default hidden: what remains was given
        a.default = argparse.SUPPRESS
    try:
        given = vars(ap.parse_args(argv))
    finally:
        for a in ap._actions:
            a.default = defaults[a.dest]
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)


def check_args(ap, args, positive=(), fraction=(), at_most=None):
    """Refuse, before anything loads, the values that would do nothing, lose data, divide by zero or train on NaN:
    every number must be finite; `positive` ones > 0, `fraction` ones in [0, 1], `at_most` {name: bound} no higher;
    a --out that names a file, and a --data that is not a file, are refused too."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            ap.error(f"--{name.replace('_', '-')} must be a finite number (got {value})")
    for name, bound in (at_most or {}).items():
        if getattr(args, name) > bound:
            ap.error(f"--{name.replace('_', '-')} must be at most {bound} (got {getattr(args, name)})")
    if getattr(args, "out", None) and os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out} is a file, not a folder")
    if getattr(args, "data", None) and os.path.exists(args.data) and not os.path.isfile(args.data):
        ap.error(f"--data {args.data} is not a file")
    for name in positive:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in fraction:
        if not 0 <= getattr(args, name) <= 1:
            ap.error(f"--{name.replace('_', '-')} must be between 0 and 1 (got {getattr(args, name)})")


