"""The output folder's own files besides checkpoints (:mod:`wantrain.resume`):
the lock that keeps one run per folder, which lineage a run writes, and final
files set aside when a run starts another lineage (docs/checkpoints.md, "One run per folder", "Lineages")."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

from ..errors import ProfileProblem, WantrainError
from .state import Lineage

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no folder lock
    fcntl = None

log = logging.getLogger("wantrain")

LOCK_FILE = ".wantrain.lock"
_FINAL_FILE = re.compile(r"^(?P<name>.+)_(?:high_noise|low_noise)(?:_[a-z]+)?\.safetensors$")


@contextlib.contextmanager
def hold_output_dir(output_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<output_dir>/.wantrain.lock`` (holding the
    pid) for the run's life; the OS releases it on any death. A second run
    on the folder is one error line naming the holder. Under torchrun rank 0
    holds it for the job (the other ranks write nothing there)."""
    from ..distributed import rank

    path = Path(output_dir) / LOCK_FILE
    if fcntl is None or rank() != 0:  # pragma: no cover
        yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise WantrainError(ProfileProblem(
                "job.output_dir", f"another wantrain run (pid {holder}) is training in this folder", str(output_dir),
                "wait for it to end (or stop it), or use another job.output_dir")) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # not a file its last holder removed meanwhile
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiting opener sees the inode change
        os.close(fd)


def set_aside_final_files(output_dir: Path, name: str, lineage: str) -> list[Path]:
    """Rename ``<name>_<expert>.safetensors`` (and extras) to
    ``<name>_<expert>.before-<lineage>.safetensors``: final names mean "this
    lineage finished", and these are an earlier run's."""
    moved = []
    for path in sorted(Path(output_dir).glob(f"{glob.escape(name)}_*.safetensors")):
        m = _FINAL_FILE.match(path.name)
        if m and m["name"] == name:
            target = path.with_name(f"{path.stem}.before-{lineage}{path.suffix}")
            os.rename(path, target)
            log.warning("resume: %s is another lineage's result, not this run's; renamed to %s", path.name, target.name)
            moved.append(target)
    return moved


def start_lineage(run, ckpt) -> None:
    """Set ``run.lineage`` (docs/checkpoints.md, "Lineages"): the checkpoint's
    own when it is the newest of its lineage in this folder, else a new one --
    tagged in its names when the folder already holds checkpoints. A run that
    does not continue the folder's newest checkpoint sets the final files
    there aside (they are another lineage's, not this run's result)."""
    from ..resume import list_checkpoints, newest_checkpoint  # resume imports this module
    from .state import CHECKPOINTS_DIR as CHECKPOINTS

    out = Path(run.output_dir)
    here = ckpt is not None and ckpt.path.resolve().parent == (out / CHECKPOINTS).resolve()
    resumed = str(ckpt.path) if ckpt is not None else None
    if here and not any(step > ckpt.step for step, _ in list_checkpoints(out, ckpt.tag)):
        run.lineage = Lineage(id=ckpt.lineage, tag=ckpt.tag, resumed_from=resumed)
    else:
        new = secrets.token_hex(3)
        run.lineage = Lineage(id=new, tag=new if list_checkpoints(out) else "", resumed_from=resumed)
        if ckpt is not None:
            log.info("resume: a new lineage %s starts at %s (its saves are named step_<N>_%s; the other lineages' "
                     "checkpoints stay and are not rotated by this run)", new, ckpt.path, run.lineage.tag or "")
    newest = newest_checkpoint(out) if here else None
    if not (here and newest is not None and newest.path == ckpt.path):
        set_aside_final_files(out, run.name, run.lineage.id)
