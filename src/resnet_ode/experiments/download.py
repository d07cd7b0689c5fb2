"""Download CIFAR-10 or CIFAR-100 into a data directory (md5-checked)."""

import argparse
import logging

from resnet_ode.data import DOWNLOADABLE, download_dataset

logger = logging.getLogger("resnet_ode")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset name and where to put it."""
    parser.add_argument("dataset", choices=DOWNLOADABLE, help="dataset to fetch")
    parser.add_argument(
        "--data-dir",
        required=True,
        help="directory to download into; pass the same --data-dir to training",
    )


def run(args: argparse.Namespace) -> int:
    """Fetch the dataset (files already present and intact are kept)."""
    folder = download_dataset(args.dataset, args.data_dir)
    logger.info("%s is in %s", args.dataset, folder)
    print(folder)
    return 0
