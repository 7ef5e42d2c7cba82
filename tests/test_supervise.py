"""``keisei run``'s supervision (keisei_stream.ops.supervise) on real child processes: a worker that
exits unexpectedly is restarted with backoff and counted; one stopped on purpose is not; the
learner is restarted with its resume command, and ends the run once its restarts are used up."""

from __future__ import annotations

import sys
import time

from keisei_stream.ops import supervise
from keisei_stream.wire import status
from keisei_stream.wire.keys import Keys

K = Keys("sup")
EXIT3 = [sys.executable, "-c", "import sys; sys.exit(3)"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def _sup(fake_redis, tmp_path, learner_cmd=SLEEP, worker_cmds=(EXIT3,), learner_restarts=0, resume_cmd=None):
    learner = supervise.Child("learner", list(learner_cmd), {}, tmp_path / "learner.out", resume_cmd=resume_cmd)
    workers = [supervise.Child(f"w{i}", list(c), {}, tmp_path / f"w{i}.out") for i, c in enumerate(worker_cmds)]
    lines: list[str] = []
    sup = supervise.Supervisor(fake_redis, K, learner, workers, backoff=supervise.Backoff(base_s=0.2, cap_s=0.8),
                               learner_restarts=learner_restarts, say=lines.append)
    return sup, lines


def _rounds(sup, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        why = supervise.check_children(sup)
        if why:
            return why
        time.sleep(0.05)
    return None


def test_a_crashing_worker_is_restarted_with_backoff_and_counted(fake_redis, tmp_path):
    sup, lines = _sup(fake_redis, tmp_path)
    sup.start()
    try:
        assert _rounds(sup, 2.5) is None
        w = sup.workers[0]
        # delays 0.2, 0.4, 0.8, 0.8 ... (exits within reset_after_s of the start): 3 to 5 restarts in 2.5 s
        assert 3 <= w.restarts <= 6, lines
        assert w.exit_codes[:3] == [3, 3, 3]
        counted = status.read_supervisor(fake_redis, K)
        assert counted["worker_restarts"] == counted["restarts:w0"] == w.restarts
        assert any("w0 exited with 3" in x for x in lines) and any("w0 restarted" in x for x in lines)
    finally:
        supervise.stop_in_order(sup, learner_stop_timeout=5, worker_stop_s=1)
    assert status.get_control(fake_redis, K) == "stop" and not sup.learner.running()


def test_a_worker_stopped_on_purpose_is_not_restarted(fake_redis, tmp_path):
    status.set_control(fake_redis, K, "stop")
    sup, _ = _sup(fake_redis, tmp_path)
    sup.start()
    try:
        assert _rounds(sup, 1.0) is None
        assert sup.workers[0].restarts == 0 and status.read_supervisor(fake_redis, K) == {}
    finally:
        supervise.stop_in_order(sup, learner_stop_timeout=5, worker_stop_s=1)


def test_the_learner_is_restarted_with_resume_then_ends_the_run(fake_redis, tmp_path):
    marker = tmp_path / "resumed"
    resume = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x'); import sys; sys.exit(4)"]
    sup, lines = _sup(fake_redis, tmp_path, learner_cmd=EXIT3, worker_cmds=(SLEEP,), learner_restarts=2,
                      resume_cmd=resume)
    sup.start()
    try:
        why = _rounds(sup, 10.0)
    finally:
        supervise.stop_in_order(sup, learner_stop_timeout=5, worker_stop_s=1)
    assert why == "the learner exited with 4", lines
    assert marker.read_text() == "xx"  # both restarts ran the resume command
    assert status.read_supervisor(fake_redis, K)["learner_restarts"] == 2
    assert sup.workers[0].restarts == 0


def test_backoff_doubles_up_to_the_cap():
    b = supervise.Backoff(base_s=1.0, cap_s=30.0)
    assert [b.delay(n) for n in (1, 2, 3, 5, 6, 10)] == [1.0, 2.0, 4.0, 16.0, 30.0, 30.0]


def test_restart_counts_wait_while_redis_is_full(fake_redis, tmp_path):
    """A full Redis (OOM) must not end the supervision: the count is written once there is room
    (the chaos run found `keisei run` exiting on this)."""
    from redis.exceptions import OutOfMemoryError

    class Full:
        def __init__(self, r):
            self.r, self.full = r, True

        def __getattr__(self, name):
            return getattr(self.r, name)

        def pipeline(self, *a, **kw):
            if self.full:
                raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
            return self.r.pipeline(*a, **kw)

    sup, _ = _sup(fake_redis, tmp_path)
    sup.r = Full(fake_redis)
    sup.start()
    try:
        assert _rounds(sup, 0.8) is None and sup.workers[0].restarts >= 1
        assert sup.unreported and status.read_supervisor(fake_redis, K) == {}
        sup.r.full = False
        supervise.report_restarts(sup)
        assert not sup.unreported and status.read_supervisor(fake_redis, K)["worker_restarts"] == sup.workers[0].restarts
    finally:
        supervise.stop_in_order(sup, learner_stop_timeout=5, worker_stop_s=1)


def test_keisei_run_places_its_workers_on_the_gpus_round_robin(monkeypatch, tmp_path):
    """With GPUs (as nvidia-smi lists them) and worker.device auto or cuda, worker i runs its
    forward pass on cuda:(i mod GPUs) and one more core is left to the learner; a config that
    names a device, or a machine without GPUs, keeps the config's device."""
    import argparse
    import os
    import stat

    from keisei_stream.cli.run import n_workers, worker_command
    from keisei_stream.ops import local

    assert local.worker_devices("auto", 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert local.worker_devices("cuda", 2, 1) == ["cuda:0", "cuda:0"]
    assert local.worker_devices("cpu", 2, 2) == [None, None] and local.worker_devices("cuda:1", 1, 2) == [None]
    assert local.worker_devices("auto", 3, 0) == [None, None, None]
    args = argparse.Namespace(workers=None, games=None)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert n_workers(args, 0) == 15 and n_workers(args, 1) == 14
    assert worker_command(args, "r", "w3", "cuda:1")[-2:] == ["--device", "cuda:1"]
    assert "--device" not in worker_command(args, "r", "w3", None)
    fake = tmp_path / "nvidia-smi"  # what nvidia-smi -L prints on a machine with two GPUs
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert local.gpu_count() == 2


def test_a_child_stopped_on_a_configuration_error_ends_the_run_with_its_message(fake_redis, tmp_path):
    """Exit status EXIT_CONFIG (78) means "restarting cannot help": no restart, the run ends at
    once and says why (the child's last ``error:`` line)."""
    from keisei_stream.config import EXIT_CONFIG

    bad = [sys.executable, "-c", f"import sys; print('loading'); print('error: device cuda cannot be used', "
                                 f"file=sys.stderr); sys.exit({EXIT_CONFIG})"]
    sup, lines = _sup(fake_redis, tmp_path, worker_cmds=(bad, SLEEP))
    sup.start()
    try:
        why = _rounds(sup, 10.0)
        assert why == sup.fatal == "w0 stopped on a configuration error: device cuda cannot be used"
        assert sup.workers[0].restarts == 0 and sup.worker_restarts() == 0
    finally:
        supervise.stop_in_order(sup, learner_stop_timeout=5, worker_stop_s=1)
