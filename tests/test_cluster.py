"""Workflow runs through snakemake-executor-plugin-slurm on a real Slurm.

A session fixture starts a throw-away single-node cluster on loopback with
tests/cluster/slurm_cluster.sh (needs root and Debian's slurm-wlm and munge,
see tests/cluster/install.sh) and always stops it again. Every Snakemake run
uses profiles/slurm-local, the cluster profile adapted to the test cluster.

The toy workflow in tests/cluster/toy/ checks job placement, the fake GPU,
retries and cancellation; the real workflow checks that a reduced quick
preset gives the same results on the cluster as locally, and that a
cancelled training job resumes from its checkpoint.
"""

import collections
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from workflow_rules import RULE_EXPERIMENTS

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "tests" / "cluster"
CLUSTER_SCRIPT = CLUSTER_DIR / "slurm_cluster.sh"
TOY_SNAKEFILE = CLUSTER_DIR / "toy" / "Snakefile"
SLURM_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
LOCAL_PROFILE = REPO / "profiles" / "slurm-local" / "config.yaml"
PROFILE_ARGS = ["--workflow-profile", str(LOCAL_PROFILE.parent)]
# What the test cluster's profile may change relative to profiles/slurm.
LOCAL_PROFILE_CHANGES = {
    "software-deployment-method",
    "slurm-status-command",
    "slurm-init-seconds-before-status-checks",
}
ETC_CONF = Path("/etc/slurm/slurm.conf")

# Upper bounds on wall time; a stuck Snakemake ignores SIGTERM, so runs are
# ended with SIGINT, which also makes the plugin scancel its jobs.
TOY_TIMEOUT_S = 180
POLL_TIMEOUT_S = 60

SlurmJob = collections.namedtuple("SlurmJob", "job_id state rule gpus")


def cluster_skip_reason():
    """Why this machine cannot host the test cluster, or None if it can."""
    missing = [
        tool
        for tool in ("slurmctld", "slurmd", "munged", "sbatch", "srun")
        if shutil.which(tool) is None
    ]
    if missing:
        return (
            f"Slurm test cluster unavailable: {', '.join(missing)} not found "
            "(tests/cluster/install.sh installs slurm-wlm and munge with apt-get)"
        )
    if os.geteuid() != 0:
        return "Slurm test cluster unavailable: its daemons must be started as root"
    if ETC_CONF.is_symlink():
        state = Path(os.readlink(ETC_CONF)).parent
        return (
            f"Slurm test cluster unavailable: {ETC_CONF} links to {state}, so "
            "another test cluster may be running (an interrupted run leaves it "
            f"up); stop it with: {CLUSTER_SCRIPT} stop {state}"
        )
    if ETC_CONF.exists():
        return (
            f"Slurm test cluster unavailable: {ETC_CONF} exists (a real Slurm "
            "configuration?) and the test will not replace it"
        )
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


def clean_environment(slurm_conf):
    """Environment for cluster clients: no Slurm settings inherited from an
    enclosing job, and SLURM_CONF pointing at the test cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(slurm_conf)
    # Rules call `python`: make it this interpreter, as jobs inherit PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def slurm_env():
    """Start the test cluster for the session; yield the client environment.

    The cluster is stopped (its /etc/slurm/slurm.conf link removed) however
    the tests end.
    """
    reason = cluster_skip_reason()
    if reason:
        pytest.skip(reason)

    # Not under pytest's tmp_path: munged runs as user munge and needs every
    # parent directory of its socket to be searchable, which /tmp is.
    state = Path(tempfile.mkdtemp(prefix="resnet-ode-slurm-", dir="/tmp"))
    started = subprocess.run(
        [str(CLUSTER_SCRIPT), "start", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        if started.returncode != 0:
            pytest.fail(f"test cluster did not start:\n{started.stderr}")
        yield clean_environment(state / "slurm.conf")
    finally:
        stopped = subprocess.run(
            [str(CLUSTER_SCRIPT), "stop", str(state)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr
        assert not ETC_CONF.is_symlink(), f"{ETC_CONF} left behind"


def snakemake_command(args, timeout_s):
    """Snakemake command line bounded by `timeout -s INT`."""
    return [
        "timeout",
        "-s",
        "INT",
        "-k",
        "30",
        str(timeout_s),
        sys.executable,
        "-m",
        "snakemake",
        *args,
    ]


def run_snakemake(args, workdir, env, timeout_s):
    """Run Snakemake to completion; stdout and stderr together in .stdout."""
    return subprocess.run(
        snakemake_command(args, timeout_s),
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def slurm_run_id(snakemake_output):
    """The job name the plugin gave every job of one Snakemake run."""
    match = re.search(r"SLURM run ID: (\S+)", snakemake_output)
    assert match, f"no SLURM run ID in Snakemake output:\n{snakemake_output}"
    return match.group(1)


def slurm_jobs(env, run_id=None):
    """Jobs the controller still knows, oldest first (finished ones stay
    listed for MinJobAge=300 s).

    The plugin names every job of a run after its run ID and puts
    `rule_<name>` (plus wildcards) into the job's comment. `gpus` is the
    job's GPU request as Slurm recorded it ("gres:gpu:1"), or "N/A".
    """
    # An empty field width with a "|" suffix: whole values, "|"-separated.
    fields = "JobID:|,State:|,Comment:|,Name:|,tres-per-job:|"
    listing = subprocess.run(
        ["squeue", "--states=all", "--noheader", f"--Format={fields}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = []
    for line in listing.splitlines():
        job_id, state, comment, name, gpus = line.split("|")[:5]
        if run_id is not None and name != run_id:
            continue
        rule = re.sub(r"^rule_", "", comment).split("_wildcards_")[0]
        jobs.append(SlurmJob(job_id, state, rule, gpus))
    return sorted(jobs, key=lambda job: int(job.job_id))


def running_job(env, rule):
    """The first RUNNING job of `rule`, or None."""
    running = [
        job for job in slurm_jobs(env) if job.rule == rule and job.state == "RUNNING"
    ]
    return running[0] if running else None


def wait_for(condition, timeout_s, what):
    """Poll `condition` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# ---- the test cluster's profile --------------------------------------------


