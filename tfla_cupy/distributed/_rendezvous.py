"""Sharing one opaque byte string (the NCCL unique id) from rank 0 with every other rank.

Methods (docs/distributed.md §3):
  "tcp"   rank 0 serves the bytes on (addr, port) to world_size − 1 connections; the others
          connect, retrying until the timeout. Works across nodes (addr = rank 0's host).
  "file"  rank 0 writes the bytes to a path (atomically, by rename); the others poll for it.
          Needs a file system every rank sees; the path must not exist beforehand.
  "env"   the bytes are already in an environment variable, hex (the launcher made them).
  "mpi"   an MPI broadcast through mpi4py (when the processes were started by mpirun).
Rank 0 produces the bytes by calling ``make()`` only once it is sure to share them.
"""

from __future__ import annotations

import os
import socket
import struct
import time

METHODS = ("tcp", "file", "env", "mpi")
DEFAULT_TIMEOUT = 300.0
_MAGIC = b"TFLA"


class RendezvousError(RuntimeError):
    """The peer at the rendezvous address is not a tfla_cupy rank 0."""


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("rendezvous: rank 0 closed the connection early")
        data += chunk
    return data


def _serve_tcp(payload, addr, port, clients, timeout):
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(max(clients, 1))
        for _ in range(clients):
            srv.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                raise TimeoutError(f"rendezvous: rank 0 waited {timeout:g} s on {addr}:{port} for "
                                   f"{clients} other ranks") from None
            with conn:
                conn.sendall(_MAGIC + struct.pack("!I", len(payload)) + payload)


def _fetch_tcp(addr, port, timeout):
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(deadline - time.monotonic(), 0.01)) as s:
                head = _recv_exact(s, 8)
                if head[:4] != _MAGIC:
                    raise RendezvousError(f"rendezvous: {addr}:{port} is not a tfla_cupy rendezvous")
                return _recv_exact(s, struct.unpack("!I", head[4:])[0])
        except OSError:  # not listening yet (refused), or a connection cut short: retry
            if time.monotonic() > deadline:
                raise TimeoutError(f"rendezvous: no rank 0 at {addr}:{port} within {timeout:g} s") from None
            time.sleep(delay)
            delay = min(2 * delay, 1.0)


def _write_file(payload, path):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(payload)
    os.replace(tmp, path)


def _read_file(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rendezvous: {path} did not appear within {timeout:g} s")
        time.sleep(0.02)
    with open(path, "rb") as fh:
        return fh.read()


def share(make, *, rank, world_size, method, addr="127.0.0.1", port=None, path=None, env_var=None,
          timeout=DEFAULT_TIMEOUT):
    """Return the bytes ``make()`` produced on rank 0, on every rank."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if world_size == 1 and method != "env":
        return make()
    if method == "tcp":
        if port is None:
            raise ValueError("port: the tcp rendezvous needs a port (TFLA_MASTER_PORT), got None")
        if rank == 0:
            payload = make()
            _serve_tcp(payload, "" if addr not in ("127.0.0.1", "localhost") else addr, int(port),
                       world_size - 1, timeout)
            return payload
        return _fetch_tcp(addr, int(port), timeout)
    if method == "file":
        if not path:
            raise ValueError("path: the file rendezvous needs a path (TFLA_RENDEZVOUS_FILE), got None")
        if rank == 0:
            payload = make()
            _write_file(payload, path)
            return payload
        return _read_file(path, timeout)
    if method == "env":
        value = os.environ.get(env_var or "")
        if not value:
            raise ValueError(f"{env_var}: the env rendezvous needs the id in this environment variable, "
                             "got nothing")
        return bytes.fromhex(value)
    from mpi4py import MPI
    return MPI.COMM_WORLD.bcast(make() if rank == 0 else None, root=0)
