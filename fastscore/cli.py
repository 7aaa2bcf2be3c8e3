"""The `fastscore` command line.

Every command has --help; bad arguments exit with status 2 and one line on stderr (no traceback);
a command that cannot do its job exits with status 1 and one line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import platform
import re
import sys


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1. ``shared``: every rank of a distributed run
    raised it together (:func:`_together`), so rank 0 alone prints it."""

    def __init__(self, message: str, *, shared: bool = False):
        super().__init__(message)
        self.shared = shared


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---- fastscore info -------------------------------------------------------------------------------


def _info(args) -> int:
    import numpy
    import torch

    import fastscore

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fastscore {fastscore.__version__}")
    versions = f"torch {torch.__version__}  triton {triton_version}  numpy {numpy.__version__}"
    print(f"python    {platform.python_version()}  {versions}")
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)" if torch.version.cuda else "CPU build"
    print(
        f"torch     {cuda}; CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    )
    print("backends:")
    for name, info in fastscore.backends().items():
        where = ", ".join(info["devices"]) if info["available"] else "unavailable"
        reason = f"  ({info['reason']})" if info["reason"] else ""
        print(f"  {name:<7} {where}{reason}")
    from fastscore._backend import cache_stats

    try:
        cap = cache_stats()["cap"]
        state = f"up to {cap >> 20} MiB" if cap else "off"
    except ValueError as exc:  # a malformed FASTSCORE_CPU_CACHE_MB: say so, the rest of the report stands
        state = str(exc).splitlines()[0]
    print(f"CPU output cache: {state} (FASTSCORE_CPU_CACHE_MB; fastscore.empty_cache() releases it)")
    if fastscore.backends()["cpp"]["available"]:
        from fastscore._backend import cpp_kernels
        from fastscore._backend import supported_cpu_capabilities

        supported = supported_cpu_capabilities()
        force = f"; FASTSCORE_CPU_CAPABILITY={'|'.join(supported[1:])} forces a narrower one" if supported[1:] else ""
        print(f"cpp kernels: CPU capability {fastscore.cpu_capability()} (this CPU runs {', '.join(supported)}{force})")
        for op in cpp_kernels():
            print(f"  {op:<28} {fastscore.cpu_capability()}")
    return 0


# ---- fastscore bench ------------------------------------------------------------------------------


def bench_names() -> list[str]:
    """The benches shipped with the package: bench/bench_<name>.py."""
    import fastscore._bench as pkg

    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))


def _bench(args) -> int:
    import torch

    names = bench_names()
    wanted = names if args.what == "all" else [args.what]
    if args.what != "all" and args.what not in names:
        raise CommandError(f"no bench named {args.what!r}; choose from: {', '.join(names + ['all'])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available")
    csv_path = None
    if args.csv is not None and args.no_record:
        raise CommandError("--csv and --no-record contradict each other; pass one of them")
    if not args.no_record:  # checked before minutes of benches, not after
        from fastscore._bench import _harness

        what = f"--csv {args.csv!r}" if args.csv is not None else "the results file (--csv)"
        try:
            csv_path = _harness.check_results_file(_harness.results_path(args.csv))
        except ValueError as exc:
            raise CommandError(f"{what}: {exc}") from None
    from fastscore._backend import separate_inductor_cache

    separate_inductor_cache()  # the benches compile; a run with ATEN_CPU_CAPABILITY lowered needs its own cache
    for name in wanted:
        module = importlib.import_module(f"fastscore._bench.bench_{name}")
        module.run(
            quick=args.quick, device=args.device, rounds=args.rounds, record=not args.no_record, csv_path=csv_path
        )
    return 0


# ---- shared by train / sample / likelihood / demo -------------------------------------------------------------

TOY_DATA = ("gmm", "moons", "swissroll", "checkerboard", "rings")


def _user_errors():
    """The exception types that mean "the user's input is wrong": printed as one line, exit status 1. A NaN or
    Inf score (a diverged checkpoint) stopping the ODE sampler or the likelihood is one."""
    from fastscore.data.images import DataError
    from fastscore.models import CheckpointError
    from fastscore.models import ConfigError
    from fastscore.ode import NonFiniteError
    from fastscore.train import TrainError

    return (DataError, CheckpointError, ConfigError, TrainError, FileNotFoundError, NonFiniteError)


def _refuse_overwrite(path, force: bool, what: str = "--out") -> None:
    if path and os.path.exists(path) and not force:
        raise CommandError(f"{what} {path!r} exists; pass --force to overwrite it")


def _parent_exists(path, what: str = "--out") -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CommandError(f"{what} {path!r}: folder {parent!r} does not exist")


def _probe_folder(folder: str, what: str, path) -> None:
    """Refuse, before any work, a folder this process cannot write into (read-only, no permission, a full
    disk): create a small file in it and remove it again."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".fastscore-probe-", dir=folder)
    except OSError as exc:
        raise CommandError(f"{what} {path!r}: cannot write in folder {folder!r} ({exc.strerror or exc})") from None
    try:
        os.write(fd, b"\0" * 4096)
    except OSError as exc:
        raise CommandError(f"{what} {path!r}: cannot write in folder {folder!r} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
        os.remove(probe)


def _check_output_file(path, force: bool, what: str = "--out") -> None:
    """An output file: not a folder, not overwritten without --force, in an existing folder we can write."""
    if os.path.isdir(path):
        raise CommandError(f"{what} {path!r} is a folder; give the name of a file to write")
    _refuse_overwrite(path, force, what)
    _parent_exists(path, what)
    _probe_folder(os.path.dirname(os.path.abspath(path)), what, path)


def _check_output_folder(folder, what: str = "--out") -> str:
    """An output folder (created later if missing): not a file, and its nearest existing folder writable.
    Returns that folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CommandError(f"{what} {folder!r} is a file, not a folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CommandError(f"{what} {folder!r}: {existing!r} is a file, not a folder")
    _probe_folder(existing, what, folder)
    return existing


def _write_failed(exc: OSError, path) -> CommandError:
    """An OSError while writing outputs (a full disk, a folder that became read-only) as one line."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    return CommandError(f"writing {path!r} failed: {reason}{where}; nothing half-written was left there")


@contextlib.contextmanager
def _as_command_errors(writing=None):
    """The user's errors (:func:`_user_errors`) raised inside as a one-line CommandError; with ``writing``
    (what the block writes), an OSError too, as :func:`_write_failed` words it."""
    try:
        yield
    except _user_errors() as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        if writing is None:
            raise
        raise _write_failed(exc, writing) from None


def _timed(fn):
    """``(fn(), seconds it took)``."""
    import time

    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---- several processes (torchrun) ------------------------------------------------------------------------------

DISTRIBUTED_COMMANDS = ("train", "sample", "likelihood")  # what runs under torchrun with several processes


def _launched() -> bool:
    """Started by torchrun as one of several processes? (Read from WORLD_SIZE without importing torch; a
    malformed value counts as a launch, which fastscore.distributed.init then refuses, naming it.)"""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    except ValueError:
        return True


def _world():
    """This process's fastscore.distributed.World under torchrun with several processes, else None."""
    if not _launched():
        return None
    from fastscore import distributed

    return distributed.world()


def _distributed_errors() -> tuple:
    """fastscore.distributed.DistributedError when torch.distributed is in use, else no type (nothing to catch)."""
    module = sys.modules.get("fastscore.distributed")
    return (module.DistributedError,) if module is not None else ()


def _together(fn, *, main_only=None, writing=None):
    """``fn()``'s result. With several processes, every rank learns whether any rank refused (a CommandError,
    or a user error: :func:`_user_errors`) and all stop together with the first refusal, which rank 0 alone
    prints (CommandError ``shared``): a refusal only some ranks see (an output file only rank 0 checks) stops
    every rank at once instead of leaving the others waiting. ``main_only``: a check only rank 0 runs first;
    ``writing``: what the command writes (an OSError while checking it is said as a failed write)."""
    world = _world()
    error, result = None, None
    try:
        with _as_command_errors(writing):
            if main_only is not None and (world is None or world.main):
                main_only()
            result = fn()
    except CommandError as exc:
        if world is None:
            raise
        error = str(exc)
    if world is not None:
        from fastscore import distributed

        first = distributed.first_error(error)
        if first is not None:
            rank, message = first
            raise CommandError(message if rank == 0 else f"rank {rank} of {world.size}: {message}", shared=True)
    return result


def _pick(count: int, n: int, seed: int):
    """The indices of ``n`` of ``count`` examples (all of them when fewer), in a random order drawn from ``seed``."""
    import torch

    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n]


