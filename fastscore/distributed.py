"""fastscore on torch.distributed: sharded sampling and likelihoods, data-parallel training, under ``torchrun``.

fastscore runs on the engine its users already have: ``torch.distributed``, started by ``torchrun`` (gloo between
CPU processes, NCCL between GPUs), on one node or several; it manages no processes of its own. The command
line does it all by itself (``torchrun --nproc_per_node P -m fastscore sample|likelihood|train ...``, the same
flags as in one process: docs/distributed.md); this module holds what it uses, for scripts with their own loops:

* :func:`init` joins the process group ``torchrun`` describes (its environment variables), with a timeout on
  every collective (:data:`TIMEOUT_ENV`), and :func:`world` says who this process is (None in a single
  process, so code written with these helpers runs unchanged without ``torchrun``);
* :func:`shard_range` splits ``n`` items into contiguous, balanced, non-overlapping shards, one per rank;
* :func:`gather` concatenates every rank's tensor on rank 0, in rank order;
* :func:`sample` and :func:`log_likelihood` shard a sampling or likelihood job and gather the results.

Why sharding changes no result: a sample's start and every normal a sampler draws are functions of (seed,
the sample's global index) only (fastscore.noise: the counter-based generator, ``sample_offset`` naming a
shard's first sample), and the network is evaluated batch-invariantly
(:func:`fastscore.model_sampling.batch_invariant`). So a P-process run returns bitwise the samples of a
one-process run, on the same kind of machine with the same number of threads per process, for every
sampler; docs/distributed.md#what-is-bitwise says where that holds and where only float tolerance does
(training, GPUs, networks with batch statistics).

A rank that dies ends the job: ``torchrun`` stops the other processes of its node when one exits with an
error, and every collective of the group has a timeout, so a rank waiting for a peer that stopped (or that
hangs) raises :class:`DistributedError` within it instead of waiting forever.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "World",
    "DistributedError",
    "TIMEOUT_ENV",
    "DEFAULT_TIMEOUT",
    "launched",
    "init",
    "world",
    "shutdown",
    "shard_range",
    "gather",
    "all_reduce",
    "first_error",
    "broadcast_object",
    "communication",
    "sample",
    "log_likelihood",
]

TIMEOUT_ENV = "FASTSCORE_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT = 1800.0  # torch's own default for gloo
FAIL_ENV = "FASTSCORE_TEST_FAIL"  # the tests' hook: "RANK:POINT" or "RANK:POINT:hang" (fail_point)


class DistributedError(RuntimeError):
    """A collective could not complete (another rank stopped, or did not answer within the timeout), or a
    distributed run was set up wrongly. The message starts with the rank that raised it."""


@dataclass(frozen=True)
class World:
    """This process's place in the group: ``rank`` of ``size`` processes, ``local_rank`` on its node, the
    ``device`` it computes on, the collectives' ``timeout`` (seconds) and ``backend``."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    timeout: float
    backend: str

    @property
    def main(self) -> bool:
        """Is this rank 0, the one that writes outputs and checkpoints?"""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


_WORLD: World | None = None


def _env_int(name: str, default: int | None = None) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}: expected an integer (set by torchrun), got {text!r}") from None


def launched() -> bool:
    """Was this process started by ``torchrun`` (or another launcher setting ``WORLD_SIZE``) as one of several
    processes? A single-process ``torchrun`` counts as no launch: everything runs as without it."""
    return (_env_int("WORLD_SIZE", 1) or 1) > 1


def timeout_seconds(value=None) -> float:
    """The collectives' timeout in seconds: ``value``, else ``$FASTSCORE_DIST_TIMEOUT``, else 1800 (torch's
    default). A value that is not a positive number is an error naming where it came from."""
    what = "timeout"
    if value is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None or text.strip() == "":
            return DEFAULT_TIMEOUT
        what, value = TIMEOUT_ENV, text
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise DistributedError(f"{what}: expected a positive number of seconds, got {value!r}")
    return seconds


