"""Draw one of the paper's figures from results files (``resnet-ode plot NAME``)."""

import importlib

# figure name -> module defining add_arguments(parser) and run(args)
FIGURES = {
    "linear-weights": "resnet_ode.figures.linear_weights",
    "reconstruction-error": "resnet_ode.figures.reconstruction_error",
    "tied-weights": "resnet_ode.figures.tied_weights",
    "resnet101-adjoint": "resnet_ode.figures.resnet101_adjoint",
    "depth-sweep": "resnet_ode.figures.depth_sweep",
    "gradient-error": "resnet_ode.figures.gradient_error",
    "memory": "resnet_ode.figures.memory",
}


def add_arguments(parser):
    """One sub-subcommand per figure, each taking results files and --out."""
    figures = parser.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    for name, module_name in FIGURES.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = figures.add_parser(name, help=summary, description=summary)
        sub.add_argument(
            "--results", nargs="+", required=True, help="results files to read"
        )
        sub.add_argument(
            "--out",
            required=True,
            help="output path without extension: writes OUT.pdf, OUT.png, OUT.csv",
        )
        module.add_arguments(sub)
        sub.set_defaults(draw=module.run)


def run(args):
    return args.draw(args)
