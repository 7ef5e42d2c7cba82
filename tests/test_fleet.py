"""Several hosts on one machine (network namespaces, ``benchmarks/netns.py``; needs root and
iproute2, skipped otherwise with the reason): a short ``benchmarks/fleet.py`` run with a failover,
and two learner nodes under torchrun's c10d rendezvous running the command of
``docs/scaling.md``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT / "benchmarks"))  # last: benchmarks/learner.py must not hide the learner package
import netns  # noqa: E402
from procs import TINY, assert_accounting_balances, wait_for, weights_version  # noqa: E402
from test_distributed import _pid, _segments  # noqa: E402

from keisei_stream.ops.embedded_redis import start_redis  # noqa: E402
from keisei_stream.wire import status  # noqa: E402
from keisei_stream.wire.client import connect  # noqa: E402
from keisei_stream.wire.keys import Keys  # noqa: E402

WHY = netns.require_root_net()
pytestmark = [pytest.mark.fleet, pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=WHY or "")]

#: The command of docs/scaling.md ("Learners on several nodes"), run as is on each node
#: (``{...}`` filled in; the test checks that the document shows exactly this).
NODE_CMD = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 GLOO_SOCKET_IFNAME={ifname} torchrun --nnodes 2 --nproc-per-node {gpus} --rdzv-backend c10d "
            "--rdzv-endpoint {node0}:29400 --rdzv-id {run} --rdzv-conf is_host={is_host},join_timeout={join_s} "
            "--local-addr {addr} --max-restarts 3 -m learner --config {config} --redis {redis} --set run.id={run}")


def test_a_short_fleet_run_with_a_failover():
    """``benchmarks/fleet.py`` end to end on 2 hosts, the standby's replication paused 1.5 s before
    the primary is killed -9: one JSON line, weights fanned out by host (the primary sends a
    version about once per host and once to the standby), every worker on the new versions, the
    failover done, nothing exited, the adds the old primary acknowledged and never replicated
    counted exactly as lost by the workers (not 0: the pause makes some) with their reason, the
    accounting balanced, and every namespace gone afterwards."""
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--hosts", "2", "--synthetic-per-host",
                        "3", "--real-workers", "0", "--minutes", "0.75", "--version-every", "3", "--warmup", "5",
                        "--positions-per-s", "200", "--failover", "--replication-pause", "1.5"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["hosts"] == 2 and r["workers"] == 6 and r["failovers"] == 1 and r["exited_processes"] == []
    assert 2.5 <= r["egress_per_version_blobs"] <= r["hosts"] + 2, r  # two hosts and the standby: ~3 blobs
    assert r["never_held_pairs"] == 0 and r["version_p95_s"] is not None, r
    assert r["balanced"] and r["positions_in_stream"] == 0 and r["accounting"]["produced_positions"] > 0, r
    assert r["lost_positions"] > 0 and r["lost_exact"] and "failover" in r["lost_reasons"][0], r
    assert r["workers_held_monotonic"], r
    assert r["after_failover"]["versions"] >= 2, r  # the run carried on with the promoted replica
    if r["versions_went_back"]:  # only where the last version's replication was cut, and then recorded
        assert any(f.get("kind") == "failover" for f in r["losses"]), r
    left = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()) - before
    assert not [ns for ns in left if ns.startswith(netns.PREFIX)], left


def test_two_learner_nodes_train_in_lock_step_and_a_killed_node_is_handled(tmp_path):
    """Two nodes (namespaces), one learner rank each, joined by torchrun's c10d rendezvous with the
    documented command; a worker on a third host. The ranks train one model in lock-step
    (bitwise identical parameters after every update, both training); kill -9 of node 1's rank
    restarts both ranks (no hang); kill -9 of everything on node 1 (the node is gone) makes node 0
    give up after the rendezvous' join timeout instead of hanging; the two nodes started again
    with ``--resume`` re-read what the dead ranks held, and the accounting balances at the stop."""
    run, keys = "twonode", Keys("twonode")
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert NODE_CMD.format(ifname="IFACE", gpus="GPUS", node0="NODE0_ADDR", run="RUN", is_host="IS_HOST",
                           join_s="JOIN_S", addr="THIS_NODE_ADDR", config="configs/gpu.yaml",
                           redis="LEARNER_URL") in doc.replace("\\\n    ", "")
    with netns.Net() as net:
        n0, n1, wh = net.add_host("n0"), net.add_host("n1"), net.add_host("w")
        srv = start_redis(tmp_path / "redis", extra_args=["--port", "6379", "--bind", wh.addr, "--protected-mode", "no"],
                          prefix=wh.prefix)
        url = f"redis://{wh.addr}:6379/0"
        r = connect(srv.url)
        status.set_control(r, keys, "run")
        procs: dict[str, subprocess.Popen] = {}

        def start_node(k: int, *extra: str) -> subprocess.Popen:
            host = (n0, n1)[k]
            cmd = NODE_CMD.format(ifname="eth0", gpus=1, node0=n0.addr, run=run, is_host=int(k == 0), join_s=20,
                                  addr=host.addr, config=TINY, redis=url).split()
            n_env = next(i for i, tok in enumerate(cmd) if "=" not in tok)
            assert cmd[n_env] == "torchrun"
            cmd = [*cmd[:n_env], str(Path(sys.executable).parent / "torchrun"), *cmd[n_env + 1:],  # the venv's
                   "--set", f"run.dir={tmp_path / f'node{k}'}", "--set", "learner.check_sync_every=1",
                   "--set", "learner.dist_timeout_s=30", "--quiet", *extra]
            p = subprocess.Popen([*host.prefix, "env", *cmd], cwd=ROOT,
                                 stdout=open(tmp_path / f"node{k}.log", "ab"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs[f"node{k}"] = p
            return p

        def ranks_trained() -> list[int]:
            shown = json.loads(status.read_learner_status(r, keys).get("rank_trained_positions") or "[]")
            return shown if len(shown) == 2 else [0, 0]  # ("[]" before the ranks' first update)

        try:
            start_node(0), start_node(1)
            procs["worker"] = subprocess.Popen([*wh.prefix, sys.executable, "-m", "workers", "--redis", url, "--run", run,
                                                "--id", "w0"], cwd=ROOT, stdout=open(tmp_path / "worker.log", "ab"),
                                               stderr=subprocess.STDOUT)
            wait_for(lambda: weights_version(r, keys) >= 4 and min(ranks_trained()) > 0, 240, "both nodes training",
                     list(procs.values()))
            log0, log1 = tmp_path / "node0" / run / "logs" / "learner.log", tmp_path / "node1" / run / "logs" / "learner-rank1.log"
            os.kill(_pid(log1), signal.SIGKILL)  # node 1's learner
            wait_for(lambda: len(_segments(log1)) == 2 and len(_segments(log0)) == 2, 180, "both ranks restarted",
                     list(procs.values()))
            v = weights_version(r, keys)
            wait_for(lambda: weights_version(r, keys) >= v + 2 and min(ranks_trained()) > 0, 180,
                     "both ranks training after the restart", list(procs.values()))
            t = time.monotonic()
            for pid in subprocess.run(["ip", "netns", "pids", n1.ns], capture_output=True, text=True).stdout.split():
                os.kill(int(pid), signal.SIGKILL)  # node 1 is gone, agent and rank
            procs["node0"].wait(180)  # node 0 gives up after the join timeout: no hang
            waited = time.monotonic() - t
            assert procs["node0"].returncode != 0 and waited < 150, waited
            start_node(0, "--resume"), start_node(1, "--resume")
            wait_for(lambda: weights_version(r, keys) >= v + 4 and min(ranks_trained()) >= 256, 240,
                     "both ranks training after both nodes came back", [procs["worker"], procs["node0"], procs["node1"]])
            trained = ranks_trained()
            assert max(trained) <= 4 * min(trained), trained  # the ranks share the work
            status.set_control(r, keys, "stop")
            assert procs["worker"].wait(60) == 0
            for k in (0, 1):
                os.killpg(procs[f"node{k}"].pid, signal.SIGTERM)  # the agents forward it: the ranks drain and stop
            for k in (0, 1):
                procs[f"node{k}"].wait(180)
            assert status.read_learner_status(r, keys)["state"] == "stopped"
            assert_accounting_balances(r, keys)  # what the dead ranks held was re-read and trained
        finally:
            for p in procs.values():
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        p.kill()
                    p.wait()
            srv.stop()
        for a, b in zip(_segments(log0), _segments(log1)):
            common = a.keys() & b.keys()
            assert all(a[v] == b[v] for v in common)  # bitwise identical parameters after every update
        assert sum(len(a.keys() & b.keys()) for a, b in zip(_segments(log0), _segments(log1))) >= 4