def init(*, device=None, backend: str | None = None, timeout: float | None = None) -> World | None:
    """Join the process group ``torchrun`` set up (``env://``: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) and return this process's :class:`World`; None when not launched with several processes
    (:func:`launched`). Idempotent: a group already initialised (by fastscore or the caller) is reused.

    ``device``: ``"cpu"`` (default) or ``"cuda"`` (this process's GPU is ``cuda:LOCAL_RANK``, made current).
    ``backend``: default ``"gloo"`` on CPUs, ``"cpu:gloo,cuda:nccl"`` on GPUs (NCCL for CUDA tensors, gloo for
    CPU ones). ``timeout`` (seconds; default :func:`timeout_seconds`): how long any collective waits for the
    other ranks before it fails, so that a rank whose peer died or hangs stops with an error."""
    global _WORLD
    import torch.distributed as dist

    if _WORLD is not None and dist.is_initialized():
        return _WORLD
    if dist.is_available() and dist.is_initialized():
        return world()
    if not launched():
        return None
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this build of torch")
    seconds = timeout_seconds(timeout)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device: cuda asked for, but no CUDA device is available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DistributedError(f"device: expected cpu or cuda, got {device}")
    backend = backend or ("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    # torch._dynamo, imported for the first time while a process group exists (fastscore's layers and
    # torch.compile import it), keeps ten references to the group in its tables of torch objects, so that
    # destroy_process_group cannot free it: gloo's threads then live on into the interpreter's teardown, where
    # their destruction races with it and a rank that finished its work aborts now and then ("terminate called
    # without an active exception"). Imported before the group exists, it holds none.
    from torch import _dynamo  # noqa: F401  (binds no local `torch`)

    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:
        rank = _env_int("RANK", 0)
        raise DistributedError(
            f"rank {rank} of {_env_int('WORLD_SIZE')}: joining the process group failed: {_first_line(exc)}"
        ) from None
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank, device, seconds, backend)
    return _WORLD


