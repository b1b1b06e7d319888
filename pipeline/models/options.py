"""`nox -s models`'s command line: the action, the preset, where to put it, the task, and the
catalogue to read (pipeline/modelfiles/catalogue.yaml unless another is given)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.modelfiles.catalogue import CATALOGUE_FILE, TASKS


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "pull", "recommend"))
    parser.add_argument("name", nargs="?", help="pull: the preset to fetch")
    parser.add_argument(
        "--into",
        metavar="DIR",
        type=Path,
        help="pull: also put the file here (a hard link where possible), e.g. compose's ./models",
    )
    parser.add_argument(
        "--task", choices=TASKS, help="recommend: the task (default: catalogue.yaml's)"
    )
    parser.add_argument(
        "--catalogue",
        metavar="FILE",
        type=Path,
        default=CATALOGUE_FILE,
        help="a catalogue of your own, in catalogue.yaml's format",
    )
