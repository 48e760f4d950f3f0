"""Launcher: one process per GPU, sharing the NCCL unique id (docs/distributed.md §3).

    python -m tfla_cupy.distributed.run --nproc N script.py [script args]

starts N copies of ``script.py`` with TFLA_RANK, TFLA_WORLD_SIZE, TFLA_LOCAL_RANK and the
rendezvous variables set; in the script, ``tfla_cupy.distributed.init()`` returns the
communicator. Several nodes: run the launcher once per node with the same --nnodes,
--master-addr (rank 0's host, reachable from every node) and --master-port, and its own
--node-rank; the tcp rendezvous then carries the id across nodes. If one process fails, the
launcher stops the others and exits with its status.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

from . import _comm
from ._rendezvous import METHODS


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser():
    ap = argparse.ArgumentParser(prog="python -m tfla_cupy.distributed.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, required=True, help="processes (GPUs) on this node")
    ap.add_argument("--nnodes", type=int, default=1, help="nodes taking part (default 1)")
    ap.add_argument("--node-rank", type=int, default=0, help="this node's index, 0 … nnodes−1")
    ap.add_argument("--master-addr", default="127.0.0.1", help="host of global rank 0 (tcp rendezvous)")
    ap.add_argument("--master-port", type=int, default=None,
                    help="port of the tcp rendezvous (default: a free port; required with --nnodes > 1)")
    ap.add_argument("--rendezvous", choices=[m for m in METHODS if m != "mpi"], default="tcp",
                    help="how rank 0 shares the NCCL id: tcp (default), file (--rendezvous-file), or env "
                         "(this launcher makes the id; one node only)")
    ap.add_argument("--rendezvous-file", default=None, help="path for --rendezvous file (default: a temp file)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds to wait for the other ranks")
    ap.add_argument("script", help="the Python script every rank runs")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")
    return ap


def _check(ap, a):
    if a.nproc < 1:
        ap.error(f"--nproc: expected >= 1, got {a.nproc}")
    if a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        ap.error(f"--node-rank: expected 0 <= node rank < nnodes = {a.nnodes}, got {a.node_rank}")
    if a.nnodes > 1 and a.master_port is None:
        ap.error("--master-port: required with --nnodes > 1 (every node must use the same port)")
    if a.nnodes > 1 and a.rendezvous == "env":
        ap.error("--rendezvous env: the id made by this launcher cannot reach other nodes; use tcp")


def _environments(a, tmpdir):
    world = a.nnodes * a.nproc
    base = dict(os.environ)
    base.setdefault("NCCL_NVLS_ENABLE", "0")
    base[_comm.ENV_WORLD] = str(world)
    base[_comm.ENV_METHOD] = a.rendezvous
    base[_comm.ENV_ADDR] = a.master_addr
    base[_comm.ENV_PORT] = str(a.master_port if a.master_port is not None else _free_port())
    if a.timeout is not None:
        base[_comm.ENV_TIMEOUT] = str(a.timeout)
    if a.rendezvous == "file":
        base[_comm.ENV_FILE] = a.rendezvous_file or os.path.join(tmpdir, "nccl_id")
    if a.rendezvous == "env":
        from cupy.cuda import nccl  # this process hosts NCCL's bootstrap root while the ranks connect
        base[_comm.ENV_ID] = _comm.encode_id(nccl.get_unique_id()).hex()
    envs = []
    for local in range(a.nproc):
        env = dict(base)
        env[_comm.ENV_RANK] = str(a.node_rank * a.nproc + local)
        env[_comm.ENV_LOCAL] = str(local)
        envs.append(env)
    return envs


def _wait(procs):
    """Wait for every process; on the first failure stop the others. Returns the exit status."""
    status = 0
    while procs:
        for p in list(procs):
            rc = p.poll()
            if rc is None:
                continue
            procs.remove(p)
            if rc != 0 and status == 0:
                status = rc
                for other in procs:
                    other.terminate()
        time.sleep(0.05)
    return status


def main(argv=None):
    ap = _parser()
    a = ap.parse_args(argv)
    _check(ap, a)
    with tempfile.TemporaryDirectory(prefix="tfla_rdzv_") as tmpdir:
        envs = _environments(a, tmpdir)
        procs = [subprocess.Popen([sys.executable, a.script, *a.args], env=env) for env in envs]
        try:
            status = _wait(list(procs))
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            status = 130
        for p in procs:
            p.wait()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