def world() -> World | None:
    """This process's :class:`World` when a process group of several processes is initialised (by
    :func:`init` or by the caller's own ``init_process_group``), else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _WORLD is not None:
        return _WORLD
    size = dist.get_world_size()
    if size < 2:
        return None
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    timeout = timeout_seconds()
    return World(dist.get_rank(), size, _env_int("LOCAL_RANK", 0), device, timeout, backend)


def shutdown() -> None:
    """Leave the process group :func:`init` joined (nothing when there is none)."""
    global _WORLD
    import torch.distributed as dist

    if _WORLD is not None and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


_COMMUNICATION_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


@contextmanager
def _collective(what: str, w: World, *, only_communication: bool = False):
    """A collective whose failure (a peer that stopped: the connection closed; or no answer within the
    timeout) becomes one :class:`DistributedError` saying which rank saw it, what it was doing and why.
    ``only_communication``: the block does other work too (a DDP backward), so only errors that come from the
    communication (torch's DistError, or a RuntimeError naming the backend or the connection) are restated."""
    import torch.distributed as dist

    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as exc:  # torch.distributed.DistBackendError is a RuntimeError
        text = str(exc).lower()
        if only_communication and not (
            isinstance(exc, getattr(dist, "DistError", ())) or any(word in text for word in _COMMUNICATION_WORDS)
        ):
            raise
        raise DistributedError(
            f"{w}: {what} failed: another rank stopped (its own error says why) or did not answer within "
            f"{w.timeout:g} s ({TIMEOUT_ENV}) [{_first_line(exc)}]"
        ) from None


@contextmanager
def communication(what: str):
    """Work that communicates with the other ranks besides computing (a DistributedDataParallel backward): a
    failure of the communication becomes a :class:`DistributedError` (as the helpers' collectives), any other
    error passes through. Nothing without a process group."""
    w = world()
    if w is None:
        yield
        return
    with _collective(what, w, only_communication=True):
        yield


def fail_point(point: str) -> None:
    """The tests' failure hook: with ``FASTSCORE_TEST_FAIL=RANK:POINT`` this rank raises
    :class:`DistributedError` when it reaches ``point`` (``RANK:POINT:hang``: it hangs there instead), so that
    the tests can check that the other ranks stop with an error, within the timeout. Nothing otherwise."""
    spec = os.environ.get(FAIL_ENV)
    w = world()
    if not spec or w is None:
        return
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != str(w.rank) or parts[1] != point:
        return
    if len(parts) > 2 and parts[2] == "hang":
        while True:
            time.sleep(3600)
    raise DistributedError(f"{w}: failing on purpose at {point} ({FAIL_ENV}={spec})")


# ---- sharding and collectives ---------------------------------------------------------------------------------


def shard_range(n: int, rank: int | None = None, size: int | None = None) -> range:
    """The items of ``n`` that ``rank`` of ``size`` processes takes (default: this process's, or all of them
    in a single process): contiguous, non-overlapping, covering ``[0, n)`` in rank order, the first ``n % size``
    ranks one item more than the others. Its ``start`` is the shard's ``sample_offset``."""
    from fastscore import _validate

    n = _validate.integer(n, "n", 0)
    if rank is None and size is None:
        w = world()
        rank, size = (w.rank, w.size) if w is not None else (0, 1)
    elif rank is None or size is None:
        raise ValueError("rank, size: give both or neither")
    size = _validate.integer(size, "size", 1)
    rank = _validate.integer(rank, "rank", 0, size)
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


_MAX_DIMS = 8


def gather(tensor: Tensor, *, dst: int = 0, what: str = "gathering the results") -> Tensor | None:
    """Every rank's ``tensor`` (N_r, ...) concatenated along dim 0 in rank order, on rank ``dst`` (None on the
    others); ``tensor`` itself in a single process. The shards may differ in length (an empty one included),
    not in their other dims or dtype (a ValueError naming ``tensor``). Bitwise: the values are copied, never
    reduced. A peer that stopped or does not answer within the timeout: :class:`DistributedError`."""
    import torch.distributed as dist

    w = world()
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if w is None:
        return tensor
    if tensor.dim() < 1 or tensor.dim() > _MAX_DIMS:
        raise ValueError(f"tensor: expected 1 to {_MAX_DIMS} dims (N, ...), got shape {tuple(tensor.shape)}")
    t = tensor.contiguous()
    code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1
    meta = torch.tensor([t.dim(), code, *t.shape, *([0] * (_MAX_DIMS - t.dim()))], dtype=torch.int64, device=t.device)
    metas = [torch.empty_like(meta) for _ in range(w.size)]
    with _collective(what, w):
        dist.all_gather(metas, meta)
    metas = [m.tolist() for m in metas]
    rest = {(m[0], m[1], *m[3 : 2 + m[0]]) for m in metas}
    if len(rest) != 1 or code < 0:
        raise ValueError(
            f"tensor: {what}: the ranks' tensors differ in dims beyond the first or in dtype, or the dtype "
            f"({t.dtype}) cannot be sent: {sorted(rest)}"
        )
    sizes = [m[2] for m in metas]
    longest = max(sizes)
    if longest == 0:
        return t if w.rank == dst else None
    if t.shape[0] < longest:
        t = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in range(w.size)] if w.rank == dst else None
    with _collective(what, w):
        dist.gather(t, parts, dst=dst)
    if w.rank != dst:
        return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


def all_reduce(value, op: str = "sum", *, what: str = "a reduction"):
    """``value`` (a number or a tensor) reduced over the ranks (``op``: ``"sum"`` or ``"max"``), on every rank;
    ``value`` itself in a single process. A number comes back as a Python number, a tensor as a new tensor."""
    import torch.distributed as dist

    w = world()
    if w is None:
        return value
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op: expected sum or max, got {op!r}")
    number = not isinstance(value, Tensor)
    t = torch.tensor(value, device=w.device) if number else value.detach().clone()
    with _collective(what, w):
        dist.all_reduce(t, op=ops[op])
    return t.item() if number else t


def broadcast_object(obj, *, src: int = 0, what: str = "a broadcast"):
    """``obj`` (anything picklable) from rank ``src``, on every rank; ``obj`` itself in a single process."""
    import torch.distributed as dist

    w = world()
    if w is None:
        return obj
    box = [obj if w.rank == src else None]
    with _collective(what, w):
        dist.broadcast_object_list(box, src=src, device=w.device if w.device.type == "cuda" else None)
    return box[0]


