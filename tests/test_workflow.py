"""The Snakemake workflow: dry runs of both presets with job counts derived from
config.yaml, config validation, conda environments, profiles, reruns after a
change, and (slow) the quick preset end to end.

Every Snakemake run here works in a temporary directory (``--directory``), so
the repository's results/ and figures/ are never written.
"""

import ast
import copy
import json
import os
import re
import resource
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import jsonschema
import pytest
import yaml
from workflow_rules import RULE_EXPERIMENTS

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
SCHEMA = yaml.safe_load(
    (REPO / "workflow" / "schemas" / "config.schema.yaml").read_text()
)
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
RULE_FILES = sorted((REPO / "workflow" / "rules").glob("*.smk"))

FIGURES = (
    "linear_weights",
    "reconstruction_error",
    "tied_weights",
    "resnet101_adjoint",
    "depth_sweep",
    "gradient_error",
    "memory",
)
LEFT_OUT_MESSAGE = "data_dirs.imagenet is not set"
WITH_IMAGENET = 'data_dirs={"imagenet": "imagenet_folder"}'
PLANS = {"quick": (), "paper": ("--config", "preset=paper", WITH_IMAGENET)}


# Python import or PyPI name -> the conda-forge package that provides it.
CONDA_NAMES = {
    "torch": ("pytorch",),
    "sklearn": ("scikit-learn",),
    "matplotlib": ("matplotlib", "matplotlib-base"),
    "seaborn": ("seaborn", "seaborn-base"),
    "PIL": ("pillow",),
    "yaml": ("pyyaml",),
}


# ---- helpers ------------------------------------------------------------------


def snakemake(workdir, *args, timeout=300):
    """Run Snakemake on the repository's workflow in ``workdir``.

    Returns:
        The finished process; ``.stdout`` holds stdout and stderr together.
    """
    env = dict(os.environ)
    # Jobs call `python`: make it the interpreter running the tests, which has
    # the package and its dependencies.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]
    return subprocess.run(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def dry_run(workdir, *args):
    """A successful dry run's output (fails the test on a non-zero exit)."""
    run = snakemake(workdir, "--dry-run", *args)
    assert run.returncode == 0, run.stdout
    return run.stdout


def job_counts(output):
    """Jobs per rule from the first "Job stats" table of Snakemake's output."""
    lines = output.splitlines()
    if "Job stats:" not in lines:
        return {}
    counts = {}
    for line in lines[lines.index("Job stats:") + 3 :]:
        rule, count = line.split()
        if rule == "total":
            break
        counts[rule] = int(count)
    return counts


def job_blocks(output):
    """(rule, text of its job block) for every job a dry run lists."""
    blocks = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.M)
    assert blocks, output
    return blocks


def merged(base, override):
    """``base`` with ``override`` merged in key by key, as Snakemake does."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def expected_job_counts(config):
    """Jobs per rule that ``rule all`` needs, worked out from a config.

    An experiment on a data set without a folder is left out with its figure;
    runs shared by two experiments (the gradient comparison's trained model,
    the fine-tuned tied model) are one job.
    """
    settings = config["presets"][config["preset"]]

    def available(dataset):
        return dataset == "digits" or config["data_dirs"][dataset] is not None

    counts = {
        "linear_weights": 1,
        "plot_linear_weights": 1,
        "memory_point": len(settings["memory"]["grads"])
        * len(settings["memory"]["depths"]),
        "plot_memory": 1,
        "claims": 1,
        "all": 1,
    }
    if available(settings["reconstruction"]["dataset"]):
        counts.update(reconstruction=1, plot_reconstruction_error=1)

    sweep = settings["depth_sweep"]
    if available(sweep["dataset"]):
        model = settings["gradient_error"]["model"]
        runs = set(
            product(sweep["schemes"], sweep["grads"], sweep["depths"], sweep["seeds"])
        )
        runs |= {
            (scheme, model["grad"], model["depth"], model["seed"])
            for scheme in sweep["schemes"]
        }
        counts.update(
            train_depth_sweep=len(runs),
            plot_depth_sweep=1,
            gradient_error=len(sweep["schemes"]),
            plot_gradient_error=1,
        )

    tied = settings["tied_weights"]
    if available(tied["dataset"]):
        stage_depths = {(n,) * 4 for n in tied["depths"]}
        stage_depths.add(tuple(settings["finetuning"]["stage_depths"]))
        counts.update(
            train_tied=len(stage_depths),
            plot_tied_weights=1,
            finetune=1,
            table_finetuning=1,
        )

    resnet101 = settings["resnet101"]
    if available(resnet101["dataset"]):
        counts.update(train_resnet101=len(resnet101["grads"]), plot_resnet101_adjoint=1)
    return counts


def paper_artifacts():
    """Every figure, table and claims file of the paper."""
    files = [f"figures/{name}.{ext}" for name in FIGURES for ext in ("pdf", "png")]
    files += [f"figures/{name}.csv" for name in FIGURES]
    files += ["results/tables/finetuning.csv", "results/tables/finetuning.md"]
    return files + ["results/claims.csv", "results/claims.md"]


def fake_finished_run(workdir):
    """Make ``workdir`` look like a finished quick run without running commands.

    Creates every output file the dry run plans, then lets Snakemake mark them
    up to date (``--touch --forceall``), which records each job's parameters
    as a real run would.
    """
    summary = snakemake(workdir, "--summary")
    assert summary.returncode == 0, summary.stdout
    header = summary.stdout.index("output_file\t")
    for line in summary.stdout[header:].splitlines()[1:]:
        path = workdir / line.split("\t")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    touched = snakemake(workdir, "--touch", "--forceall", "--cores", "1")
    assert touched.returncode == 0, touched.stdout


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Dry runs shared by the tests of this module: planned(*args) -> output."""
    outputs = {}

    def plan(*args):
        if args not in outputs:
            outputs[args] = dry_run(tmp_path_factory.mktemp("dry-run"), *args)
        return outputs[args]

    return plan


