"""Helpers shared by the rule files.

The settings of the active preset, the result files that aggregation rules and
``rule all`` ask for, and builders of command-line arguments in which every
value from the config is shell-quoted.
"""

import shlex
import sys
from pathlib import Path

import yaml

SCHEMA_PATH = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"

# The package source next to this workflow goes first on every job's
# PYTHONPATH: the commands that run are this checkout's, and a conda
# environment only needs the package's dependencies.
PACKAGE_SOURCE = Path(workflow.basedir) / "src"

# Snakemake formats the prefix like a command, hence the doubled braces.
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(str(PACKAGE_SOURCE))}"
    "${{PYTHONPATH:+:$PYTHONPATH}}; "
)

# Residual networks of the tied-weights figure have four stages of equal depth.
TIED_STAGES = 4

# Experiments that read their data through another experiment's model.
DATA_SOURCE = {"gradient_error": "depth_sweep", "finetuning": "tied_weights"}

# Each figure and the experiment whose results it plots; the plotting rule of
# figure NAME is plot_NAME.
FIGURE_EXPERIMENTS = {
    "linear_weights": "linear_weights",
    "reconstruction_error": "reconstruction",
    "tied_weights": "tied_weights",
    "resnet101_adjoint": "resnet101",
    "depth_sweep": "depth_sweep",
    "gradient_error": "gradient_error",
    "memory": "memory",
}


wildcard_constraints:
    scheme="euler|heun",
    grad="adjoint|backprop",
    depth=r"[1-9][0-9]*",
    seed=r"[0-9]+",
    stage=r"[1-9][0-9]*|all",
    stage_depths=r"[1-9][0-9]*(-[1-9][0-9]*)*",


# ---- config: conversion and checks ------------------------------------------


def _parse_null(text):
    if text not in ("null", "~"):
        raise ValueError(text)
    return None


def _parse_bool(text):
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


SCALAR_PARSERS = (
    ("null", _parse_null),
    ("boolean", _parse_bool),
    ("integer", int),
    ("number", float),
)


def _resolve_schema(schema, root):
    """Follow a local ``$ref`` ("#/$defs/name") to the schema it names."""
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _schema_types(schema, root):
    """The JSON types a schema allows, looking into ``anyOf`` branches."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    for branch in schema.get("anyOf", []):
        types.extend(_schema_types(_resolve_schema(branch, root), root))
    return types


def _convert_scalar(text, schema, root):
    types = _schema_types(schema, root)
    for type_name, parse in SCALAR_PARSERS:
        if type_name in types:
            try:
                return parse(text)
            except ValueError:
                continue
    return text


def _convert_node(value, schema, root):
    schema = _resolve_schema(schema, root)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in value:
            if key in properties:
                value[key] = _convert_node(value[key], properties[key], root)
        return value
    if isinstance(value, list):
        items = schema.get("items", {})
        return [_convert_node(item, items, root) for item in value]
    if isinstance(value, str):
        return _convert_scalar(value, schema, root)
    return value


def convert_config_strings(config):
    """Give strings the scalar type the schema asks for, in place.

    ``--config key={...}`` reads nested values with YAML's base loader, which
    leaves every number a string, and PyYAML reads ``1e-3`` (no dot) as a
    string too. A string becomes a null, boolean, integer or number only where
    the schema allows that type; anything else is left for the schema to
    reject.

    Args:
        config: the merged workflow config.
    """
    root = yaml.safe_load(SCHEMA_PATH.read_text())
    _convert_node(config, root, root)


def check_finetuning_stage():
    """Reject a stage number outside the tied model it refines.

    Raises:
        ValueError: naming the key, when finetuning.stage is larger than the
            number of stages in finetuning.stage_depths.
    """
    for preset, settings in config["presets"].items():
        finetuning = settings["finetuning"]
        stages = len(finetuning["stage_depths"])
        if finetuning["stage"] != "all" and finetuning["stage"] > stages:
            raise ValueError(
                f"presets.{preset}.finetuning.stage is {finetuning['stage']}, but "
                f"finetuning.stage_depths has {stages} stages (stages count from 1)"
            )


# ---- settings of the active preset ------------------------------------------


def get_settings():
    """The settings of every experiment in the active preset."""
    return config["presets"][config["preset"]]


def get_experiment(name):
    """The settings of one experiment in the active preset."""
    return get_settings()[name]


def get_dataset(experiment):
    """The data set an experiment reads, or None when it makes its own data."""
    return get_experiment(DATA_SOURCE.get(experiment, experiment)).get("dataset")


def get_data_dir(dataset):
    """The configured folder of a data set; None for digits (bundled)."""
    if dataset == "digits":
        return None
    return config["data_dirs"][dataset]


def is_left_out(experiment):
    """Whether the experiment's data set has no folder configured."""
    dataset = get_dataset(experiment)
    return dataset not in (None, "digits") and get_data_dir(dataset) is None