def test_local_profile_changes_only_what_the_test_cluster_needs():
    slurm = yaml.safe_load(SLURM_PROFILE.read_text())
    local = yaml.safe_load(LOCAL_PROFILE.read_text())

    changed = {
        key
        for key in slurm.keys() | local.keys()
        if slurm.get(key, "missing") != local.get(key, "missing")
    }

    assert changed <= LOCAL_PROFILE_CHANGES, changed - LOCAL_PROFILE_CHANGES


# ---- toy workflow: placement, fake GPU, retries, cancellation ------------


@pytest.mark.cluster
def test_toy_jobs_run_on_cluster_and_failed_job_is_retried(slurm_env, tmp_path):
    run = run_snakemake(
        ["--snakefile", str(TOY_SNAKEFILE), *PROFILE_ARGS],
        tmp_path,
        slurm_env,
        TOY_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stdout

    jobs = slurm_jobs(slurm_env, slurm_run_id(run.stdout))
    outcomes = collections.Counter((job.rule, job.state, job.gpus) for job in jobs)
    assert outcomes == {
        ("host", "COMPLETED", "N/A"): 1,
        ("gpu", "COMPLETED", "gres:gpu:1"): 1,
        ("flaky", "FAILED", "N/A"): 1,
        ("flaky", "COMPLETED", "N/A"): 1,
    }, jobs

    # Each job reports the Slurm job it ran in: the ids must be the
    # controller's, and only the job that asked for a GPU was given one.
    job_ids = {job.rule: job.job_id for job in jobs if job.state == "COMPLETED"}
    host = (tmp_path / "out" / "host.txt").read_text().split()
    gpu = (tmp_path / "out" / "gpu.txt").read_text().split()
    assert host == [f"job={job_ids['host']}", "gpus=none"]
    assert gpu[0] == f"job={job_ids['gpu']}"
    assert re.fullmatch(r"gpus=[0-9]", gpu[1]), gpu  # one fake GPU's index
    assert (tmp_path / "out" / "flaky.txt").read_text().strip() == "2"
    assert "Trying to restart job" in run.stdout


@pytest.mark.cluster
def test_toy_scancelled_job_fails_run_naming_rule_and_log(slurm_env, tmp_path):
    # No retries: one cancellation must end the run. (The resume test below
    # lets the profile's retries restart a cancelled job.)
    args = ["--snakefile", str(TOY_SNAKEFILE), *PROFILE_ARGS, "--retries", "0"]
    log_path = tmp_path / "snakemake.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            snakemake_command([*args, "out/sleeper.txt"], TOY_TIMEOUT_S),
            cwd=tmp_path,
            env=slurm_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        sleeper = wait_for(
            lambda: running_job(slurm_env, "sleeper"), POLL_TIMEOUT_S, "the job"
        )
        subprocess.run(["scancel", sleeper.job_id], env=slurm_env, check=True)
        process.wait(timeout=POLL_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait()
    output = log_path.read_text()

    assert process.returncode == 1, output
    assert "Error in rule sleeper" in output
    assert "CANCELLED" in output
    assert "logs/sleeper.log" in output
    slurm_log = f".snakemake/slurm_logs/rule_sleeper/{sleeper.job_id}.log"
    assert slurm_log in output
    assert (tmp_path / slurm_log).exists()
    assert not (tmp_path / "out" / "sleeper.txt").exists()


# ---- the real workflow -------------------------------------------------------

REDUCED_CONFIG = CLUSTER_DIR / "reduced_quick.yaml"
WORKFLOW_TIMEOUT_S = 600


# Timings and memory readings of the machine, not results: they differ from
# run to run. Everything else in a metrics.json must match.
MEASURED_KEYS = {
    "provenance",
    "wall_time_s",
    "seconds",
    "peak_memory",
    "peak_bytes",
    "peak_mib",
    "baseline_bytes",
    "values",
    "baselines",
}

# The depth-sweep run the resume test trains, cancels and lets retry.
RESUME_RUN = "scheme~euler/grad~backprop/depth~2/seed~1"
# Enough epochs of enough images (about 0.3 s each on 2 cores) that the test
# can cancel the job after its first checkpoint and well before its last.
RESUME_EPOCHS = 12
RESUME_TRAIN_SIZE = 1024


def workflow_args(workdir, profile_dir, *extra):
    """Arguments running the repository's workflow in `workdir`."""
    return [
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--workflow-profile",
        str(profile_dir),
        *extra,
    ]


def job_counts(output):
    """Jobs per rule from the first "Job stats" table of Snakemake's output."""
    lines = output.splitlines()
    counts = {}
    for line in lines[lines.index("Job stats:") + 3 :]:
        rule, count = line.split()
        if rule == "total":
            return counts
        counts[rule] = int(count)
    raise AssertionError("unterminated Job stats table")


def result_files(workdir):
    """Paths of everything a run wrote, relative to its directory."""
    return {
        str(path.relative_to(workdir))
        for path in workdir.rglob("*")
        if path.is_file() and ".snakemake" not in path.relative_to(workdir).parts
    }


def assert_same_results(local, cluster, where, roots):
    """Same structure and values, numbers within round-off, measurements aside.

    `roots` are the two runs' directories: paths into them compare equal.
    """
    if isinstance(local, dict):
        assert isinstance(cluster, dict) and local.keys() == cluster.keys(), where
        for key in local.keys() - MEASURED_KEYS:
            assert_same_results(local[key], cluster[key], f"{where}/{key}", roots)
    elif isinstance(local, list):
        assert isinstance(cluster, list) and len(local) == len(cluster), where
        for index, (a, b) in enumerate(zip(local, cluster, strict=True)):
            assert_same_results(a, b, f"{where}[{index}]", roots)
    elif isinstance(local, float):
        # Same code, data, seeds and thread count (one, from the rule) on the
        # same machine: the runs should agree bit for bit; the tolerance only
        # forgives float32 round-off should a library reorder a reduction.
        assert math.isclose(local, cluster, rel_tol=1e-5, abs_tol=1e-8), (
            f"{where}: local {local} != cluster {cluster}"
        )
    elif isinstance(local, str) and isinstance(cluster, str):
        local_root, cluster_root = (str(root) for root in roots)
        assert local.replace(local_root, "RUN") == cluster.replace(
            cluster_root, "RUN"
        ), f"{where}: local {local!r} != cluster {cluster!r}"
    else:
        assert local == cluster, f"{where}: local {local!r} != cluster {cluster!r}"


def gpu_experiments():
    """Experiments whose jobs the reduced preset sends to Slurm with a GPU."""
    settings = yaml.safe_load(REDUCED_CONFIG.read_text())["presets"]["quick"]
    return {
        name
        for name, experiment in settings.items()
        if experiment.get("resources", {}).get("gpu") == 1
    }


def checkpoint_epoch(path):
    """Epochs saved in a training checkpoint; None while there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


@pytest.mark.cluster
@pytest.mark.slow
def test_reduced_quick_preset_on_cluster_matches_local_run(slurm_env, tmp_path):
    local_dir, cluster_dir = tmp_path / "local", tmp_path / "cluster"
    config_args = ["--configfile", str(REDUCED_CONFIG)]
    local_profile = REPO / "profiles" / "default"

    # The two runs share the CPUs, but the cluster run mostly waits for its
    # status checks, so they run side by side.
    local_log = tmp_path / "local.log"
    with open(local_log, "w") as log:
        local = subprocess.Popen(
            snakemake_command(
                workflow_args(local_dir, local_profile, *config_args),
                WORKFLOW_TIMEOUT_S,
            ),
            cwd=tmp_path,
            env=slurm_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        cluster = run_snakemake(
            workflow_args(cluster_dir, LOCAL_PROFILE.parent, *config_args),
            tmp_path,
            slurm_env,
            WORKFLOW_TIMEOUT_S,
        )
    finally:
        local.wait()
    assert cluster.returncode == 0, cluster.stdout
    assert local.returncode == 0, local_log.read_text()

    # Every experiment job went through Slurm and succeeded first time, with a
    # GPU where the config asks for one; plots, tables and claims ran locally.
    planned = job_counts(cluster.stdout)
    jobs = slurm_jobs(slurm_env, slurm_run_id(cluster.stdout))
    assert collections.Counter(job.rule for job in jobs) == {
        rule: planned[rule] for rule in RULE_EXPERIMENTS
    }
    with_gpu = gpu_experiments()
    assert {RULE_EXPERIMENTS[job.rule] for job in jobs if job.gpus != "N/A"} == with_gpu
    assert all(job.state == "COMPLETED" for job in jobs), jobs
    assert all(job.gpus in ("N/A", "gres:gpu:1") for job in jobs), jobs

    assert result_files(cluster_dir) == result_files(local_dir)
    metrics_files = sorted(local_dir.rglob("results/**/metrics.json"))
    assert len(metrics_files) == sum(planned[rule] for rule in RULE_EXPERIMENTS)
    for local_metrics in metrics_files:
        relative = local_metrics.relative_to(local_dir)
        cluster_metrics = json.loads((cluster_dir / relative).read_text())
        assert_same_results(
            json.loads(local_metrics.read_text()),
            cluster_metrics,
            str(relative),
            roots=(local_dir, cluster_dir),
        )
        # The fake GPU has no CUDA behind it: the jobs fell back to the CPU.
        assert cluster_metrics.get("device", "cpu") == "cpu", relative


@pytest.mark.cluster
@pytest.mark.slow
def test_cancelled_training_job_is_retried_and_resumes_from_checkpoint(
    slurm_env, tmp_path
):
    training = {"epochs": RESUME_EPOCHS, "milestones": [RESUME_EPOCHS - 1]}
    longer = {"train_size": RESUME_TRAIN_SIZE, "training": training}
    override = tmp_path / "longer_training.yaml"
    override.write_text(yaml.safe_dump({"presets": {"quick": {"depth_sweep": longer}}}))
    workdir = tmp_path / "run"
    run_dir = workdir / "results" / "depth_sweep" / RESUME_RUN
    args = workflow_args(
        workdir,
        LOCAL_PROFILE.parent,
        "--configfile",
        str(REDUCED_CONFIG),
        str(override),
        "--",
        str(run_dir.relative_to(workdir) / "metrics.json"),
    )
    log_path = tmp_path / "snakemake.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            snakemake_command(args, WORKFLOW_TIMEOUT_S),
            cwd=tmp_path,
            env=slurm_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        saved = wait_for(
            lambda: checkpoint_epoch(run_dir / "checkpoint.pt"),
            WORKFLOW_TIMEOUT_S,
            "the first checkpoint",
        )
        job = running_job(slurm_env, "train_depth_sweep")
        assert job is not None, "the training job finished before it was cancelled"
        subprocess.run(["scancel", job.job_id], env=slurm_env, check=True)
        process.wait(timeout=WORKFLOW_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait()
    output = log_path.read_text()
    assert process.returncode == 0, output

    # The profile's retries started the cancelled job again...
    jobs = slurm_jobs(slurm_env, slurm_run_id(output))
    assert [(job.rule, job.state) for job in jobs] == [
        ("train_depth_sweep", "CANCELLED"),
        ("train_depth_sweep", "COMPLETED"),
    ], jobs

    # ...and it went on from its checkpoint instead of starting over.
    training_log = (workdir / "logs" / "depth_sweep" / f"{RESUME_RUN}.log").read_text()
    resumed = re.search(r"resuming \S+ after epoch (\d+)", training_log)
    assert resumed, training_log
    resumed_epoch = int(resumed.group(1))
    assert saved <= resumed_epoch < RESUME_EPOCHS
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_at_epochs"] == [resumed_epoch]
    epochs = [entry["epoch"] for entry in metrics["history"]]
    assert epochs == list(range(1, RESUME_EPOCHS + 1))