# ---- dry runs of the presets --------------------------------------------------


def test_quick_preset_plans_one_job_per_run(planned):
    output = planned(*PLANS["quick"])

    assert job_counts(output) == expected_job_counts(CONFIG)
    assert LEFT_OUT_MESSAGE not in output


def test_paper_preset_without_imagenet_leaves_out_resnet101_and_says_so_once(
    tmp_path,
):
    start = time.monotonic()
    output = dry_run(tmp_path, "--config", "preset=paper")
    elapsed = time.monotonic() - start

    config = merged(CONFIG, {"preset": "paper"})
    counts = job_counts(output)
    assert counts == expected_job_counts(config)
    assert "train_resnet101" not in counts
    assert sum(counts.values()) >= 100, counts
    assert output.count(LEFT_OUT_MESSAGE) == 1, output
    message = next(line for line in output.splitlines() if LEFT_OUT_MESSAGE in line)
    assert "figures/resnet101_adjoint.pdf" in message
    assert "data_dirs" in message
    # "A few seconds" on a workstation; the bound leaves room for a slow CI.
    assert elapsed < 60, f"paper dry run took {elapsed:.1f} s"


def test_paper_preset_with_imagenet_plans_resnet101_on_its_folder(planned):
    output = planned(*PLANS["paper"])

    config = merged(
        CONFIG, {"preset": "paper", "data_dirs": {"imagenet": "imagenet_folder"}}
    )
    assert job_counts(output) == expected_job_counts(config)
    assert job_counts(output)["train_resnet101"] == 2
    assert "--dataset imagenet --data-dir imagenet_folder" in output
    # Merging one key keeps the others.
    assert "--data-dir data/cifar10" in output
    assert LEFT_OUT_MESSAGE not in output


def test_one_key_of_a_preset_can_be_overridden_on_the_command_line(tmp_path):
    override = {"depth_sweep": {"depths": [2, 4, 8, 16, 32], "training": {"lr": 0.05}}}
    output = dry_run(
        tmp_path,
        "--config",
        "preset=quick",
        'presets={"quick": {"depth_sweep": {"depths": [2, 4, 8, 16, 32], '
        '"training": {"lr": 0.05}}}}',
    )

    config = merged(CONFIG, {"presets": {"quick": override}})
    assert job_counts(output) == expected_job_counts(config)
    assert "--depth 32 " in output
    # The command line gives strings; the workflow hands on numbers.
    assert "--lr 0.05 " in output
    # The other training settings of the preset are untouched.
    epochs = CONFIG["presets"]["quick"]["depth_sweep"]["training"]["epochs"]
    assert f"--epochs {epochs} " in output


def test_a_config_file_can_override_one_key(tmp_path):
    override = {"presets": {"paper": {"depth_sweep": {"seeds": [1]}}}}
    override_file = tmp_path / "override.yaml"
    override_file.write_text(yaml.safe_dump(override))

    output = dry_run(
        tmp_path, "--configfile", str(override_file), "--config", "preset=paper"
    )

    config = merged(merged(CONFIG, override), {"preset": "paper"})
    assert job_counts(output) == expected_job_counts(config)


