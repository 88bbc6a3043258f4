"""The Ray executor on a real local cluster (two worker CPUs, bound to 127.0.0.1): the same results as the local
executor, CPUs and threads per job that agree, a clear error where a worker cannot see the experiment directory,
and a worker killed mid-job that is retried, or marked failed and resumed by a later run, to identical results.
Without Ray installed, ``--executor ray`` says how to install it."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from activelab.cli import main
from activelab.experiment.executors import SHARED_DIRECTORY_HELP, Job, RayExecutor, execute_job
from activelab.experiment.runner import load_experiment, run_experiment
from tests.test_runner import TINY, _rounds_done, read_store, snapshot, write_config

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'activelab[ray]')"
)

# One run, two strategies: two jobs, one per worker CPU.
SMALL = {**TINY, "loop": {**TINY["loop"], "runs": 1, "rounds": 3}}
ROUNDS = 2 * 4  # strategies x (round 0 + 3 rounds)
# for the drivers started as subprocesses (see the ray_cluster fixture)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small experiment run by the local executor."""
    root = tmp_path_factory.mktemp("ray_ref")
    cfg_path = write_config(root / "small.yaml", SMALL)
    out = run_experiment(cfg_path, root / "local", progress=False)
    assert not out.failed
    return cfg_path, snapshot(root / "local")


def _cli(cfg_path: Path, exp: Path, address: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "activelab.cli", "run", str(cfg_path), "--out", str(exp), "--quiet"]
    return [*cmd, "--executor", "ray", "--address", address, *extra]


def _env() -> dict:
    return {**os.environ, **LOOPBACK_ENV, "OMP_NUM_THREADS": "1"}


