"""Erase digits from a trained D3PM and save the delta(s).

    python training/erase.py --method esd-x --digits 9 --set alpha=1.0 steps=300
    python training/erase.py --method closed-form --digits 0 1 2 3 4 5 6 7 8 9 --each \
        --output-dir pretrained/deltas/closed-form
    accelerate launch training/erase.py --method sepme --digits 9
    python training/erase.py --method separable --digits 0 1 2 3 4 5 6 7 8 9 \
        --pair-terms pretrained/deltas/separable --output-dir pretrained/deltas/separable --set steps=4500
    python training/erase.py --method separable --digits 0 1 2 3 4 5 6 7 8 9 \
        --pair-terms pretrained/deltas/separable --refine --set rounds=2 --output-dir pretrained/deltas/separable
    python training/erase.py --method separable --digits 0 1 2 3 4 5 6 7 8 9 \
        --pair-terms pretrained/deltas/separable --refine --pairs 0+7 --set rounds=1 null_alpha=4 \
        --output-dir pretrained/deltas/separable
    python training/erase.py --method separable --digits 2 \
        --single-rounds pretrained/deltas/separable --output-dir pretrained/deltas/separable
    python training/erase.py --method separable --digits 0 1 2 3 4 5 6 7 8 9 \
        --pair-terms pretrained/deltas/separable --complete --output-dir pretrained/deltas/separable

Methods are `d3pm_hub.erasure.METHODS`; ``--set KEY=VALUE`` passes their hyper-parameters. The logic lives in
the library.
"""

import argparse
import logging

from d3pm_hub.erasure import add_erase_arguments, run_erase

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_erase_arguments(parser)
    run_erase(parser.parse_args())