SEED_MAX = 2**63 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEED_MAX}, got {text!r}")
    return value


def _set_threads(threads) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a section"
    return type(value).__name__


def _apply_overrides(config, overrides):
    """``--set section.key=value`` onto a config (a bundled name, a .yml path or a namespace). The value is
    parsed as YAML (numbers, 1e-3 included, true/false, strings). Refused: a field that is neither in the
    config nor one fastscore reads, a value fastscore would reject (checked as the config's fields are), or
    one of another kind than the value it replaces."""
    import difflib

    import yaml

    from fastscore.models import ConfigError
    from fastscore.models import get_config
    from fastscore.models import namespace2dict
    from fastscore.models.configs import FIELDS
    from fastscore.models.configs import check_field
    from fastscore.models.configs import dict2namespace

    config = namespace2dict(get_config(config))
    for item in overrides or ():
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise CommandError(f"--set {item!r}: expected section.key=value, e.g. model.ema_rate=0.995")
        path = ".".join(parts)
        node = config
        for part in parts[:-1]:
            if node.get(part) is None and path in FIELDS:
                node[part] = {}  # a section this config lacks, for a field fastscore reads
            if not isinstance(node.get(part), dict):
                raise CommandError(f"--set {item!r}: the config has no section {part!r}")
            node = node[part]
        name = parts[-1]
        if name not in node and path not in FIELDS:
            known = sorted({f"{parts[0]}.{k}" for k in node} | {f for f in FIELDS if f.startswith(f"{parts[0]}.")})
            close = difflib.get_close_matches(path, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
            raise CommandError(f"--set {item!r}: the config has no field {path} ({hint})")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise CommandError(f"--set {item!r}: cannot parse the value") from None
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        try:
            check_field(path, value)
        except ConfigError as exc:
            raise CommandError(f"--set {item!r}: {exc}") from None
        old = node.get(name)
        if path not in FIELDS and old is not None and _kind(old) != _kind(value):
            raise CommandError(f"--set {item!r}: config.{path} holds {_kind(old)} ({old!r}), got {value!r}")
        node[name] = value
    return dict2namespace(config)


DATA_HELP = f"digits, {', '.join(TOY_DATA)}, a folder of images or an .npz"  # what --data takes
DATA_CHOICES = f"{DATA_HELP} file"


def _check_data_name(name) -> None:
    """Refuse, before any work, a --data that is neither a bundled data set nor an existing file or folder."""
    if name in TOY_DATA or name == "digits" or os.path.exists(name):
        return
    raise CommandError(f"--data {name!r}: no such data set, file or folder; expected {DATA_CHOICES}")


def _model_words(config) -> str:
    """What a config's model takes, for messages: 'NCSNv2, which takes 1x16x16 images'."""
    from fastscore.models.configs import field

    arch = field(config, "model.arch", "any", None) or "the model"
    if arch == "ScoreMLP":
        return f"ScoreMLP, which takes {field(config, 'data.dim', 'any', 2)}-D points"
    size, channels = field(config, "data.image_size", "any", "?"), field(config, "data.channels", "any", "?")
    return f"{arch}, which takes {channels}x{size}x{size} images"


def _load_data(name, config, *, seed: int = 0, n: int | None = None, model: str | None = None):
    """``(data, config)``: a bundled toy distribution (with a ScoreMLP config unless one is given) or image
    data at the config's size. ``model``: whose model ``config`` describes, for the message when the data
    does not fit it (``"the checkpoint's"``); None when the config is the one to train."""
    from fastscore.data.images import load_dataset
    from fastscore.model_sampling import is_toy
    from fastscore.models.configs import field

    toy_model = config is not None and is_toy(config)
    if name in TOY_DATA:
        from fastscore.data.toy import toy_sample
        from fastscore.train import toy_config

        data = toy_sample(name, n or 10000, seed=seed).float()
        if config is None:
            return data, toy_config(data, name=name)
        if not toy_model:
            if model is not None:
                raise CommandError(
                    f"--data {name} is 2-D toy data, and {model} model is {_model_words(config)}: give images "
                    "(digits, a folder of images or an .npz file)"
                )
            raise CommandError(
                f"--data {name}: 2-D toy data trains the ScoreMLP; leave out --config or give a ScoreMLP one"
            )
        return data, config
    if toy_model:
        whose = model or "the config's"
        raise CommandError(
            f"--data {name!r} is images, and {whose} model is {_model_words(config)}: give 2-D toy data "
            f"({', '.join(TOY_DATA)})"
        )
    if config is None:
        if name != "digits":
            _check_data_name(name)
            raise CommandError(
                f"--data {name!r}: images of no bundled model: pass --config (a bundled name or a .yml) for the "
                "model to train on them"
            )
        from fastscore.models import get_config

        config = get_config("demo_digits")
    size = field(config, "data.image_size", "int+", who="the data")
    channels = field(config, "data.channels", "int+", who="the data")
    return load_dataset(name, size, channels, limit=n), config


# ---- fastscore train ---------------------------------------------------------------------------------------


def _train(args) -> int:
    from fastscore.train import CHECKPOINT_NAME
    from fastscore.train import check_memory
    from fastscore.train import export_checkpoint
    from fastscore.train import run_folder
    from fastscore.train import train

    if args.classifier:
        if args.energy:
            raise CommandError("--energy: trains the score model as an energy; --classifier trains a classifier")
        return _train_classifier(args)
    if args.data is None and not args.resume:  # argparse's wording and status: a usage error
        print(
            "fastscore train: error: the following arguments are required: --data (unless --resume, which reads "
            "it from the run) (see --help)",
            file=sys.stderr,
        )
        return 2
    world = _world()
    main = world is None or world.main
    out = args.out or (
        None
        if args.data is None
        else os.path.join(
            "runs",
            f"{os.path.splitext(os.path.basename(args.config or 'default'))[0]}-"
            f"{os.path.splitext(os.path.basename(args.data.rstrip('/')))[0]}",
        )
    )

    def setup():
        # Everything that can be refused is checked before any work: the config (fields, --set, its memory
        # estimate) and the output folder (writable, room for a checkpoint); then the run folder is locked. With
        # several processes rank 0 alone writes the run folder and --export, so it alone checks them (every rank
        # reads the checkpoint it resumes from).
        _set_threads(args.threads)
        if args.resume and (args.config or args.set):
            raise CommandError("--resume continues with the run's own config: leave out --config and --set")
        if out is None:
            raise CommandError("--resume: pass --out, the folder of the run to continue")
        ckpt = os.path.join(out, CHECKPOINT_NAME)
        if args.resume and not os.path.isfile(ckpt):
            hint = "" if args.out else " (pass --out, the run's folder)"
            raise CommandError(f"--resume: no checkpoint {ckpt!r} to continue from{hint}")
        if main and not args.resume and os.path.exists(ckpt) and not args.force:
            raise CommandError(f"checkpoint {ckpt!r} exists; pass --resume to continue it or --force to start over")
        if main and args.export:
            _check_output_file(args.export, args.force, what="--export")
        data = None
        data_name, data_seed = args.data, args.seed
        loss, batch_size = args.loss or "dsm", args.batch_size
        if args.resume:
            from fastscore.models.configs import dict2namespace
            from fastscore.train import checkpoint_meta
            from fastscore.train import read_checkpoint

            meta = checkpoint_meta(read_checkpoint(ckpt, verify=False)) or {}  # train() verifies it
            config = dict2namespace(meta["config"]) if "config" in meta else None
            loss, batch_size = meta.get("loss", loss), batch_size or meta.get("batch_size")
            if args.energy and args.energy != meta.get("energy"):
                was = f"as an energy ({meta['energy']})" if meta.get("energy") else "as a score model"
                raise CommandError(
                    f"--energy: the run in {out!r} trains the network {was}; --resume continues it so (leave out "
                    "--energy)"
                )
            data_seed = meta.get("seed", args.seed)  # a toy's points are drawn from the run's seed, as at its start
            if data_name is None:
                data_name = _run_data(meta, out)
        elif args.config:
            config = _apply_overrides(args.config, args.set)
        elif args.data in TOY_DATA:  # the toy config is made from the data (2-D points, milliseconds)
            data, config = _load_data(args.data, None, seed=args.seed)
            config = _apply_overrides(config, args.set)
        elif args.data == "digits":
            config = _apply_overrides("demo_digits", args.set)
        else:  # images of no bundled model: say which is wrong, the name or the missing --config
            _check_data_name(args.data)
            config = None
        params = check_memory(config, loss=loss, batch_size=batch_size) if config is not None else None
        if main:
            existing = _check_output_folder(out)
            if params is not None:
                _check_free_space(existing, out, params, config)
        return data, data_name, data_seed, config

    data, data_name, data_seed, config = _together(setup, writing=out)
    with _as_command_errors(out):
        with run_folder(out) if main else contextlib.nullcontext():
            if data is None:
                data, config = _load_data(data_name, config, seed=data_seed)
            where = f" ({world.size} processes)" if world is not None else ""
            print(
                f"train: {len(data)} examples of shape {tuple(data.shape[1:])} from {data_name!r}; writing {out}/"
                f"{where}",
                file=sys.stderr,
            )
            result = train(
                config,
                data,
                out,
                steps=args.steps,
                batch_size=args.batch_size,
                seed=args.seed,
                resume=args.resume,
                loss=args.loss,
                snapshot_freq=args.snapshot_freq,
                snapshot_samples=0 if args.no_samples else None,
                data_name=data_name,
                progress=not args.no_progress,
                energy=args.energy,
            )
        print(
            f"trained to step {result.step} in {result.seconds:.0f} s; final loss {result.loss:.4g}; "
            f"checkpoint {result.checkpoint}"
        )
        if result.samples:
            print(f"samples: {result.samples[-1]}")
        elif not args.no_samples:
            print("samples: none (the config's training.snapshot_sampling is false; "
                  "--set training.snapshot_sampling=true draws a grid at every snapshot)")  # fmt: skip
        if args.export and main:
            with _as_command_errors(args.export):
                size = export_checkpoint(result.checkpoint, args.export)
            print(f"exported the EMA weights (float16) to {args.export} ({size / 1e6:.1f} MB)")
    return 0


CLASSIFIER_STEPS = 1500  # fastscore train --classifier's default number of steps
CLASSIFIER_BATCH = 64
CLASSIFIER_LR = 2e-3


def _train_classifier(args) -> int:
    """`fastscore train --classifier`: a noise-conditional classifier of the digits' labels under the noise of
    the score model's config (default demo_digits), written to OUT/classifier.pth."""
    from fastscore.models.classifier import CHECKPOINT_NAME
    from fastscore.models.classifier import digits_labels
    from fastscore.models.classifier import train_classifier

    if _launched():
        raise CommandError("--classifier: train the classifier in one process (it is small), not under torchrun")
    for flag, given in (("--resume", args.resume), ("--loss", args.loss), ("--export", args.export),
                        ("--snapshot-freq", args.snapshot_freq)):  # fmt: skip
        if given:
            raise CommandError(f"{flag}: not an option of --classifier (a classifier run is one short run)")
    if args.data is None:
        raise CommandError("--classifier: pass --data digits (the labelled data set)")
    if args.data != "digits":
        if args.data in TOY_DATA:
            raise CommandError(
                f"--data {args.data}: the 2-D toys carry no labels; --classifier trains on labelled images "
                "(--data digits); for points, call fastscore.models.train_classifier from Python"
            )
        raise CommandError(f"--data {args.data!r}: --classifier needs labels, which only 'digits' carries")
    out = args.out or os.path.join(
        "runs", f"classifier-{os.path.splitext(os.path.basename(args.config or 'demo_digits'))[0]}-digits"
    )
    path = os.path.join(out, CHECKPOINT_NAME)
    with _as_command_errors(out):
        _set_threads(args.threads)
        config = _apply_overrides(args.config or "demo_digits", args.set)
        if os.path.exists(path) and not args.force:
            raise CommandError(f"classifier checkpoint {path!r} exists; pass --force to overwrite it")
        _check_output_folder(out)
        data, config = _load_data("digits", config, model="the config's")
        labels = digits_labels()
        steps, batch = args.steps or CLASSIFIER_STEPS, args.batch_size or CLASSIFIER_BATCH
        print(f"train --classifier: {len(data)} labelled digits; {steps} steps; writing {path}", file=sys.stderr)
        os.makedirs(out, exist_ok=True)
        _, result = train_classifier(
            config, data, labels, path, steps=steps, batch_size=batch, lr=CLASSIFIER_LR, seed=args.seed,
            data_name="digits", progress=not args.no_progress,
        )  # fmt: skip
    print(f"trained the classifier to step {result.step} in {result.seconds:.0f} s; final loss {result.loss:.4g}; "
          f"checkpoint {path}")  # fmt: skip
    return 0


def _run_data(meta: dict, out) -> str:
    """The --data a run recorded in its checkpoint, for --resume without --data; CommandError saying why
    when it cannot be used."""
    name = meta.get("data")
    if not isinstance(name, str) or not name or name == "tensor":
        raise CommandError(
            f"--resume: the run in {out!r} does not record its data (it was trained from Python on a tensor): "
            "pass --data"
        )
    if name not in TOY_DATA and name != "digits" and not os.path.exists(name):
        raise CommandError(
            f"--resume: the run in {out!r} was trained on {name!r}, which is not found from here (a path relative "
            "to the folder the run was started in?): pass --data"
        )
    return name


def _check_free_space(folder: str, out, params: int, config) -> None:
    """Refuse a run whose checkpoint cannot fit on the disk of ``folder`` (weights, optimizer moments, EMA)."""
    from fastscore.models.configs import field
    from fastscore.train import human_bytes

    moments = 2 if field(config, "optim.optimizer", "any", "Adam") == "Adam" else 1
    need = 4 * params * (1 + moments + (1 if field(config, "model.ema", "any", False) else 0))
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):
        return
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        raise CommandError(
            f"--out {out!r}: its disk has {human_bytes(free)} free, and one checkpoint of this model takes about "
            f"{human_bytes(need)}"
        )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ---- fastscore sample ---------------------------------------------------------------------------------------

