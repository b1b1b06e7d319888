"""`nox -s models`'s command line: the action, the preset, where to put it, the task, the speed
floor, and the catalogue to read (pipeline/modelfiles/catalogue.yaml unless another is given);
resolved once into `ModelsOptions`, every option checked against the action it belongs to
before anything is fetched or measured."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.arguments import positive_rate
from pipeline.core.errors import UsageError
from pipeline.modelfiles.catalogue import CATALOGUE_FILE, TASKS

ACTIONS = ("list", "pull", "recommend")


@dataclass(frozen=True)
class ModelsOptions:
    action: str
    catalogue: Path
    name: str | None = None  # pull: the preset
    into: Path | None = None  # pull: also put the file here
    ollama: Path | None = None  # list: the models of this Ollama store instead
    task: str | None = None  # recommend: None is the catalogue's
    min_tokens_per_second: float | None = None  # recommend: None is the catalogue's floor


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("name", nargs="?", help="pull: the preset to fetch")
    parser.add_argument(
        "--into",
        metavar="DIR",
        type=Path,
        help="pull: also put the file here (a hard link where possible), e.g. compose's ./models",
    )
    parser.add_argument(
        "--ollama",
        metavar="DIR",
        type=Path,
        help="list: the models of Ollama's store in DIR (~/.ollama/models) and the names the "
        "image serves them under (LLAMA_OLLAMA_MODELS)",
    )
    parser.add_argument(
        "--task", choices=TASKS, help="recommend: the task (default: catalogue.yaml's)"
    )
    parser.add_argument(
        "--min-tokens-per-second",
        metavar="N",
        type=positive_rate,
        help="recommend: the slowest generation this host should be given, by the estimate "
        "(default: catalogue.yaml's, 10)",
    )
    parser.add_argument(
        "--catalogue",
        metavar="FILE",
        type=Path,
        default=CATALOGUE_FILE,
        help="a catalogue of your own, in catalogue.yaml's format",
    )


def resolve_models(args: argparse.Namespace) -> ModelsOptions:
    """The options, each checked against the action it belongs to."""
    given = {
        "NAME": args.name is not None,
        "--into": args.into is not None,
        "--ollama": args.ollama is not None,
        "--task": args.task is not None,
        "--min-tokens-per-second": args.min_tokens_per_second is not None,
    }
    belongs = {"NAME": "pull", "--into": "pull", "--ollama": "list", "--task": "recommend"}
    belongs["--min-tokens-per-second"] = "recommend"
    for option, present in given.items():
        if present and belongs[option] != args.action:
            raise UsageError(
                f"models {args.action}: {option} is for `models {belongs[option]}`",
                f"leave {option} out",
            )
    into = args.into.expanduser() if args.into is not None else None
    if into is not None and into.exists() and not into.is_dir():
        raise UsageError(f"--into {into}: not a directory", "name a directory (made if missing)")
    ollama = args.ollama.expanduser() if args.ollama is not None else None
    if ollama is not None and not ollama.is_dir():
        raise UsageError(f"--ollama {ollama}: not a directory", "give ~/.ollama/models")
    return ModelsOptions(
        action=args.action,
        catalogue=args.catalogue,
        name=args.name,
        into=into,
        ollama=ollama,
        task=args.task,
        min_tokens_per_second=args.min_tokens_per_second,
    )