def first_error(message: str | None, *, what: str = "checking the arguments") -> tuple[int, str] | None:
    """Every rank says whether it refused to go on (``message``, or None when it may): ``(rank, message)`` of
    the first rank that refused, the same on every rank, or None when none did. Lets all ranks stop together,
    with one clear message, on a refusal only some of them see (an output file only rank 0 writes)."""
    import torch.distributed as dist

    w = world()
    if w is None:
        return None if message is None else (0, message)
    messages = [None] * w.size
    with _collective(what, w):
        dist.all_gather_object(messages, message)
    for rank, text in enumerate(messages):
        if text is not None:
            return rank, text
    return None


# ---- sharded jobs --------------------------------------------------------------------------------------------


def sample(model, config, n: int, *, seed: int = 0, progress: bool = False, **kwargs) -> Tensor | None:
    """:func:`fastscore.model_sampling.sample` of ``n`` samples, split across the ranks (:func:`shard_range`;
    each rank samples its shard with ``rows=``) and gathered on rank 0, which gets the ``(n, ...)`` samples
    (None on the others). Bitwise the single-process result on the same machine and thread count
    (docs/distributed.md#what-is-bitwise). ``kwargs``: the sampler's (``sampler``, ``meta``, ``n_steps_each``,
    ``known``, ``mask``, ...). ``progress``: shown by rank 0 only. Without a process group: the plain run."""
    from fastscore.model_sampling import sample as sample_rows

    w = world()
    rows = shard_range(n)
    out = sample_rows(model, config, n, seed=seed, rows=rows, progress=progress and (w is None or w.main), **kwargs)
    fail_point("sample")
    return gather(out, what="gathering the samples")


def log_likelihood(score_fn, sde, x: Tensor, *, seed: int | None = None, return_info: bool = False, **kwargs):
    """:func:`fastscore.likelihood.log_likelihood` of ``x`` (N, ...), split across the ranks: each rank
    integrates its shard of the batch with ``sample_offset`` at the shard's start (so each example keeps its
    probes), and rank 0 gathers the log-likelihoods (N,) (None on the others); with ``return_info`` the pair
    ``(logp, LikelihoodInfo)``, the info's per-example tensors gathered too, ``nfe`` the largest of the ranks'
    (the calls the longest shard made: the single-process count) and ``sample_evals`` their sum.

    Every rank passes the whole ``x``. ``score_fn`` is evaluated batch-invariantly
    (:func:`fastscore.model_sampling.batch_invariant`), so the result is bitwise that of one process running
    this function, and of ``fastscore.likelihood.log_likelihood(batch_invariant(score_fn), ...)``. ``seed=None``:
    rank 0 draws one and sends it to the others."""
    from fastscore.likelihood import LikelihoodInfo
    from fastscore.likelihood import log_likelihood as log_likelihood_rows
    from fastscore.model_sampling import batch_invariant

    w = world()
    if seed is None:
        seed = broadcast_object(int(torch.randint(0, 2**62, (), dtype=torch.int64)), what="sending the seed")
    rows = shard_range(x.shape[0])
    if w is not None and not w.main:
        kwargs["progress"] = False
    score = batch_invariant(score_fn)
    part = x[rows.start : rows.stop]
    if len(rows):
        logp, info = log_likelihood_rows(
            score, sde, part, seed=seed, sample_offset=rows.start, return_info=True, **kwargs
        )
    else:  # an empty shard (more processes than examples): empty results of the right shapes
        P = 1 if kwargs.get("probe") == "exact" else int(kwargs.get("n_probes", 1))
        f64 = dict(dtype=torch.float64, device=x.device)
        none = torch.zeros(0, dtype=torch.int64, device=x.device)
        logp = torch.zeros(0, **f64)
        info = LikelihoodInfo(logp, torch.zeros(0, P, **f64), logp, logp, part, 0, none, 0)
    fail_point("likelihood")
    logp_all = gather(logp, what="gathering the log-likelihoods")
    if not return_info:
        return logp_all
    gathered = {
        name: gather(getattr(info, name), what="gathering the log-likelihoods")
        for name in ("stderr", "logp_per_probe", "prior_logp", "delta_logp", "z", "nfe_per_sample")
    }
    nfe = all_reduce(int(info.nfe), "max", what="gathering the evaluation counts")
    evals = all_reduce(int(info.sample_evals), "sum", what="gathering the evaluation counts")
    if logp_all is None:
        return None
    return logp_all, LikelihoodInfo(nfe=nfe, sample_evals=evals, **gathered)