def get_threads(experiment):
    """Threads of one job of the experiment (torch's thread pool follows them)."""
    return get_experiment(experiment)["resources"]["threads"]


def get_resource(experiment, name):
    """One scheduler resource (mem_mb, runtime in minutes, gpu) of a job."""
    return get_experiment(experiment)["resources"][name]


def get_conda_env(experiment):
    """The CUDA environment for experiments that ask for a GPU, else the CPU one."""
    kind = "cuda" if get_resource(experiment, "gpu") else "cpu"
    return f"../../envs/{kind}.yaml"


# ---- command-line arguments -------------------------------------------------


def shell_args(options):
    """Join ``--flag value`` pairs into one shell-safe string.

    Args:
        options: flag -> value. A None value or an empty list leaves the flag
            out; a list gives one word per item.

    Returns:
        The flags and their shell-quoted values, separated by spaces.
    """
    words = []
    for flag, value in options.items():
        values = value if isinstance(value, list) else [value]
        if value is None or not values:
            continue
        words.append(flag)
        words.extend(shlex.quote(str(item)) for item in values)
    return " ".join(words)


def get_data_args(experiment, subsets=True):
    """Data-set arguments of an experiment's command.

    Args:
        experiment: its data set is that of the experiment whose model it uses
            (``DATA_SOURCE``), else its own.
        subsets: whether to pass the train/test subset sizes.

    Returns:
        ``--dataset``, ``--data-dir`` (left out for digits) and, with
        ``subsets``, ``--train-size`` and ``--test-size`` (left out when null).
    """
    source = get_experiment(DATA_SOURCE.get(experiment, experiment))
    options = {
        "--dataset": source["dataset"],
        "--data-dir": get_data_dir(source["dataset"]),
    }
    if subsets:
        options["--train-size"] = source["train_size"]
        options["--test-size"] = source["test_size"]
    return shell_args(options)


def get_train_args(experiment):
    """Data, optimiser, schedule and device arguments of a training command.

    Ends with ``--restart-on-mismatch``: Snakemake reruns a training job only
    when its settings or command changed, so a checkpoint of another config
    left in the output folder is stale and the run starts over; a checkpoint
    of the same config (a job stopped halfway) is resumed.
    """
    training = get_experiment(experiment)["training"]
    options = {
        "--epochs": training["epochs"],
        "--batch-size": training["batch_size"],
        "--lr": training["lr"],
        "--momentum": training["momentum"],
        "--weight-decay": training["weight_decay"],
        "--schedule": training["schedule"],
        "--milestones": training["milestones"],
        "--gamma": training["gamma"],
        "--num-workers": training["num_workers"],
        "--device": get_settings()["device"],
    }
    return f"{get_data_args(experiment)} {shell_args(options)} --restart-on-mismatch"


def get_stage_depths(wildcards):
    """Stage depths of a ``stage_depths~4-4-32-4`` path segment, as a list."""
    return wildcards.stage_depths.split("-")


def join_stage_depths(depths):
    """The ``stage_depths~`` path value of a list of stage depths."""
    return "-".join(str(depth) for depth in depths)


# ---- result files -----------------------------------------------------------


def get_tied_stage_depths():
    """Stage depths of every tied-weights run of the figure, as path values."""
    depths = get_experiment("tied_weights")["depths"]
    return [join_stage_depths([n] * TIED_STAGES) for n in depths]