# ---- config validation --------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            'presets={"quick": {"depth_sweep": {"depths": [2, -4]}}}',
            "['depth_sweep']['depths']",
        ),
        ("preset=fast", "instance['preset']"),
        (
            'presets={"quick": {"depth_sweep": {"schemes": ["eular"]}}}',
            "['depth_sweep']['schemes']",
        ),
        ('presets={"quick": {"memory": {"dephts": [1]}}}', "'dephts' was unexpected"),
        ("unknown_key=1", "'unknown_key' was unexpected"),
        (
            'presets={"paper": {"tied_weights": {"training": {"lr": -0.1}}}}',
            "['tied_weights']['training']['lr']",
        ),
        ('presets={"quick": {"finetuning": {"stage": 5}}}', "finetuning.stage"),
    ],
    ids=[
        "negative-depth",
        "unknown-preset",
        "misspelt-scheme",
        "unknown-key",
        "unknown-top-level-key",
        "negative-lr-of-other-preset",
        "stage-outside-model",
    ],
)
def test_bad_config_is_rejected_before_any_job_naming_the_key(
    tmp_path, override, named
):
    run = snakemake(tmp_path, "--dry-run", "--config", override)

    assert run.returncode != 0, run.stdout
    assert named in run.stdout, run.stdout
    assert "Job stats" not in run.stdout
    assert not (tmp_path / "results").exists()


def test_config_file_alone_is_valid_and_schema_has_no_defaults():
    jsonschema.Draft202012Validator(SCHEMA).validate(CONFIG)

    # Cluster jobs skip schema defaults, so every value must be in config.yaml.
    def defaults(node):
        if isinstance(node, dict):
            return ("default" in node) + sum(defaults(v) for v in node.values())
        if isinstance(node, list):
            return sum(defaults(v) for v in node)
        return 0

    assert defaults(SCHEMA) == 0


def test_every_object_in_the_schema_rejects_unknown_keys():
    def objects_without_closure(node, path):
        found = []
        if isinstance(node, dict):
            if node.get("type") == "object" and node.get("additionalProperties"):
                found.append(path)
            if node.get("type") == "object" and "additionalProperties" not in node:
                found.append(path)
            for key, value in node.items():
                found += objects_without_closure(value, f"{path}/{key}")
        return found

    assert objects_without_closure(SCHEMA, "#") == []


# ---- job settings -------------------------------------------------------------


@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_every_job_logs_benchmarks_and_asks_for_its_configured_resources(
    planned, preset
):
    output = planned(*PLANS[preset])
    settings = CONFIG["presets"][preset]

    for rule, block in job_blocks(output):
        if rule == "all":
            assert "log:" not in block
            continue
        assert re.search(r"^    log: logs/\S+\.log$", block, re.M), block
        benchmark = r"^    benchmark: results/benchmarks/\S+\.tsv$"
        assert re.search(benchmark, block, re.M), block
        if rule not in RULE_EXPERIMENTS:
            continue
        resources = settings[RULE_EXPERIMENTS[rule]]["resources"]
        assert f"mem_mb={resources['mem_mb']}," in block, block
        assert f"runtime={resources['runtime']}," in block, block
        assert re.findall(r"\bgpu=(\d+)", block) == [str(resources["gpu"])], block


def test_plotting_and_aggregation_rules_run_locally():
    text = "\n".join(path.read_text() for path in RULE_FILES)
    text += (REPO / "Snakefile").read_text()
    local = set(re.findall(r"^localrules:\n((?:    \w+,\n)+)", text, re.M))
    local_rules = {name for block in local for name in re.findall(r"\w+", block)}

    aggregation = {f"plot_{name}" for name in FIGURES} | {
        "table_finetuning",
        "claims",
        "all",
    }
    assert aggregation <= local_rules
    assert not any(name.startswith("train_") for name in local_rules)


# ---- conda environments -------------------------------------------------------


def env_packages(path):
    """Package name -> full spec of a conda environment file."""
    env = yaml.safe_load(path.read_text())
    specs = [spec for spec in env["dependencies"] if isinstance(spec, str)]
    return env, {re.split(r"[=<>]", spec)[0]: spec for spec in specs}


def package_dependencies():
    """Names of the runtime dependencies in pyproject.toml's [project] table."""
    # A regex, not tomllib, which Python 3.10 lacks.
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[\n(.*?)^\]", text, re.M | re.S)
    names = re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block.group(1), re.M)
    assert names, block.group(0)
    return names


def third_party_imports():
    """Top-level modules outside the standard library that the package imports."""
    names = set()
    for source in (REPO / "src" / "resnet_ode").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"resnet_ode", "__future__"}


def test_rules_name_existing_environment_files():
    named = set()
    for path in RULE_FILES:
        for spec in re.findall(r"^    conda:\n        (.+)$", path.read_text(), re.M):
            if spec.startswith('"'):
                named.add((path.parent / spec.strip('"')).resolve())
            else:
                # get_conda_env picks envs/cuda.yaml or envs/cpu.yaml by gpu.
                assert spec.startswith("get_conda_env("), spec
                named |= {
                    (REPO / "envs" / f"{k}.yaml").resolve() for k in ("cpu", "cuda")
                }
    assert named == {path.resolve() for path in ENV_FILES}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda path: path.name)
