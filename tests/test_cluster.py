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
import yaml

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

SlurmJob = collections.namedtuple("SlurmJob", "job_id state rule")


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
    if ETC_CONF.exists() or ETC_CONF.is_symlink():
        return (
            f"Slurm test cluster unavailable: {ETC_CONF} already exists and the "
            "test will not replace it (remove it if it is a stale link left by "
            "an interrupted test run)"
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
    """Jobs the controller still knows (finished ones stay MinJobAge=300 s).

    The plugin puts `rule_<name>` (plus wildcards) into each job's comment.
    """
    command = ["squeue", "--states=all", "--noheader", "--format=%i|%T|%k|%j"]
    listing = subprocess.run(
        command, env=env, capture_output=True, text=True, check=True
    ).stdout
    jobs = []
    for line in listing.splitlines():
        job_id, state, comment, name = line.split("|")
        if run_id is not None and name != run_id:
            continue
        rule = re.sub(r"^rule_", "", comment).split("_wildcards_")[0]
        jobs.append(SlurmJob(job_id, state, rule))
    return jobs


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
    outcomes = collections.Counter((job.rule, job.state) for job in jobs)
    assert outcomes == {
        ("host", "COMPLETED"): 1,
        ("gpu", "COMPLETED"): 1,
        ("flaky", "FAILED"): 1,
        ("flaky", "COMPLETED"): 1,
    }, jobs

    # Each job reports the Slurm job it ran in: the ids must be the
    # controller's, and only the job that asked for a GPU was given one.
    job_ids = {job.rule: job.job_id for job in jobs if job.state == "COMPLETED"}
    host = (tmp_path / "out" / "host.txt").read_text().split()
    gpu = (tmp_path / "out" / "gpu.txt").read_text().split()
    assert host == [f"job={job_ids['host']}", "gpus=none"]
    assert gpu == [f"job={job_ids['gpu']}", "gpus=0"]
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