def get_tied_runs(wildcards):
    """metrics.json of every tied-weights run of the figure."""
    return expand(rules.train_tied.output.metrics, stage_depths=get_tied_stage_depths())


def get_resnet101_runs(wildcards):
    """metrics.json of the ResNet-101 runs, one per gradient method."""
    grads = get_experiment("resnet101")["grads"]
    return expand(rules.train_resnet101.output.metrics, grad=grads)


def get_depth_sweep_runs(wildcards):
    """metrics.json of every depth-sweep run: scheme x grad x depth x seed."""
    sweep = get_experiment("depth_sweep")
    return expand(
        rules.train_depth_sweep.output.metrics,
        scheme=sweep["schemes"],
        grad=sweep["grads"],
        depth=sweep["depths"],
        seed=sweep["seeds"],
    )


def _gradient_error_files(output_name):
    model = get_experiment("gradient_error")["model"]
    return expand(
        getattr(rules.gradient_error.output, output_name),
        scheme=get_experiment("depth_sweep")["schemes"],
        grad=model["grad"],
        depth=model["depth"],
        seed=model["seed"],
    )


def get_gradient_error_runs(wildcards):
    """metrics.json of the gradient comparison of each scheme."""
    return _gradient_error_files("metrics")


def get_gradient_error_tables(wildcards):
    """gradient_error.csv of the gradient comparison of each scheme."""
    return _gradient_error_files("table")


def get_memory_points(wildcards):
    """metrics.json of every memory point: grad x depth."""
    memory = get_experiment("memory")
    return expand(
        rules.memory_point.output.metrics, grad=memory["grads"], depth=memory["depths"]
    )


def get_finetuning_runs(wildcards):
    """metrics.json of the fine-tuning run of the table."""
    finetuning = get_experiment("finetuning")
    return expand(
        rules.finetune.output.metrics,
        stage_depths=join_stage_depths(finetuning["stage_depths"]),
        stage=finetuning["stage"],
    )


def get_included_figures():
    """Figures whose data sets are configured, in the paper's order."""
    return [
        figure
        for figure, experiment in FIGURE_EXPERIMENTS.items()
        if not is_left_out(experiment)
    ]


def get_figure_files(figure):
    """The .pdf, .png and .csv of one figure."""
    return [str(path) for path in getattr(rules, f"plot_{figure}").output]


def get_claims_inputs(wildcards):
    """The data behind every claim: each included figure's .csv and the table."""
    files = [
        getattr(rules, f"plot_{figure}").output.csv for figure in get_included_figures()
    ]
    if not is_left_out("finetuning"):
        files.append(rules.table_finetuning.output.csv)
    return files


def get_paper_artifacts():
    """Every figure, table and claims file of the paper that the config can build."""
    artifacts = []
    for figure in get_included_figures():
        artifacts.extend(get_figure_files(figure))
    if not is_left_out("finetuning"):
        artifacts.extend(str(path) for path in rules.table_finetuning.output)
    artifacts.extend(str(path) for path in rules.claims.output)
    return artifacts


def get_left_out_artifacts():
    """Data set -> the paper artifacts left out because its folder is not set."""
    left_out = {}
    for figure, experiment in FIGURE_EXPERIMENTS.items():
        if is_left_out(experiment):
            dataset = get_dataset(experiment)
            left_out.setdefault(dataset, []).extend(get_figure_files(figure))
    if is_left_out("finetuning"):
        left_out.setdefault(get_dataset("finetuning"), []).extend(
            str(path) for path in rules.table_finetuning.output
        )
    return left_out


def report_left_out_artifacts():
    """Say once, in the main process, which artifacts lack their data and why.

    Jobs on a cluster parse the workflow again; they stay quiet.
    """
    if not workflow.is_main_process:
        return
    for dataset, artifacts in get_left_out_artifacts().items():
        example = f"""--config 'data_dirs={{"{dataset}": "FOLDER"}}'"""
        print(
            f"resnet-ode: data_dirs.{dataset} is not set, so these targets of "
            f"preset {config['preset']!r} are left out: {', '.join(artifacts)}. "
            f"Set data_dirs.{dataset} to the data set's folder to build them, "
            f"e.g. {example}",
            file=sys.stderr,
        )