def test_environment_is_pinned_and_lists_what_the_package_imports(path):
    env, packages = env_packages(path)
    required = package_dependencies() + sorted(third_party_imports())

    assert env["channels"][0] == "conda-forge"
    assert all(re.fullmatch(r"[\w.-]+=[\w.]+(=\S+)?", s) for s in packages.values())
    for name in required:
        choices = CONDA_NAMES.get(name, (name,))
        assert any(choice in packages for choice in choices), (name, path.name)


def test_gpu_environment_asks_for_a_cuda_build_and_cpu_one_for_a_cpu_build():
    _, cuda = env_packages(REPO / "envs" / "cuda.yaml")
    _, cpu = env_packages(REPO / "envs" / "cpu.yaml")

    assert cuda["pytorch"].endswith("=cuda*")
    assert cpu["pytorch"].endswith("=cpu*")


# ---- profiles -----------------------------------------------------------------


def test_slurm_profile_schedules_without_site_settings_in_the_workflow(tmp_path):
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["jobs"] >= 1 and profile["retries"] >= 1
    assert profile["latency-wait"] >= 1
    # Account and partition are placeholders for the site to fill in.
    assert "slurm_account" not in profile["default-resources"]
    assert "slurm_extra" not in str(profile)

    workflow_text = "\n".join(p.read_text() for p in RULE_FILES)
    assert "slurm_account" not in workflow_text
    assert "slurm_partition" not in workflow_text

    profile_args = ["--profile", str(REPO / "profiles" / "slurm")]
    output = dry_run(tmp_path, *profile_args, "--config", "preset=paper")
    assert job_counts(output) == expected_job_counts(
        merged(CONFIG, {"preset": "paper"})
    )


def test_default_profile_sets_nothing_a_cluster_profile_needs_to_differ():
    default = yaml.safe_load(
        (REPO / "profiles" / "default" / "config.yaml").read_text()
    )
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())

    # Snakemake reads profiles/default together with --profile profiles/slurm
    # and lets it win key by key.
    for key in default.keys() & slurm.keys():
        assert default[key] == slurm[key], key
    assert "executor" not in default and "default-resources" not in default


# ---- reruns -------------------------------------------------------------------


def test_finished_run_has_nothing_to_do_and_a_change_reruns_only_what_it_affects(
    tmp_path,
):
    fake_finished_run(tmp_path)
    quick = CONFIG["presets"]["quick"]

    assert job_counts(dry_run(tmp_path)) == {}

    depths = quick["depth_sweep"]["depths"] + [32]
    added = "presets=" + json.dumps({"quick": {"depth_sweep": {"depths": depths}}})
    sweep = quick["depth_sweep"]
    assert job_counts(dry_run(tmp_path, "--config", added)) == {
        "train_depth_sweep": len(sweep["schemes"])
        * len(sweep["grads"])
        * len(sweep["seeds"]),
        "plot_depth_sweep": 1,
        "claims": 1,
        "all": 1,
    }

    # A changed setting that is no path segment reruns through its parameters.
    fewer = 'presets={"quick": {"reconstruction": {"depths": [2, 4, 8]}}}'
    assert job_counts(dry_run(tmp_path, "--config", fewer)) == {
        "reconstruction": 1,
        "plot_reconstruction_error": 1,
        "claims": 1,
        "all": 1,
    }


# ---- end to end ---------------------------------------------------------------


def children_cpu_seconds():
    """User + system CPU time of every finished child process and its children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
def test_quick_preset_runs_end_to_end_within_ten_minutes_on_two_cores(tmp_path):
    start, cpu_start = time.monotonic(), children_cpu_seconds()
    run = snakemake(tmp_path, "--cores", "2", timeout=1800)
    elapsed = time.monotonic() - start
    cpu = children_cpu_seconds() - cpu_start

    assert run.returncode == 0, run.stdout[-20000:]
    missing = [f for f in paper_artifacts() if not (tmp_path / f).is_file()]
    assert missing == []
    # Ten minutes on two cores is 1200 CPU seconds. CPU time, unlike wall
    # time, does not grow when other processes share the machine.
    assert cpu < 1200, f"quick preset used {cpu:.0f} CPU s ({elapsed:.0f} s wall)"

    assert job_counts(dry_run(tmp_path)) == {}

    depths = CONFIG["presets"]["quick"]["memory"]["depths"] + [128]
    added = "presets=" + json.dumps({"quick": {"memory": {"depths": depths}}})
    assert job_counts(dry_run(tmp_path, "--config", added)) == {
        "memory_point": len(CONFIG["presets"]["quick"]["memory"]["grads"]),
        "plot_memory": 1,
        "claims": 1,
        "all": 1,
    }

    report = snakemake(tmp_path, "--report", "report.html")
    assert report.returncode == 0, report.stdout
    assert (tmp_path / "report.html").stat().st_size > 0