def _descends_from_me(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _job_worker_pids() -> list[int]:
    """Ray worker processes of this test's cluster that are running a job (Ray titles them after the task)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::execute_job") and _descends_from_me(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _rounds_by_strategy(exp: Path) -> dict[str, int]:
    return dict(read_store(exp, "SELECT strategy, COUNT(*) FROM rounds GROUP BY strategy"))


def _kill_a_worker_after(exp: Path, rounds: int, deadline_s: float = 60) -> int:
    """Wait until ``rounds`` rounds are committed, then SIGKILL one worker that runs a job; return its pid.
    Only while every live job worker runs a job with at least two rounds still to commit: a worker's pid cannot
    be told apart from the others, a job whose last round is under way can commit it between the check and the
    kill (then all rounds are done though its task failed), and a worker whose job committed its last round
    may still be returning (on a loaded machine one job can run a round or more ahead of the other)."""
    deadline = time.time() + deadline_s
    per_job = ROUNDS // len(SMALL["strategies"])
    while time.time() < deadline:
        pids = _job_worker_pids()
        done = _rounds_by_strategy(exp)
        left = [per_job - done.get(s["name"], 0) for s in SMALL["strategies"]]
        unfinished = [n for n in left if n > 0]
        if pids and sum(done.values()) >= rounds and len(pids) == len(unfinished) and min(unfinished) >= 2:
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        if not unfinished:
            raise AssertionError(f"every job finished before a worker could be killed mid-job: {done}")
        time.sleep(0.02)
    raise AssertionError(f"no job worker to kill after {rounds} rounds of {exp}")


def test_ray_missing_is_a_clear_error(tmp_path):
    """Without Ray importable, `--executor ray` fails up front (nothing is written) with the install command."""
    cfg_path = write_config(tmp_path / "small.yaml", SMALL)
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from activelab.cli import main\n"
        f"main(['run', {str(cfg_path)!r}, '--out', {str(tmp_path / 'exp')!r}, '--executor', 'ray'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert res.returncode == 2, res.stderr
    assert "pip install 'activelab[ray]'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "exp").exists()


def test_workers_and_ray_options_are_refused_where_they_do_not_apply(tmp_path):
    cfg_path = str(write_config(tmp_path / "small.yaml", SMALL))
    res = CliRunner().invoke(main, ["run", cfg_path, "--executor", "ray", "--workers", "2"])
    assert res.exit_code == 2 and "--workers is for the local executor" in res.output and "--cpus-per-job" in res.output
    res = CliRunner().invoke(main, ["run", cfg_path, "--cpus-per-job", "2"])
    assert res.exit_code == 2 and "options of --executor ray" in res.output
    assert not (tmp_path / "runs").exists()


@needs_ray
def test_threads_per_job_equal_cpus_reserved(tmp_path, cluster):
    """Each task runs with as many torch threads as CPUs it reserves: --cpus-per-job, else the config's threads,
    else 1 (never the driver's core count)."""
    import ray

    for threads, cpus_per_job, expected in ((None, None, 1), (2, None, 2), (1, 2, 2)):
        cfg = {**SMALL, "threads": threads} if threads else {k: v for k, v in SMALL.items() if k != "threads"}
        exp = tmp_path / f"exp{threads}{cpus_per_job}"
        run_experiment(write_config(tmp_path / "c.yaml", cfg), exp, executor=_NoRun(), progress=False)
        jobs = RayExecutor(cpus_per_job=cpus_per_job).prepare([Job(str(exp), 0, "random", threads=7)])
        assert jobs[0].threads == expected
        assert jobs[0].fingerprint == load_experiment(exp)[0].fingerprint()

    @ray.remote(num_cpus=2)
    def probe(job: Job) -> tuple[float, int]:
        import torch

        torch.set_num_threads(job.threads)
        return ray.get_runtime_context().get_assigned_resources()["CPU"], torch.get_num_threads()

    assert ray.get(probe.remote(jobs[0])) == (2.0, 2)


class _NoRun:
    """An executor that runs nothing (to set up an experiment directory)."""

    def run(self, jobs, on_done):
        pass


@needs_ray
def test_worker_that_cannot_see_the_directory_fails_clearly(tmp_path, cluster):
    """The check runs in the task: a worker that does not see the driver's directory (here: a path missing on
    the worker, and one holding another experiment) reports it instead of starting a new experiment there."""
    import ray

    exp = tmp_path / "exp"
    run_experiment(write_config(tmp_path / "c.yaml", SMALL), exp, executor=_NoRun(), progress=False)
    (job,) = RayExecutor().prepare([Job(str(exp), 0, "random", threads=1)])
    remote = ray.remote(num_cpus=1, max_retries=0)(execute_job)
    missing = Job(str(tmp_path / "not_shared"), 0, "random", 1, job.fingerprint)
    other = Job(str(exp), 0, "random", 1, "0" * 16)
    errors = ray.get([remote.remote(missing), remote.remote(other)])
    assert "cannot see the experiment directory" in errors[0] and SHARED_DIRECTORY_HELP in errors[0]
    assert "sees another experiment" in errors[1]
    assert not (tmp_path / "not_shared").exists() and _rounds_done(exp) == 0


@needs_ray
def test_ray_results_equal_the_local_executor(tmp_path, cluster, reference):
    """The Ray executor on the cluster: every selected index, prediction, metric and weight equals the local
    executor's. (The command line with --address runs in the two tests below.)"""
    cfg_path, ref = reference
    out = run_experiment(cfg_path, tmp_path / "ray", executor=RayExecutor(cpus_per_job=1), progress=False)
    assert not out.failed and len(out.done) == 2
    assert snapshot(tmp_path / "ray") == ref


def _run_while_killing_a_worker(cfg_path: Path, exp: Path, executor: RayExecutor):
    """Run the experiment on the cluster in a thread, SIGKILL one job's worker after 2 committed rounds."""
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.setdefault("run", run_experiment(cfg_path, exp, executor=executor, progress=False))
    )
    thread.start()
    _kill_a_worker_after(exp, rounds=2)
    thread.join(timeout=120)
    return outcome["run"]


@needs_ray
def test_killed_worker_is_retried_to_identical_results(tmp_path, cluster, reference):
    cfg_path, ref = reference
    exp = tmp_path / "retried"
    outcome = _run_while_killing_a_worker(cfg_path, exp, RayExecutor())  # default: 2 retries
    assert not outcome.failed and len(outcome.done) == 2
    assert _rounds_done(exp) == ROUNDS
    assert snapshot(exp) == ref


@needs_ray
def test_killed_worker_without_retries_is_failed_and_a_later_run_resumes_it(tmp_path, cluster, reference):
    """With no retries the killed job is reported failed; `activelab run --executor ray --address` (a new
    driver reaching the existing cluster) then resumes it to the local executor's results."""
    cfg_path, ref = reference
    exp = tmp_path / "failed"
    failed = _run_while_killing_a_worker(cfg_path, exp, RayExecutor(max_retries=0)).failed
    assert len(failed) == 1 and "ray task failed" in next(iter(failed.values()))
    assert _rounds_done(exp) < ROUNDS
    res = subprocess.run(_cli(cfg_path, exp, cluster), capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 job(s) finished, 1 already complete" in res.stdout
    assert snapshot(exp) == ref


@needs_ray
def test_tasks_reach_the_store_only_through_the_driver_service(tmp_path, cluster):
    """Ray tasks run with ACTIVELAB_STORE_SERVICE_ONLY=1: a job that opened the SQLite file itself (as it would
    on a node where the file is on a network filesystem) fails instead; through the service it runs (the
    results tests above), and the service serves only the store's job and lease methods."""
    import ray

    from activelab.experiment.store import SERVICE_ONLY_ENV
    from activelab.experiment.store_service import RemoteStore, start_service

    exp = tmp_path / "exp"
    run_experiment(write_config(tmp_path / "c.yaml", SMALL), exp, executor=_NoRun(), progress=False)
    (job,) = RayExecutor().prepare([Job(str(exp), 0, "random", threads=1)])
    guarded = ray.remote(num_cpus=1, max_retries=0, runtime_env={"env_vars": {SERVICE_ONLY_ENV: "1"}})(execute_job)
    error = ray.get(guarded.remote(job))
    assert error is not None and "must not open" in error and _rounds_done(exp) == 0
    service = start_service(ray)
    try:
        remote = RemoteStore(str(exp), service)  # the experiment as the driver names it
        assert remote.get_meta("experiment") == "tiny"
        with pytest.raises(AttributeError, match="no method 'conn'"):
            _ = remote.conn
        assert ray.get(service.host.remote())[0] == __import__("socket").gethostname()
    finally:
        ray.kill(service)
