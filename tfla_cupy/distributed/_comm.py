"""One NCCL communicator per process (one process per GPU), set up from the environment the
launcher (``python -m tfla_cupy.distributed.run``) or mpirun provides (docs/distributed.md §3)."""

from __future__ import annotations

import os

from . import _rendezvous

#: Environment variables set by the launcher.
ENV_RANK, ENV_WORLD, ENV_LOCAL = "TFLA_RANK", "TFLA_WORLD_SIZE", "TFLA_LOCAL_RANK"
ENV_METHOD, ENV_ADDR, ENV_PORT = "TFLA_RENDEZVOUS", "TFLA_MASTER_ADDR", "TFLA_MASTER_PORT"
ENV_FILE, ENV_ID, ENV_TIMEOUT = "TFLA_RENDEZVOUS_FILE", "TFLA_NCCL_ID", "TFLA_RENDEZVOUS_TIMEOUT"
#: Variables by which MPI launchers announce rank, size and node-local rank.
_MPI_ENV = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"))


def encode_id(uid):
    """The NCCL unique id (a tuple of 128 C chars) as bytes."""
    return bytes(int(x) & 0xFF for x in uid)


def decode_id(data, *, signed=True):
    """Bytes back to the tuple NcclCommunicator takes (C char is signed on x86-64)."""
    return tuple(b - 256 if signed and b > 127 else b for b in data)


class NcclComm:
    """A communicator of ``size`` ranks, this process being ``rank`` on GPU ``device``.

    Collectives run on CuPy's current stream and do not synchronise the host.
    """

    def __init__(self, comm, rank, size, device):
        self.comm, self.rank, self.size, self.device = comm, rank, size, device

    def all_gather(self, x):
        """(size,) + x.shape array of every rank's ``x`` (a C-contiguous CuPy array of the
        same shape and dtype on every rank), in rank order."""
        import cupy as cp
        from cupy.cuda import nccl
        if not isinstance(x, cp.ndarray) or not x.flags.c_contiguous:
            raise TypeError(f"x: expected a C-contiguous CuPy array, got {type(x).__name__}")
        out = cp.empty((self.size,) + x.shape, x.dtype)
        self.comm.allGather(x.data.ptr, out.data.ptr, x.nbytes, nccl.NCCL_UINT8,
                            cp.cuda.get_current_stream().ptr)
        return out

    def destroy(self):
        self.comm.destroy()

    def __repr__(self):
        return f"NcclComm(rank={self.rank}, size={self.size}, device={self.device})"


def _int_env(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def _topology():
    """(rank, world_size, local_rank, method): the launcher's variables, else an MPI
    launcher's, else a single process."""
    if ENV_RANK in os.environ:
        return (_int_env(ENV_RANK, 0), _int_env(ENV_WORLD, 1), _int_env(ENV_LOCAL, 0),
                os.environ.get(ENV_METHOD, "tcp"))
    for r, s, l in _MPI_ENV:
        if r in os.environ and s in os.environ:
            return _int_env(r, 0), _int_env(s, 1), _int_env(l, 0), os.environ.get(ENV_METHOD, "mpi")
    return 0, 1, 0, os.environ.get(ENV_METHOD, "tcp")


def init(*, device=None, timeout=None):
    """The NCCL communicator of this process (:class:`NcclComm`).

    Rank, world size, local rank and the way the NCCL unique id is shared come from the
    environment of ``python -m tfla_cupy.distributed.run`` (TFLA_RANK, TFLA_WORLD_SIZE,
    TFLA_LOCAL_RANK, TFLA_RENDEZVOUS = tcp | file | env | mpi, TFLA_MASTER_ADDR,
    TFLA_MASTER_PORT, TFLA_RENDEZVOUS_FILE, TFLA_NCCL_ID), or from mpirun (then the id is
    broadcast with mpi4py). Without either it is a communicator of world size 1. The process
    uses GPU ``device`` (default: its local rank). NCCL_NVLS_ENABLE defaults to 0.
    """
    import cupy as cp
    from cupy.cuda import nccl
    if not nccl.available:
        raise RuntimeError("tfla_cupy.distributed needs NCCL: cupy.cuda.nccl could not load libnccl "
                           "(pip install nvidia-nccl-cu12, or the cu13 wheel)")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank, size, local_rank, method = _topology()
    if not 0 <= rank < size:
        raise ValueError(f"{ENV_RANK}: expected 0 <= rank < world size {size}, got {rank}")
    dev = cp.cuda.Device(local_rank if device is None else device)
    dev.use()
    timeout = float(os.environ.get(ENV_TIMEOUT, _rendezvous.DEFAULT_TIMEOUT)) if timeout is None else timeout
    data = _rendezvous.share(lambda: encode_id(nccl.get_unique_id()), rank=rank, world_size=size, method=method,
                             addr=os.environ.get(ENV_ADDR, "127.0.0.1"), port=os.environ.get(ENV_PORT),
                             path=os.environ.get(ENV_FILE), env_var=ENV_ID, timeout=timeout)
    return NcclComm(_communicator(nccl, size, data, rank), rank, size, dev.id)


def _communicator(nccl, size, data, rank):
    """NcclCommunicator from the shared id bytes: CuPy 14 takes the bytes themselves, older
    releases a tuple of C chars (signed on x86-64, unsigned elsewhere). A form a release does
    not take is refused at once (TypeError / OverflowError), before any rank waits."""
    errors = []
    for uid in (bytes(data), decode_id(data, signed=True), decode_id(data, signed=False)):
        try:
            return nccl.NcclCommunicator(size, uid, rank)
        except (TypeError, OverflowError) as e:
            errors.append(f"{type(uid).__name__}: {e}")
    raise TypeError("cupy.cuda.nccl.NcclCommunicator took none of the unique-id forms: " + "; ".join(errors))
