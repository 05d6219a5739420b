"""Train a D3PM on MNIST.

    python training/train.py --output-dir outputs/d3pm-mnist --max-steps 2000
    accelerate launch training/train.py --output-dir outputs/d3pm-mnist --mixed-precision bf16

Every option is a field of `d3pm_hub.training.TrainConfig`; the logic lives in the library.
"""

import argparse
import logging

from d3pm_hub.cli import add_dataclass_arguments, config_from_args
from d3pm_hub.training import TrainConfig, train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainConfig)
    train(config_from_args(TrainConfig, parser.parse_args()))
