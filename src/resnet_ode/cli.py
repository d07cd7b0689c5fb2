"""The ``resnet-ode`` command: one subcommand per experiment, figure and table.

Every subcommand lives in a module that defines ``add_arguments(parser)`` and
``run(args)``, and a one-line ``__doc__`` used as its help. The modules are
imported only when their subcommand runs, so ``resnet-ode --help`` stays fast.
"""

import argparse
import importlib
import logging
import sys

# subcommand -> module defining add_arguments(parser) and run(args)
COMMANDS = {
    "linear-weights": "resnet_ode.experiments.linear_weights",
    "reconstruction": "resnet_ode.experiments.reconstruction",
    "tied-resnet": "resnet_ode.experiments.tied_resnet",
    "resnet101": "resnet_ode.experiments.resnet101",
    "depth-sweep": "resnet_ode.experiments.depth_sweep",
    "gradient-error": "resnet_ode.experiments.gradient_error",
    "memory": "resnet_ode.experiments.memory",
    "finetune": "resnet_ode.experiments.finetune",
    "download": "resnet_ode.experiments.download",
    "plot": "resnet_ode.figures",
    "table": "resnet_ode.figures.tables",
    "claims": "resnet_ode.claims",
    "demo": "resnet_ode.experiments.demo",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, import just that subcommand's module."""
    parser = argparse.ArgumentParser(
        prog="resnet-ode",
        description="Regenerate 'Do Residual Neural Networks discretize Neural "
        "ODEs?' one experiment at a time.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, add_help=False)
            continue
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``resnet-ode`` and ``python -m resnet_ode``."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.run(args) or 0