SAMPLERS = (
    "ald",
    "pc",
    "ode",
    "dpm",
    "heun",
    "ddim",
    "adaptive",
    "mala",
    "hmc",
)  # fastscore.model_sampling.SAMPLERS, spelled out: building the parser imports no torch
ENERGY_FORMS = ("residual", "inner")  # fastscore.models.energy.FORMS, spelled out as SAMPLERS is
MASKS = ("left", "right", "top", "bottom", "center")


def _output_kind(path: str, kinds=(".png", ".npz")) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in kinds:
        raise CommandError(f"--out {path!r}: expected a {' or '.join(kinds)} file")
    return ext


def _mask(spec: str, shape):
    """A (1, C, H, W) mask, 1 on the known pixels: a named half, the border around a centre square, or a
    .npy / image file (non-zero = known; an image is resized to the model's size)."""
    import numpy as np
    import torch

    _, c, h, w = shape
    mask = torch.zeros(1, c, h, w)
    if spec == "left":
        mask[..., : w // 2] = 1
    elif spec == "right":
        mask[..., w // 2 :] = 1
    elif spec == "top":
        mask[..., : h // 2, :] = 1
    elif spec == "bottom":
        mask[..., h // 2 :, :] = 1
    elif spec == "center":
        mask.fill_(1)
        mask[..., h // 4 : h - h // 4, w // 4 : w - w // 4] = 0
    elif os.path.isfile(spec):
        if spec.endswith(".npy"):
            try:
                array = np.load(spec, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CommandError(f"--mask {spec!r} is not a readable .npy file ({exc})") from None
            given = torch.as_tensor(array, dtype=torch.float32)
        else:  # an image: its non-zero pixels are the known ones
            try:
                from PIL import Image

                with Image.open(spec) as im:
                    given = torch.as_tensor(np.asarray(im.convert("L").resize((w, h), Image.Resampling.NEAREST)))
            except ImportError:
                raise CommandError("--mask: reading an image mask needs Pillow (or give a .npy)") from None
            except OSError as exc:
                raise CommandError(f"--mask {spec!r} is neither a .npy nor a readable image ({exc})") from None
        try:
            mask = (given != 0).float().expand(1, c, h, w).clone()
        except RuntimeError:
            raise CommandError(f"--mask {spec!r}: shape {tuple(given.shape)} does not fit images {(c, h, w)}") from None
    else:
        raise CommandError(
            f"--mask {spec!r}: expected one of {', '.join(MASKS)}, or a .npy / image file (non-zero = known)"
        )
    return mask


def _load_model(args, layers: str = "fused"):
    import torch

    from fastscore.model_sampling import is_toy
    from fastscore.train import model_from_checkpoint

    model, config, meta = model_from_checkpoint(args.checkpoint, config=args.config, ema=not args.no_ema, layers=layers)
    if layers == "fused" and not is_toy(config):
        # channels_last is the fused layers' fastest CPU layout (NCSNv2 module docstring).
        model = model.to(memory_format=torch.channels_last)
    return model, config, meta


def native_bf16() -> bool:
    """Does this CPU compute in bfloat16 natively (AVX512-BF16 or AMX)? Elsewhere oneDNN emulates it, slower
    than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _in_bf16(model, bf16: bool):
    """The network run under CPU bfloat16 autocast (convolutions and linear layers in bfloat16, fastscore's
    norms in float32), its output cast back to its input's dtype for the samplers."""
    if not bf16:
        return model
    import torch

    if not native_bf16():
        raise CommandError("--bf16: this CPU has neither AVX512-BF16 nor AMX, where bfloat16 is slower than float32")

    forward = model.forward

    def forward_in_bf16(x, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x, *args, **kwargs)
        return out.to(x.dtype)

    model.forward = forward_in_bf16
    return model


def _compiled(model, compile: bool):
    """The network, wrapped in torch.compile (one graph: fastscore's layers trace whole) when asked for.

    Compiled once, on the first step; every later step (each noise level or time a tensor) reuses it."""
    if not compile:
        return model
    import torch

    from fastscore._backend import separate_inductor_cache

    separate_inductor_cache()  # a run with ATEN_CPU_CAPABILITY lowered must not share Inductor's cache
    return torch.compile(model, fullgraph=True, dynamic=False)


def _sampling_model(args, layers: str = "fused"):
    """``(network, config, meta)`` of --checkpoint for `fastscore sample`: --bf16 and --compile applied."""
    model, config, meta = _load_model(args, layers=layers)
    return _compiled(_in_bf16(model, args.bf16), args.compile), config, meta


ALD_MIN_FRACTION = 0.25  # of the config's n_steps_each * step_lr, below which `fastscore sample` warns


def _too_few_steps(args, config) -> str | None:
    """A warning when the sampler is asked for far fewer steps than the model needs (its samples are then
    mostly noise), else None. See the README's "Command line" for the rules."""
    from fastscore.model_sampling import PC_STEPS_PER_LEVEL
    from fastscore.model_sampling import langevin_settings
    from fastscore.model_sampling import pc_default_steps
    from fastscore.models import get_sigmas

    if args.sampler in ("ald", "mala", "hmc"):  # the same levels, steps per level and step sizes
        if args.steps_each is None and args.step_lr is None:
            return None
        steps, lr = langevin_settings(config)
        given_steps, given_lr = langevin_settings(config, args.steps_each, args.step_lr)
        # At level i a chain diffuses over about sigma_i * sqrt(2 n_steps_each step_lr) / sigma_L: with less than
        # a quarter of the config's n_steps_each * step_lr it covers less than half the distance the config was
        # tuned for. On the shipped digits model a tenth and a fifth of it give noise (1 or 2 steps at 5e-5, or 10
        # at 5e-6), three tenths a faint grain, two fifths and more clean digits.
        if given_steps * given_lr < ALD_MIN_FRACTION * steps * lr:
            return (
                f"{given_steps} Langevin step(s) per noise level at step_lr {given_lr:g} are less than a quarter of "
                f"the config's {steps} at {lr:g} (counting steps x step_lr): the chains barely move at each level, "
                "so expect noisy samples; leave out --steps-each and --step-lr for the config's settings"
            )
        return None
    if args.sampler == "pc" and args.sde_steps is not None:
        levels = len(get_sigmas(config))
        if args.sde_steps < PC_STEPS_PER_LEVEL * levels:
            return (
                f"--sde-steps {args.sde_steps} gives {args.sde_steps / levels:.2g} time steps per noise level of this "
                f"model ({levels} levels), and the predictor-corrector sampler needs about {PC_STEPS_PER_LEVEL} "
                f"({PC_STEPS_PER_LEVEL * levels} steps): expect noisy samples (salt and pepper); leave out "
                f"--sde-steps for the default, {pc_default_steps(levels)}"
            )
    return None


def _check_controls(args) -> None:
    """The controllable-generation flags of `fastscore sample` that contradict each other, refused before any
    work: inpainting (--mask) and colorization (--colorize) on the samplers that have them, class-conditional
    sampling (--class, --classifier, --guidance-scale) on its own."""
    if args.mask and args.sampler not in ("ald", "pc"):
        raise CommandError("--mask: inpainting runs --sampler ald (annealed Langevin) or pc (predictor-corrector)")
    if args.steps is not None and args.sampler not in ("dpm", "heun", "ddim"):
        raise CommandError("--steps: the number of steps of --sampler dpm, heun or ddim (the adaptive one chooses)")
    if args.eta is not None and args.sampler != "ddim":
        raise CommandError("--eta: the noise of --sampler ddim's steps")
    if args.colorize and args.sampler != "pc":
        raise CommandError("--colorize: colorization runs the predictor-corrector sampler: pass --sampler pc")
    if args.colorize and args.mask:
        raise CommandError("--colorize: give --mask or --colorize, not both")
    if (args.class_ is None) != (args.classifier is None):
        given, missing = ("--class", "--classifier") if args.classifier is None else ("--classifier", "--class")
        raise CommandError(f"{given}: class-conditional sampling needs {missing} as well")
    if args.guidance_scale != 1.0 and args.class_ is None:
        raise CommandError("--guidance-scale: only with --class and --classifier")
    if args.class_ is not None and (args.mask or args.colorize):
        raise CommandError("--class: class-conditional sampling does not combine with --mask or --colorize")
    if args.class_ is not None and args.sampler in ("mala", "hmc"):
        raise CommandError(f"--class: class-conditional sampling does not run with --sampler {args.sampler}")
    for flag, given in (("--compile", args.compile), ("--bf16", args.bf16)):
        if given and args.sampler in ("mala", "hmc"):  # they wrap the forward; these samplers call the energy
            raise CommandError(f"{flag}: applies to the score's forward pass, not to --sampler {args.sampler}'s energy")


def _guidance(args, config):
    """The model_sampling.Guidance of --class, --classifier and --guidance-scale, checked against the model."""
    from fastscore.model_sampling import Guidance
    from fastscore.model_sampling import is_toy
    from fastscore.models.classifier import load_classifier
    from fastscore.models.classifier import noise_range
    from fastscore.models.configs import field

    classifier, meta = load_classifier(args.classifier)
    classes = int(meta.get("num_classes", 0))
    if args.class_ >= classes:
        raise CommandError(
            f"--class {args.class_}: the classifier {args.classifier!r} knows classes 0 to {classes - 1}"
        )
    kind = "mlp" if is_toy(config) else "image"
    shape_ok = meta.get("kind") == kind and (
        meta["args"].get("dim") == field(config, "data.dim", "any", None)
        if kind == "mlp"
        else meta["args"].get("channels") == field(config, "data.channels", "any", None)
    )
    if not shape_ok:
        raise CommandError(
            f"--classifier {args.classifier!r}: a classifier of other data ({meta.get('kind')}, "
            f"{meta.get('args')}) than the checkpoint's model, {_model_words(config)}"
        )
    low, high = noise_range(config)
    if not (meta.get("sigma_min", low) <= low * 1.01 and meta.get("sigma_max", high) >= high * 0.99):
        print(
            f"fastscore sample: warning: --classifier was trained on noise levels {meta.get('sigma_min'):g} to "
            f"{meta.get('sigma_max'):g}, the model samples {low:g} to {high:g}: guidance outside them is a guess",
            file=sys.stderr,
        )
    return Guidance(classifier, args.class_, args.guidance_scale)


def _sample(args) -> int:
    import numpy as np
    import torch

    from fastscore import distributed
    from fastscore.data.images import atomic_write_bytes
    from fastscore.data.images import save_image_grid
    from fastscore.demo import speed_words
    from fastscore.model_sampling import energy_model
    from fastscore.model_sampling import is_toy
    from fastscore.models.configs import field

    world = _world()
    kind = _output_kind(args.out)

    def setup():
        _check_controls(args)
        _set_threads(args.threads)
        model, config, meta = _sampling_model(args)
        if args.sampler in ("mala", "hmc") and energy_model(model) is None:
            raise CommandError(
                f"--sampler {args.sampler}: annealed {args.sampler.upper()} needs an energy model, and "
                f"{args.checkpoint!r} holds a score network (train one with fastscore train --energy)"
            )
        toy = is_toy(config)
        warning = _too_few_steps(args, config)
        if warning:
            print(f"fastscore sample: warning: {warning}", file=sys.stderr)
        known = mask = guide = None
        flag = "--mask" if args.mask else "--colorize"
        if args.colorize:
            if toy or field(config, "data.channels", "any", None) != 3:
                raise CommandError(
                    f"--colorize: colorization needs a model of 3-channel (colour) images, and the checkpoint's is "
                    f"{_model_words(config)}; a gray image has no colour channels to fill in"
                )
        if args.mask or args.colorize:
            if toy:
                raise CommandError(f"{flag}: inpainting and colorization need an image model")
            data_name = args.data or meta.get("data")
            if not data_name or data_name == "tensor":
                raise CommandError(f"{flag}: pass --data (the images whose known part is kept)")
            from fastscore.data.images import data_transform
            from fastscore.data.images import load_dataset

            images = load_dataset(data_name, config.data.image_size, config.data.channels)
            pick = _pick(len(images), args.n, args.seed)
            if len(pick) < args.n:
                pick = pick.repeat(args.n // len(pick) + 1)[: args.n]
            images = images[pick]
            if args.colorize:  # score_sde's gray input: the channels' mean in all three
                images = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
            known = data_transform(config, images)
            if args.mask:
                mask = _mask(args.mask, known.shape)
        if args.class_ is not None:
            guide = _guidance(args, config)
        return model, config, meta, toy, known, mask, guide

    # rank 0 alone writes --out, so it alone checks it; every rank stops if it is refused
    model, config, meta, toy, known, mask, guide = _together(
        setup, main_only=lambda: _check_output_file(args.out, args.force)
    )
    with _as_command_errors():

        def draw(network):  # with several processes: each its shard, gathered on rank 0 (None elsewhere)
            return _timed(lambda: distributed.sample(
                network, config, args.n, sampler=args.sampler, meta=meta, seed=args.seed, n_steps_each=args.steps_each,
                step_lr=args.step_lr, sde_steps=args.sde_steps, snr=args.snr, steps=args.steps, eta=args.eta,
                known=known, mask=mask, colorize=args.colorize, guide=guide,
                progress=not args.no_progress))  # fmt: skip

        samples, seconds = draw(model)
        where = f" on {world.size} processes" if world is not None else ""
        what = " (inpainting)" if mask is not None else " (colorization)" if args.colorize else ""
        if guide is not None:
            what = f" (class {args.class_}, guidance scale {args.guidance_scale:g})"
        print(
            f"sampled {args.n} with {args.sampler}{what}{where} in "
            f"{seconds:.1f} s ({args.n / max(seconds, 1e-9):.3g} samples/s)"
        )
        if args.reference:
            _, ref_seconds = draw(_sampling_model(args, layers="reference")[0])
            print(f"reference layers: {ref_seconds:.1f} s; fastscore is {speed_words(seconds, ref_seconds)}")
    if world is not None and not world.main:
        return 0  # rank 0 writes the output
    try:  # atomically: a failed write leaves neither a partial file nor a temporary one
        if kind == ".png" and toy:  # 2-D points: a scatter plot, next to the toy data the model was trained on
            from fastscore.data.images import save_scatter

            data_name = meta.get("data")
            if data_name in TOY_DATA:
                from fastscore.data.toy import toy_sample

                truth = toy_sample(data_name, args.n, seed=args.seed)
                save_scatter(args.out, samples, data=truth, titles=[f"data ({data_name})", f"{args.sampler} samples"])
            else:
                save_scatter(args.out, samples, titles=[f"{args.sampler} samples"])
        elif kind == ".png":
            if mask is not None:  # the masked inputs above their completions
                from fastscore.data.images import inverse_data_transform

                shown = inverse_data_transform(config, known) * mask + 0.5 * (1 - mask)
                samples = torch.cat([shown, samples])
            elif args.colorize:  # the gray inputs above their colourings
                from fastscore.data.images import inverse_data_transform

                samples = torch.cat([inverse_data_transform(config, known), samples])
            paired = mask is not None or args.colorize
            save_image_grid(args.out, samples, nrow=None if not paired else min(args.n, 16))
        else:
            import io

            buffer = io.BytesIO()
            np.savez(buffer, samples=samples.float().cpu().numpy())
            atomic_write_bytes(args.out, buffer.getvalue())
    except OSError as exc:
        raise _write_failed(exc, args.out) from None
    print(f"wrote {args.out}")
    return 0


# ---- fastscore likelihood -----------------------------------------------------------------------------------


def _likelihood(args) -> int:
    import math

    import torch

    from fastscore import distributed
    from fastscore.data.images import data_transform
    from fastscore.likelihood import bits_per_dim
    from fastscore.likelihood import dequantization_offset
    from fastscore.model_sampling import is_toy
    from fastscore.model_sampling import sde_for

    world = _world()
    if args.out is not None:
        _output_kind(args.out, kinds=(".npz",))

    def setup():
        _set_threads(args.threads)
        model, config, meta = _load_model(args)
        toy = is_toy(config)
        data, config = _load_data(args.data, config, seed=args.seed, n=None if not toy else args.n,
                                  model="the checkpoint's")  # fmt: skip
        return model, config, meta, toy, data

    model, config, meta, toy, data = _together(
        setup, main_only=None if args.out is None else lambda: _check_output_file(args.out, args.force)
    )
    with _as_command_errors():
        x = data[_pick(len(data), args.n, args.seed)]
        if not toy:
            # score_sde evaluates uniformly dequantised data, (255 x + U) / 256, so the offset turns the density
            # into the probability of the 256 levels.
            u = torch.rand(x.shape, generator=torch.Generator().manual_seed(args.seed + 1))
            x = data_transform(config, (x * 255.0 + u) / 256.0)
        score_fn, sde = sde_for(model, config, meta)
        with torch.no_grad():
            # with several processes each rank integrates its shard of x; rank 0 gets every example's result
            result, seconds = _timed(lambda: distributed.log_likelihood(
                score_fn, sde, x, n_probes=args.probes, seed=args.seed, rtol=args.tol, atol=args.tol,
                progress=not args.no_progress, return_info=True))  # fmt: skip
    if world is not None and not world.main:
        return 0
    logp, info = result
    offset = 0.0 if toy else dequantization_offset(0.0, 1.0)
    bpd = bits_per_dim(logp, x, offset=offset).double()
    err = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    unit = "bits/dim" if not toy else "bits/dim (continuous density)"
    where = f" on {world.size} processes" if world is not None else ""
    print(
        f"{float(bpd.mean()):.3f} +- {err:.3f} {unit} over {len(bpd)} examples of {args.data!r} "
        f"(standard error of the mean; {seconds:.0f} s{where}, {info.nfe} score evaluations)"
    )
    if args.out is not None:
        import io

        import numpy as np

        from fastscore.data.images import atomic_write_bytes

        buffer = io.BytesIO()
        np.savez(buffer, bits_per_dim=bpd.cpu().numpy(), log_likelihood=logp.cpu().numpy())
        try:
            atomic_write_bytes(args.out, buffer.getvalue())
        except OSError as exc:
            raise _write_failed(exc, args.out) from None
        print(f"wrote {args.out}")
    return 0


# ---- fastscore demo -----------------------------------------------------------------------------------------


def _demo(args) -> int:
    import time

    from fastscore import demo

    start = time.perf_counter()
    out_dir = args.out
    _check_output_folder(out_dir)
    for target in (os.path.join(out_dir, name) for name in demo.OUTPUTS):
        if os.path.isdir(target):
            raise CommandError(f"output {target!r} is a folder; move it away or choose another --out")
        _refuse_overwrite(target, args.force, what="output")
    _set_threads(args.threads)
    with _as_command_errors(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        demo.run(out_dir, args.quick)
    print(f"demo done in {time.perf_counter() - start:.0f} s; images in {out_dir}/")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _class_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a class index (an integer from 0), got {text!r}")
    return value


def _run_options(p: argparse.ArgumentParser, *, seed: str | None, progress: bool = True) -> None:
    """The options every command that does work shares, declared once: --threads, and --seed (its help says
    what the seed drives) and --no-progress where the command has them."""
    if seed is not None:
        p.add_argument("--seed", type=_seed, default=0, help=seed)
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's, one per core)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastscore", description="Fast layers, samplers and likelihoods for score-based models.")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="versions, build and available backends")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "bench",
        help="side-by-side timings: reference formulation, torch.compile of it, fastscore (ratios)",
        description="Checks that all providers agree, then times them interleaved in this process and prints "
        "medians and ratios; the rows are appended to a CSV history, ./fastscore-bench-results.csv unless --csv "
        "names another (bench/results.csv, the history shipped with fastscore, changes only when named).",
    )
    p.add_argument("what", nargs="?", default="all", help="a bench name (an op, or 'all'; default all)")
    p.add_argument("--quick", action="store_true", help="one representative case per bench, fewer rounds")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default cpu)")
    p.add_argument("--rounds", type=_positive_int, default=None, help="timed rounds per provider")
    p.add_argument(
        "--csv",
        metavar="PATH",
        help="append the rows to this CSV (default $FASTSCORE_BENCH_RESULTS, else ./fastscore-bench-results.csv)",
    )
    p.add_argument("--no-record", action="store_true", help="do not append the results to the CSV history")
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "train",
        help="train a score network (annealed DSM, EMA, resumable checkpoints, sample grids)",
        description="Annealed denoising score matching (or SSM / continuous DSM) as ncsnv2 trains, with EMA "
        "weights; OUT/checkpoint.pth is rewritten atomically at every snapshot and at the end (ncsnv2's list "
        "layout), with a grid of samples OUT/samples_<step>.png (a scatter plot for the 2-D toys) when the "
        "config's training.snapshot_sampling is true or absent; --resume continues bitwise where it stopped.",
    )
    p.add_argument(
        "--config",
        help="a bundled config (demo_digits, demo_tiny, cifar10, ...) or a .yml; default: demo_digits for "
        "--data digits, a ScoreMLP config for the 2-D toys",
    )
    p.add_argument(
        "--data",
        help=f"{DATA_HELP} (--resume: default the run's own)",
    )
    p.add_argument("--steps", type=_positive_int, help="train until this step (default config.training.n_iters)")
    p.add_argument("--batch-size", type=_positive_int, help="default config.training.batch_size")
    p.add_argument("--out", help="output folder (default runs/<config>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--loss", choices=("dsm", "ssm", "sde"), help="dsm (default), ssm (sliced) or sde (continuous)")
    p.add_argument("--snapshot-freq", type=_positive_int, help="checkpoint + sample grid every N steps")
    p.add_argument(
        "--no-samples",
        action="store_true",
        help="no sample grids at the snapshots and the end (default: as config.training.snapshot_sampling; "
        "on when absent, as for the toys)",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. model.ema_rate=0.995"
    )
    p.add_argument("--export", metavar="PATH", help="also write a small sampling checkpoint (EMA weights, float16)")
    p.add_argument("--force", action="store_true", help="start over in an --out that holds a checkpoint")
    p.add_argument(
        "--classifier",
        action="store_true",
        help="train a noise-conditional classifier of --data digits' labels instead (under the noise of --config, "
        "default demo_digits; for `sample --class`); writes OUT/classifier.pth (default --steps 1500)",
    )
    p.add_argument(
        "--energy",
        nargs="?",
        const="residual",
        choices=ENERGY_FORMS,
        help="train the network as an energy, score = -grad E with E = |x - f(x)|^2 / 2 (residual, the default) "
        "or -<x, f(x)> / 2 (inner), for `sample --sampler mala|hmc` (docs/mcmc.md)",
    )
    _run_options(p, seed="seed of weights, data order and noise (default 0)")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "sample",
        help="sample a trained model (annealed Langevin, predictor-corrector or ODE) into a PNG grid or .npz",
        description="Samples a checkpoint (fastscore train's, or an ncsn/ncsnv2 one with --config) with its EMA "
        "weights. --mask fills in the unknown part of images from --data; --reference runs the same sampler on "
        "the plain-PyTorch reference layers as well and prints the speed ratio.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint file")
    p.add_argument("--config", help="the model's config, for checkpoints that carry none (the original repos')")
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ald",
        help="ald (default), pc, ode, a few-step solver: dpm (DPM-Solver++(2M)), heun, ddim, adaptive, or on an "
        "energy model (train --energy) annealed Metropolis-adjusted Langevin (mala) or Hamiltonian Monte Carlo (hmc)",
    )
    p.add_argument("--steps", type=_positive_int, help="dpm, heun, ddim: solver steps (default 20)")
    p.add_argument(
        "--eta",
        type=_nonnegative_float,
        help="ddim: the steps' noise, 0 (default) deterministic to 1 ancestral (docs/solvers.md)",
    )
    # -n: under torchrun, whose parser reads --n as an abbreviation of its own --nnodes / --nproc-per-node
    p.add_argument("-n", "--n", type=_positive_int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="grid.png or samples.npz")
    p.add_argument("--mask", help=f"inpaint: the known part, {', '.join(MASKS)} or a .npy of 0/1")
    p.add_argument("--data", help="images to inpaint or colorize (default: the checkpoint's training data)")
    p.add_argument(
        "--colorize", action="store_true", help="pc: colour the gray version of --data's images (3-channel models)"
    )
    p.add_argument("--class", dest="class_", type=_class_index, metavar="K", help="sample class K (needs --classifier)")
    p.add_argument("--classifier", metavar="CKPT", help="a noise-conditional classifier (fastscore train --classifier)")
    p.add_argument(
        "--guidance-scale",
        type=_positive_float,
        default=1.0,
        help="weight of the classifier's gradient (default 1: the class-conditional law for an exact classifier; "
        "5 to 10 for the shipped digits model with a `train --classifier` classifier, README)",
    )
    p.add_argument("--steps-each", type=_positive_int, help="ald, mala, hmc: steps per noise level")
    p.add_argument("--step-lr", type=_positive_float, help="ald, mala, hmc: step size at the last level")
    p.add_argument(
        "--sde-steps",
        type=_positive_int,
        help="pc: time steps (default max(3 x noise levels, 100); below 3 per level warns)",
    )
    # default fastscore.model_sampling.PC_SNR, spelled out as SAMPLERS is
    p.add_argument("--snr", type=_positive_float, default=0.16, help="pc: corrector signal-to-noise ratio")
    p.add_argument("--reference", action="store_true", help="also run on reference layers and print the ratio")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the network first (compiling takes a minute or more)"
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="run the network under bfloat16 autocast (CPUs with AVX512-BF16 or AMX; ~1%% error in the score)",
    )
    p.add_argument("--no-ema", action="store_true", help="the raw training weights instead of the EMA ones")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    _run_options(p, seed="seed of the noise and of the images picked to inpaint (default 0)")
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "likelihood",
        help="bits/dim of data under a model's probability-flow ODE, with an error bar",
        description="Log-likelihoods by the probability-flow ODE of the VE SDE spanning the model's noise levels "
        "(Hutchinson divergence estimates), on uniformly dequantised data; prints the mean bits/dim and its "
        "standard error over the examples.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint file")
    p.add_argument("--config", help="the model's config, for checkpoints that carry none")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("-n", "--n", type=_positive_int, default=16, help="number of examples (default 16)")
    p.add_argument("--probes", type=_positive_int, default=1, help="Hutchinson probes per evaluation")
    p.add_argument("--tol", type=_positive_float, default=1e-3, help="ODE rtol = atol (default 1e-3)")
    p.add_argument("--no-ema", action="store_true", help="the raw training weights instead of the EMA ones")
    p.add_argument("--out", help="also write each example's bits/dim and log-likelihood to this .npz")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    _run_options(p, seed="seed of the examples picked, their dequantisation and the probes (default 0)")
    p.set_defaults(func=_likelihood)

    p = sub.add_parser(
        "demo",
        help="the main job on the bundled default: digits from the shipped model, the NCSN toy, speed ratios",
        description="(1) samples a grid of handwritten digits from the small NCSNv2 checkpoint shipped in the "
        "package (OUT/demo_digits.png); (2) reproduces the NCSN toy, Langevin vs annealed Langevin on the 0.8/0.2 "
        "mixture with exact scores (OUT/ncsn_toy.png) and prints the recovered weights; (3) prints the fused vs "
        "reference speed ratios of one sampling step and one model forward.",
    )
    p.add_argument("--out", default="fastscore-out", help="output folder (default ./fastscore-out)")
    p.add_argument("--quick", action="store_true", help="fewer samples and steps (seconds, for CI)")
    p.add_argument("--force", action="store_true", help="overwrite the images in --out")
    _run_options(p, seed=None, progress=False)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from fastscore import _namespace

        _namespace.check()  # `python -m fastscore.cli` next to a clone named fastscore: say so, not a traceback later
    except ImportError as exc:
        print(f"fastscore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    world = None
    if _launched():
        if args.command not in DISTRIBUTED_COMMANDS:
            print(
                f"fastscore {args.command}: error: runs in one process; torchrun starts several for "
                f"{', '.join(DISTRIBUTED_COMMANDS)} only",
                file=sys.stderr,
            )
            return 1
        from fastscore import distributed

        try:
            world = distributed.init()
        except distributed.DistributedError as exc:
            print(f"fastscore {args.command}: error: {exc}", file=sys.stderr)
            return 1
    try:
        return _run(args, world)
    finally:
        if world is not None:
            from fastscore import distributed

            with contextlib.suppress(Exception):
                distributed.shutdown()


def _run(args, world) -> int:
    """args.func(args) with the command line's error contract. With several processes (``world``) the ranks
    other than 0 print nothing while they work (rank 0 reports), and an error says which rank it comes from."""
    quiet = contextlib.ExitStack()
    if world is not None and not world.main:
        sink = quiet.enter_context(open(os.devnull, "w"))
        quiet.enter_context(contextlib.redirect_stdout(sink))
        quiet.enter_context(contextlib.redirect_stderr(sink))
        args.no_progress = True
    try:
        with quiet:
            return args.func(args)
    except CommandError as exc:
        if world is not None and exc.shared and not world.main:
            return 1  # every rank stopped on the same refusal, which rank 0 prints
        where = f"{world}: " if world is not None and not exc.shared else ""
        print(f"fastscore {args.command}: error: {where}{exc}", file=sys.stderr)
        return 1
    except _distributed_errors() as exc:  # already says which rank saw what
        print(f"fastscore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastscore {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`fastscore info | head`): stop quietly, as other command-line tools do;
        # stdout is pointed at devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ValueError as exc:
        from fastscore._backend import SettingError

        if not isinstance(exc, SettingError):
            raise
        print(f"fastscore {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
