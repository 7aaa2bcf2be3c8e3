"""Reading checkpoint files safely, and the checksums fastscore writes into its own.

* :func:`read_torch_file`: ``torch.load`` whose every failure on a bad file (truncated, not a torch file,
  a folder, unreadable) is a :class:`CheckpointError` naming the file and the reason; a missing file stays
  a ``FileNotFoundError``.
* :func:`tensor_digest`: sha256 over the tensors of a nested structure (state dicts, optimizer states), in a
  fixed order: mapping keys sorted, each tensor's path, dtype, shape and raw bytes.
* :func:`fastscore_meta` / :func:`verify_checksums`: where ``fastscore train`` keeps its resume state and
  the checksums of a checkpoint's tensors, and their check on load (a flipped bit in any tensor is a
  :class:`CheckpointError`). Checkpoints without checksums (the original repositories', older fastscore
  ones) load unchecked.

Where fastscore's data live in a checkpoint: ncsnv2 writes ``[model_state, optimizer_state, epoch, step]``
plus the EMA shadow when EMA is on, and reads ``states[0]``..``states[4]`` when resuming and ``states[0]``
and ``states[-1]`` when sampling or testing. Nothing can be appended to that list (``states[-1]`` must be
the EMA), so fastscore's dict goes under the key ``"fastscore"`` of the optimizer state (``states[1]``):
ncsnv2 hands that dict to ``torch.optim.Optimizer.load_state_dict``, which reads only ``"state"`` and
``"param_groups"`` and ignores other keys. One file stays the one atomic unit (no second file that a copy,
a rename or a crash could separate from its checkpoint), and the checksums sit next to what they check.
Older fastscore checkpoints (``"fastscore-train-1"``) kept the dict as a sixth list entry: still read.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping

import torch

__all__ = [
    "CheckpointError",
    "META_KEY",
    "read_torch_file",
    "tensor_digest",
    "fastscore_meta",
    "checksums",
    "verify_checksums",
]

META_KEY = "fastscore"
# formats of fastscore's dict: 1 = sixth list entry (no checksums), 2 = under states[1]["fastscore"]
FORMATS = ("fastscore-train-1", "fastscore-train-2")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is corrupt, or does not fit the model it is loaded into (nothing was
    changed)."""


def read_torch_file(path, *, map_location="cpu", weights_only: bool = True, what: str = "checkpoint"):
    """``torch.load(path)``; a missing file raises ``FileNotFoundError``, any other unreadable file a
    :class:`CheckpointError` that names it and says why."""
    where = f"{what} {os.fspath(path)!r}"
    if os.path.isdir(path):
        raise CheckpointError(f"{where} is a folder, not a checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{where} is not a regular file")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only and "Weights only load failed" in str(exc):
            lines = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
            reason = lines[0] if lines else "it holds objects other than tensors and plain containers"
            raise CheckpointError(
                f"{where} could not be unpickled with weights_only=True ({reason}); if you trust the file, "
                "pass weights_only=False"
            ) from exc
        raise CheckpointError(f"{where} is not a readable torch checkpoint ({_reason(exc)})") from exc
    except PermissionError as exc:
        raise CheckpointError(f"{where} cannot be read: {exc.strerror}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # truncated / torn / foreign files fail in many ways (OSError, KeyError, struct.error)
        reason = _reason(exc)
        raise CheckpointError(f"{where} is not a readable torch checkpoint: truncated or corrupt ({reason})") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0][:200]  # torch's messages go on with advice after the first sentence
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- checksums ---------------------------------------------------------------------------------------------


def _sort_key(key):
    return (type(key).__name__, str(key))


def _walk(obj, path: str, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=_sort_key):
            _walk(obj[key], f"{path}/{key}", out)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _walk(item, f"{path}/{i}", out)


def _bytes_digest(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.numel() == 0:
        return hashlib.sha256(b"").digest()
    if t.device.type != "cpu":
        t = t.cpu()
    return hashlib.sha256(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())).digest()


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="fastscore-sha256")
    return _POOL


def tensor_digest(obj) -> str:
    """sha256 (hex) over every tensor in ``obj`` (a tensor, or mappings / lists of them; other values are
    skipped), in a fixed order (mapping keys sorted): for each tensor its path, dtype, shape and the sha256 of
    its raw bytes. The per-tensor hashes run on several threads (hashlib releases the GIL)."""
    tensors: list = []
    _walk(obj, "", tensors)
    big = sum(t.numel() * t.element_size() for _, t in tensors) > (1 << 22)
    digests = (
        list(_pool().map(_bytes_digest, [t for _, t in tensors])) if big else [_bytes_digest(t) for _, t in tensors]
    )
    h = hashlib.sha256()
    for (path, t), digest in zip(tensors, digests):
        h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(digest)
    return h.hexdigest()


def _parts(ckpt) -> dict:
    """The checksummed parts of a fastscore list checkpoint: name -> object."""
    parts = {"model": ckpt[0]}
    if isinstance(ckpt[1], Mapping):
        parts["optimizer"] = {k: v for k, v in ckpt[1].items() if k != META_KEY}
    if len(ckpt) >= 5:
        parts["ema"] = ckpt[4]
    return parts


def checksums(ckpt, *, resume=None) -> dict:
    """``{"algorithm": "sha256", part: hex}`` for the model state, optimizer state and EMA shadow of a
    checkpoint list (and ``resume``, fastscore's resume tensors, when given)."""
    out = {"algorithm": "sha256"}
    for name, part in _parts(ckpt).items():
        out[name] = tensor_digest(part)
    if resume is not None:
        out["resume"] = tensor_digest(resume)
    return out


def fastscore_meta(ckpt) -> dict | None:
    """fastscore's dict in a checkpoint (config, resume state, checksums, ...), or None for a foreign file."""
    if not isinstance(ckpt, (list, tuple)):
        return None
    if len(ckpt) >= 2 and isinstance(ckpt[1], Mapping):
        meta = ckpt[1].get(META_KEY)
        if isinstance(meta, Mapping) and meta.get("format") in FORMATS:
            return dict(meta)
    if len(ckpt) >= 6 and isinstance(ckpt[5], Mapping) and ckpt[5].get("format") in FORMATS:
        return dict(ckpt[5])
    return None


def verify_checksums(ckpt, where: str, parts=None) -> bool:
    """Check the recorded checksums of ``parts`` (default: all recorded) against the tensors loaded;
    :class:`CheckpointError` naming the part on a mismatch. False when the checkpoint records none."""
    meta = fastscore_meta(ckpt)
    recorded = meta.get("checksum") if meta else None
    if not isinstance(recorded, Mapping):
        return False
    if recorded.get("algorithm") != "sha256":
        raise CheckpointError(f"{where}: unknown checksum algorithm {recorded.get('algorithm')!r}")
    available = _parts(ckpt)
    if meta.get("resume") is not None:
        available["resume"] = meta["resume"]
    names = [n for n in recorded if n != "algorithm"] if parts is None else [n for n in parts if n in recorded]
    for name in names:
        if name not in available:
            raise CheckpointError(f"{where}: its {name} entry is missing (the file was altered after it was written)")
        if tensor_digest(available[name]) != recorded[name]:
            raise CheckpointError(
                f"{where} is corrupt: the {name} tensors do not match the checksum written with them (a changed "
                "or damaged file); restore it from a copy"
            )
    return True
