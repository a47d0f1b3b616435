"""keras_implicit.launchers: the sweep on its three engines, with faults.

The Ray test starts a real two-node cluster on the loopback address (``ray start``, 1 CPU a node), runs a 4-run sweep
on it, kills a Ray worker process during one run and the whole second node during another (by process ids), and
checks that every run finishes with the records of an uninterrupted run. The SLURM test starts a one-node cluster
(Debian's slurm-wlm and munge, as root), preempts a running job with SIGUSR2 and checks the same; where SLURM is not
installed, the SLURM engine's jobs run on submitit's local executor instead. See README, "Sweeps on a cluster".
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keras_implicit import launchers, sweep
from keras_implicit.config import RunConfig

from .test_training import write_idx_fixture

ROOT = Path(__file__).resolve().parent.parent


def _records(run_dir):
    with open(Path(run_dir) / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_idx_fixture(tmp_path_factory.mktemp("idx"))


def _configs(idx_dir, epochs=3):
    base = RunConfig(dataset="mnist", data_dir=idx_dir, epochs=epochs, batch_size=64, ghost_batch_size=64,
                     track_every=2, deterministic=True)
    return sweep.grid(base, lr=[0.1, 0.05], seed=[0, 1])


def _reference(idx_dir, tmp_path, epochs=3):
    """The same runs on the local engine, uninterrupted: the records every engine must reproduce."""
    jobs = sweep.plan(_configs(idx_dir, epochs), tmp_path / "reference")
    assert set(sweep.run_jobs(jobs, 2, tmp_path / "reference" / "logs", poll=0.1).values()) == {0}
    return {job.name: _records(job.run_dir) for job in jobs}


def test_make_launcher_names_the_engines(tmp_path):
    assert isinstance(launchers.make_launcher("local", tmp_path), launchers.LocalLauncher)
    with pytest.raises(ValueError, match="unknown engine 'dask': choose one of local, ray, slurm"):
        launchers.make_launcher("dask", tmp_path)
    with pytest.raises(ValueError, match="the local engine takes no options"):
        launchers.make_launcher("local", tmp_path, address="auto")
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        launchers.RayLauncher(max_retries=-1)


def test_a_job_without_a_configuration_is_refused_by_the_engines_that_train_in_process(tmp_path):
    job = sweep.Job("r", ["python", "run.py"], tmp_path / "r", None)
    with pytest.raises(ValueError, match="this engine trains a RunConfig"):
        launchers.RayLauncher().start(job, tmp_path / "r.log")


@pytest.mark.slow
def test_slurm_engine_through_submitits_local_executor_resumes_and_reports(idx_dir, tmp_path):
    """submitit's local executor runs the SLURM engine's jobs (an array) as local processes: the same callable a
    SLURM node runs (sbatch, the requeue on preemption and SLURM's own scheduling aside), with the records of the
    local engine's runs; a rerun of the same sweep skips them."""
    pytest.importorskip("submitit")
    if os.geteuid() == 0 and shutil.which("slurmctld"):
        pytest.skip("SLURM itself is installed: test_slurm_engine_on_a_one_node_cluster_resumes_a_preempted_job "
                    "runs the same jobs through sbatch")
    reference = _reference(idx_dir, tmp_path)
    jobs = sweep.plan(_configs(idx_dir), tmp_path / "runs")
    launcher = launchers.make_launcher("slurm", tmp_path / "runs", cluster="local", time_minutes=10)
    assert launcher.executor.cluster == "local"
    codes = sweep.run_jobs(jobs, 4, tmp_path / "runs" / "logs", poll=0.2, launcher=launcher)
    assert codes == {job.name: 0 for job in jobs}
    for job in jobs:
        assert _records(job.run_dir) == reference[job.name]
        assert "[slurm] process " in (tmp_path / "runs" / "logs" / f"{job.name}.log").read_text()
    # A rerun of the same sweep skips them all.
    assert set(sweep.run_jobs(jobs, 4, tmp_path / "runs" / "logs", launcher=launcher).values()) == {None}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.mark.slow
def test_sweep_py_on_a_two_node_ray_cluster_survives_a_killed_worker_and_a_killed_node(idx_dir, tmp_path,
                                                                                      monkeypatch):
    ray = pytest.importorskip("ray")
    port = _free_port()
    temp = Path(f"/tmp/ray-ki-{os.getpid()}")  # Ray's sockets need a short path
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "KERAS_BACKEND": "jax",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "RAY_health_check_initial_delay_ms": "0", "PYTHONPATH": str(ROOT)}
    for key, value in env.items():
        if key.startswith("RAY_") or key in ("KERAS_BACKEND", "PYTHONPATH"):
            monkeypatch.setenv(key, value)
    reference = _reference(idx_dir, tmp_path, epochs=6)  # on JAX, as the Ray runs
    head = subprocess.run([_ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                           "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp}"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert head.returncode == 0, head.stdout + head.stderr
    # The second node in its own session: its raylet, agents and workers keep this pid as their session id (the
    # workers get process groups of their own).
    node = subprocess.Popen([_ray_cli(), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--block"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        deadline = time.time() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline, "the second node did not join"
            time.sleep(0.5)
        jobs = sweep.plan(_configs(idx_dir, epochs=6), tmp_path / "runs")
        logs = tmp_path / "runs" / "logs"
        killed = {}

        def saboteur():
            """Once two runs have tracked points: kill the worker process of one run (its pid, from its log's
            first line), then the whole second node (its process group) while a run trains on it."""
            pids = {}
            deadline = time.time() + 600
            while time.time() < deadline and len(killed) < 2:
                for job in jobs:
                    log = logs / f"{job.name}.log"
                    if not log.exists() or job.name in killed.values():
                        continue
                    found = re.findall(r"\[ray\] process (\d+) on", log.read_text())
                    points = len(_records(job.run_dir)) if (job.run_dir / "metrics.jsonl").exists() else 0
                    if found and points >= 6 and sweep.run_state(job.run_dir) == "running":
                        pids[job.name] = int(found[-1])
                if "worker" not in killed and pids:
                    name, pid = next(iter(pids.items()))
                    os.kill(pid, signal.SIGKILL)
                    killed["worker"] = name
                elif "worker" in killed and "node" not in killed:
                    others = [name for name in pids if name != killed["worker"]]
                    on_node = [name for name in others if _in_session(pids[name], node.pid)]
                    if on_node:
                        for pid in _session_processes(node.pid):  # the raylet, its agents and its workers
                            os.kill(pid, signal.SIGKILL)
                        killed["node"] = on_node[0]
                time.sleep(0.2)

        thread = threading.Thread(target=saboteur, daemon=True)
        thread.start()
        started = time.time()
        # experiments/sweep.py itself, as a user runs it, with the grid of _configs(idx_dir, 6).
        code = _sweep_script().main([
            "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--max-retries", "3", "--runs-dir",
            str(tmp_path / "runs"), "--datasets", "mnist", "--data-dir", idx_dir, "--epochs", "6", "--batch-sizes",
            "64", "--ghost-batch-size", "64", "--track-every", "2", "--lrs", "0.1", "0.05", "--seeds", "0", "1",
            "--jobs", "4", "--no-hparams", "--", "--deterministic"])
        elapsed = time.time() - started
        thread.join(timeout=5)
        assert set(killed) == {"worker", "node"}, killed
        assert code == 0, {job.name: (logs / f"{job.name}.log").read_text()[-2000:] for job in jobs}
        for job in jobs:
            # JAX on a CPU is deterministic here: the resumed runs' records are an uninterrupted run's, bit for bit.
            assert _records(job.run_dir) == reference[job.name], job.name
        for name in killed.values():
            assert len(re.findall(r"\[ray\] process \d+ on", (logs / f"{name}.log").read_text())) >= 2
        print(f"ray sweep of 4 runs with a killed worker and a killed node: {elapsed:.0f} s")
    finally:
        ray.shutdown()
        for pid in _session_processes(node.pid):
            os.kill(pid, signal.SIGKILL)
        subprocess.run([_ray_cli(), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _sweep_script():
    spec = importlib.util.spec_from_file_location("sweep_script", ROOT / "experiments" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_session(pid: int, session: int) -> bool:
    try:
        return os.getsid(pid) == session
    except ProcessLookupError:
        return False


def _session_processes(session: int) -> list[int]:
    """The process ids of a session (from /proc), its leader last."""
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    members = [pid for pid in pids if pid != session and _in_session(pid, session)]
    return members + ([session] if _in_session(session, session) else [])


@pytest.mark.slow
@pytest.mark.parametrize("engine, flags", [
    ("slurm", ["--slurm-cluster", "local", "--slurm-time", "10"]),
    ("ray", ["--ray-cpus", "1"]),  # a local Ray instance, started and shut down by the sweep
])
def test_sweep_py_runs_a_grid_on_each_engine_and_summarizes(engine, flags, tmp_path):
    pytest.importorskip("submitit" if engine == "slurm" else "ray")
    env = {**os.environ, "KERAS_BACKEND": "jax", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(ROOT)}
    runs = tmp_path / "runs"
    command = [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--engine", engine, *flags, "--runs-dir",
               str(runs), "--lrs", "0.1", "0.05", "--seeds", "0", "--epochs", "1", "--train-subset", "512",
               "--jobs", "2", "--no-hparams"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = (runs / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",finished," in row for row in rows[1:]), rows
    logs = sorted((runs / "logs").glob("*.log"))
    assert len(logs) == 2 and all(f"[{engine}] process " in log.read_text() for log in logs)
    # The same command again: both runs skipped, whatever engine ran them.
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0 and again.stdout.count("[sweep] skip ") == 2, again.stdout[-2000:]


@pytest.fixture
def slurm_cluster(tmp_path, monkeypatch):
    """A one-node SLURM cluster on this machine (Debian's slurm-wlm and munge; as root), in its own directory:
    munged with its own key and socket, slurmctld and slurmd on free ports; stopped by their pid files."""
    needed = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")
    if os.geteuid() != 0 or not all(shutil.which(name) for name in needed):
        pytest.skip("needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)")
    base = Path(f"/tmp/ki-slurm-{os.getpid()}")  # munge's socket path must be short
    shutil.rmtree(base, ignore_errors=True)
    for folder in ("state", "spool", "log", "munge"):
        (base / folder).mkdir(parents=True)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (base / "munge").chmod(0o700)
    socket_path = base / "munge" / "munge.socket"
    subprocess.run(["munged", "--force", f"--socket={socket_path}", f"--key-file={key}",
                    f"--pid-file={base / 'munge' / 'munged.pid'}", f"--log-file={base / 'munge' / 'munged.log'}",
                    f"--seed-file={base / 'munge' / 'seed'}"], check=True, timeout=60)
    host = socket.gethostname().split(".")[0]
    ports = _free_port(), _free_port()
    conf = base / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=ki", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={socket_path}", "CredType=cred/munge",
        f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}", f"StateSaveLocation={base / 'state'}",
        f"SlurmdSpoolDir={base / 'spool'}", f"SlurmctldPidFile={base / 'slurmctld.pid'}",
        f"SlurmdPidFile={base / 'slurmd.pid'}", f"SlurmctldLogFile={base / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={base / 'log' / 'slurmd.log'}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    try:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(conf)], check=True, timeout=60)
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout:
            assert time.time() < deadline, (base / "log" / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield base
    finally:
        subprocess.run(["scancel", "--partition=debug"], capture_output=True, timeout=60)
        for pid_file in (base / "slurmd.pid", base / "slurmctld.pid", base / "munge" / "munged.pid"):
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_slurm_engine_on_a_one_node_cluster_resumes_a_preempted_job(slurm_cluster, idx_dir, tmp_path, monkeypatch):
    """A real SLURM cluster: the sweep's runs are sbatch jobs (one array); one running job gets SIGUSR2, SLURM's
    warning before a preemption or the time limit: submitit calls the run's checkpoint, requeues the job, and the
    run resumes from its last epoch's checkpoint. Every run's records equal an uninterrupted local run's."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    configs = _configs(idx_dir, epochs=6)[:2]
    reference_jobs = sweep.plan(configs, tmp_path / "reference")
    assert set(sweep.run_jobs(reference_jobs, 2, tmp_path / "reference" / "logs", poll=0.1).values()) == {0}
    jobs = sweep.plan(configs, tmp_path / "runs")
    logs = tmp_path / "runs" / "logs"
    signalled = []

    def preempt():
        deadline = time.time() + 600
        while time.time() < deadline and not signalled:
            running = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %o"], capture_output=True,
                                     text=True).stdout.split()
            points = len(_records(jobs[0].run_dir)) if (jobs[0].run_dir / "metrics.jsonl").exists() else 0
            if running and points >= 8 and sweep.run_state(jobs[0].run_dir) == "running":
                job_id = running[0]
                subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
                signalled.append(job_id)
            time.sleep(0.3)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    launcher = launchers.make_launcher("slurm", tmp_path / "runs", cluster="slurm", partition="debug",
                                       time_minutes=10)
    started = time.time()
    codes = sweep.run_jobs(jobs, 2, logs, poll=0.5, launcher=launcher)
    thread.join(timeout=5)
    assert signalled, "no job was running long enough to be preempted"
    assert codes == {job.name: 0 for job in jobs}, {job.name: (logs / f"{job.name}.log").read_text()[-2000:]
                                                     for job in jobs}
    for job, reference in zip(jobs, reference_jobs):
        assert _records(job.run_dir) == _records(reference.run_dir), job.name
    texts = [(logs / f"{job.name}.log").read_text() for job in jobs]
    assert sum("Requeued job" in text for text in texts) == 1
    assert sorted(text.count("[slurm] process ") for text in texts) == [1, 2]  # the preempted one started twice
    print(f"slurm sweep of 2 runs with one preempted and requeued: {time.time() - started:.0f} s")


@pytest.mark.slow
def test_ray_reports_a_failing_run_without_retrying_and_ctrl_c_leaves_resumable_runs(idx_dir, tmp_path, monkeypatch):
    """On a local Ray instance: a run that fails for its own reasons (a missing data directory) ends with its exit
    code and its message, started once; Ctrl-C on the driver cancels the running task, which stops at its next
    batch; the same sweep again resumes it to the records of an uninterrupted run."""
    pytest.importorskip("ray")
    import _thread

    import ray

    for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"), ("KERAS_BACKEND", "jax"),
                       ("PYTHONPATH", str(ROOT))):
        monkeypatch.setenv(key, value)
    reference = _reference(idx_dir, tmp_path, epochs=6)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    launcher = launchers.RayLauncher(max_retries=3, backend="jax")
    try:
        (tmp_path / "empty").mkdir()  # a data directory without the dataset's files: refused when loading
        bad = sweep.plan([RunConfig(dataset="mnist", data_dir=str(tmp_path / "empty"), epochs=1)], tmp_path / "bad")
        codes = sweep.run_jobs(bad, 1, tmp_path / "bad" / "logs", poll=0.1, launcher=launcher)
        assert codes == {bad[0].name: 1}  # train_with_exit_code's "cannot start", not a retry
        log = (tmp_path / "bad" / "logs" / f"{bad[0].name}.log").read_text()
        assert log.count("[ray] process ") == 1 and "error: " in log and "empty" in log, log[-2000:]

        jobs = sweep.plan(_configs(idx_dir, epochs=6)[:1], tmp_path / "runs")
        metrics = jobs[0].run_dir / "metrics.jsonl"

        def interrupt_once_training():
            deadline = time.time() + 300
            while time.time() < deadline:
                if metrics.exists() and len(_records(jobs[0].run_dir)) >= 10:
                    _thread.interrupt_main()  # as Ctrl-C in the driver's terminal
                    return
                time.sleep(0.1)

        threading.Thread(target=interrupt_once_training, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            sweep.run_jobs(jobs, 1, tmp_path / "runs" / "logs", poll=0.1, launcher=launcher, interrupt_grace=120)
        assert sweep.run_state(jobs[0].run_dir) == "running"  # stopped, not finished: resumable
        assert sweep.run_jobs(jobs, 1, tmp_path / "runs" / "logs", poll=0.1, launcher=launcher) == {jobs[0].name: 0}
        assert _records(jobs[0].run_dir) == reference[jobs[0].name]
    finally:
        launcher.close()
        ray.shutdown()
