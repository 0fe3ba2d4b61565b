"""Resume state: capture, write atomically, find, check and restore; graceful stop.

One checkpoint of step ``k`` is (docs/checkpoints.md)::

    <output_dir>/<name>_<k:09d>_high_noise.safetensors   LoRA pair, checkpoint dtype
    <output_dir>/<name>_<k:09d>_low_noise.safetensors
    <output_dir>/checkpoints/step_<k:09d>/
        lora.safetensors      fp32 LoRA weights of every trained expert ("<expert>.<key>")
        tensors.safetensors   optimizer, RNG and plugin tensors
        state.json            step, profile snapshot, and the state tree whose
                              tensors are references into tensors.safetensors

Commit protocol: the LoRA pair is written first (each file under a temporary
name, fsynced, renamed); then the state folder is filled under a temporary
name (``.step_<k>.tmp-<pid>``), every file fsynced, and renamed to
``step_<k>`` -- that rename is the commit point. Resume only ever looks at
folders named exactly ``step_<9 digits>`` (``_<lineage tag>`` for a fork) holding a readable ``state.json``,
so a kill at any instant leaves either the previous checkpoint as the newest
complete one, or the new one whole.

Nothing is pickled: tensors live in safetensors, everything else in JSON
(tuples, non-string dict keys and numpy arrays are tagged so they come back
as they were).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch

from . import lora, optimizers, registry
from .errors import ProfileProblem, WantrainError
from .formats import safetensors as st
from .formats import state as state_files
from .formats.state import CHECKPOINTS_DIR as CHECKPOINTS
from .formats.state import FORMAT, LEGACY, STATE_JSON, VERSION, encode_tree
from .formats.snapshot import compare_profiles, profile_snapshot

log = logging.getLogger("wantrain")

_STEP_DIR = re.compile(r"^step_(\d{9})(?:_([0-9a-f]{6}))?$")  # the optional lineage tag
_STEP_FILE = re.compile(r"^(?P<name>.+)_(?P<step>\d{9})(?:_(?P<tag>[0-9a-f]{6}))?_(?P<expert>high_noise|low_noise)"
                        r"(?:_[a-z]+)?\.safetensors$")

def checkpoint_dir(output_dir: Path, step: int, tag: str = "") -> Path:
    return Path(output_dir) / CHECKPOINTS / (f"step_{step:09d}_{tag}" if tag else f"step_{step:09d}")


def step_files(output_dir: Path, name: str, step: int, tag: str = "") -> list[Path]:
    """The LoRA files of one save (the pair, and extras such as EMA's ``_raw`` copies)."""
    return [p for p in Path(output_dir).glob(f"{glob.escape(name)}_{step:09d}_*.safetensors")
            if (m := _STEP_FILE.match(p.name)) and m["name"] == name and (m["tag"] or "") == tag]


# ---------------------------------------------------------------- finding a checkpoint


@attrs.frozen
class Checkpoint:
    path: Path
    step: int
    state: dict  # the parsed state.json

    @property
    def tag(self) -> str:
        m = _STEP_DIR.match(self.path.name)
        return (m.group(2) or "") if m else ""

    @property
    def lineage(self) -> str:
        record = self.state.get("lineage")
        return str(record.get("id", LEGACY)) if isinstance(record, dict) else LEGACY

    @property
    def written_at(self) -> float:
        """When it was written (recorded); 0 for checkpoints older than lineages."""
        t = self.state.get("written_at")
        return float(t) if isinstance(t, (int, float)) else 0.0


def list_checkpoints(output_dir: Path, tag: str | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints (committed folders with a state.json), oldest first;
    with ``tag``, only those of that lineage (docs/checkpoints.md, "Lineages")."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir() and (entry / STATE_JSON).is_file() and tag in (None, m.group(2) or ""):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def read_checkpoint(path: Path) -> Checkpoint:
    """Parse a checkpoint folder's state.json; WantrainError when it is not one."""
    path = Path(path)
    state = state_files.read_doc(path, "--resume")
    state_files.check_files(path, state, "--resume")  # damaged files are found here, not mid-restore
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def newest_checkpoint(output_dir: Path) -> Checkpoint | None:
    """The complete checkpoint written last -- the tip of the newest lineage, by
    recorded write time, not the highest step -- that parses (skipping damaged
    ones with a warning)."""
    found = []
    for step, path in list_checkpoints(output_dir):
        try:
            found.append(read_checkpoint(path))
        except WantrainError as exc:
            log.warning("skipping damaged checkpoint %s: %s", path, exc)
    return max(found, key=lambda c: (c.written_at, c.step), default=None)


def find_checkpoint(run, mode: str = "auto") -> Checkpoint | None:
    """Which checkpoint this run continues from (``auto`` | ``never`` | a path),
    checked against the profile before any weight loads."""
    out = run.output_dir
    if mode == "never":
        existing = list_checkpoints(out)
        if existing:
            raise WantrainError(ProfileProblem(
                "--resume never", "the output folder holds checkpoints of an earlier run", str(existing[-1][1]),
                "use --resume auto to continue it, or another job.output_dir (--set job.output_dir=...) to start fresh"))
        ckpt = None
    elif mode == "auto":
        ckpt = newest_checkpoint(out)
    else:
        ckpt = read_checkpoint(Path(mode))
    remove_partial_saves(out, ckpt.step if ckpt else 0, run.name)
    if ckpt is None:
        log.info("resume: %s; starting at step 0", "no checkpoint in " + str(out) if mode == "auto" else "--resume never")
        return None
    check_compatible(run, ckpt)
    log.info("resume: continuing from %s (step %d of %d); use --resume never to refuse resuming",
             ckpt.path, ckpt.step, run.profile.training.steps)
    return ckpt


def check_compatible(run, ckpt: Checkpoint) -> None:
    where = f"checkpoints/{ckpt.path.name}"
    trained = list(run.pm.hook.trained_experts(profile=run.profile))
    now = profile_snapshot(run.profile, {e: run.target(e) for e in trained})
    problems, warnings = compare_profiles(ckpt.state["profile"], now, where, run.profile)
    if trained != ckpt.state["experts"]:
        problems.append(ProfileProblem("trained experts", f"differ from the checkpoint being resumed ({where} trains "
                                       f"{', '.join(ckpt.state['experts'])})", trained,
                                       "set the plugin that picks experts back, or use another job.output_dir"))
    if problems:
        raise WantrainError(problems)
    for line in warnings:
        log.warning("resume: %s", line)


def remove_partial_saves(output_dir: Path, resumed_step: int, name: str) -> None:
    """Leftovers of a save that was killed: temporary files and folders, and
    step-numbered LoRA files newer than the resume point without a committed
    state (they are written again when the run reaches that step)."""
    out = Path(output_dir)
    committed = {(s, _STEP_DIR.match(p.name).group(2) or "") for s, p in list_checkpoints(out)}
    for entry in [*out.glob(".*.tmp-*"), *(out / CHECKPOINTS).glob(".step_*")]:
        log.info("removing the leftover of an interrupted save: %s", entry)
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    for entry in out.glob(f"{glob.escape(name)}_*.safetensors"):
        m = _STEP_FILE.match(entry.name)
        if m and m["name"] == name and int(m["step"]) > resumed_step and (int(m["step"]), m["tag"] or "") not in committed:
            log.info("removing %s (its save did not complete)", entry.name)
            entry.unlink(missing_ok=True)


# ---------------------------------------------------------------- capture and write


def capture(run) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json document, its tensors, fp32 LoRA weights) of the run now."""
    plugins = registry.call_each(run.pm, "state_dict", run=run)  # keyed by registered name
    tree = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.lr_scheduler.state_dict(),
        "rng": run.rng_state(),
        "data": run.data.state_dict(),
        "plugins": plugins,
    }
    tensors: dict[str, torch.Tensor] = {}
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "step": run.step,
        "name": run.name,
        "experts": list(run.trained),
        "lineage": {"id": run.lineage.id, "resumed_from": run.lineage.resumed_from},
        "written_at": time.time(),  # auto-resume follows the checkpoint written last
        "profile": profile_snapshot(run.profile, {e: run.target(e) for e in run.trained}),
        "tree": encode_tree(tree, tensors),
    }
    weights = {f"{e}.{k}": v for e in run.trained for k, v in lora.lora_state(run.experts[e]).items()}
    return doc, _unshare(tensors), weights


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory; copy the few that do."""
    seen, out = set(), {}
    for key, t in tensors.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        out[key] = t.clone() if ptr in seen else t
        if ptr is not None:
            seen.add(ptr)
    return out


def write_state(run, step: int) -> Path:
    """Write ``checkpoints/step_<step>/`` atomically; return its path."""
    doc, tensors, weights = capture(run)
    st.require_finite(weights, f"step {step}")
    final = checkpoint_dir(run.output_dir, step, run.lineage.tag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"format": "pt", "wantrain.step": str(step), "wantrain.experts": ",".join(run.trained)}
        for key in ("rank", "alpha"):  # "16", or "high_noise:16,low_noise:8" when the experts differ
            own = {e: f"{getattr(run.target(e), key):g}" for e in run.trained}
            meta[f"wantrain.{key}"] = own[run.trained[0]] if len(set(own.values())) == 1 else \
                ",".join(f"{e}:{v}" for e, v in own.items())
        state_files.write_files(tmp, doc, tensors, weights, meta)  # each file atomic + fsynced, then the folder
        _commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _commit_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` (replacing an older save of the same step)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    st.fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_error_code(exc: BaseException) -> int | None:
    """The errno of a failed write (OSError, or safetensors' "(os error N)")."""
    if isinstance(exc, OSError):
        return exc.errno
    m = re.search(r"os error (\d+)", str(exc))
    return int(m.group(1)) if m else None


def save_checkpoint(run, step: int, dtype: str | None = None) -> dict[str, str]:
    """The LoRA pair (``dtype``, default ``[target] save_dtype``) and the resume
    state of ``step``; fires ``on_save`` with ``paths["state"]``. A failed write
    (disk full) removes what this save wrote and raises WantrainError; earlier
    checkpoints are untouched. Under torchrun rank 0 alone writes."""
    if run.rank:  # the others hold the same state; they only learn where it goes
        return {"state": str(checkpoint_dir(run.output_dir, step, run.lineage.tag))}
    paths: dict[str, str] = {}
    try:
        paths = dict(run.pm.hook.write_lora(run=run, step=step, folder=str(run.output_dir), dtype=dtype) or {})
        paths["state"] = str(write_state(run, step))
    except Exception as exc:  # noqa: BLE001 - write failures become one line
        code = write_error_code(exc)
        if code is None and not isinstance(exc, WantrainError):
            raise
        for path in [*paths.values(), *step_files(run.output_dir, run.name, step, run.lineage.tag)]:
            Path(path).unlink(missing_ok=True)  # the part of this save that did get written
        if code is None:
            raise  # non-finite weights: refused before anything of the state was written
        raise _write_failed(run, code, f"the checkpoint of step {step}; nothing of it was kept, "
                            "earlier checkpoints are intact") from None
    run.pm.hook.on_save(run=run, step=step, paths=paths)
    return paths


def save_final(run) -> dict[str, str]:
    """``run.save_lora(None)`` with a full disk reported as one line."""
    try:
        return run.save_lora(None)
    except Exception as exc:  # noqa: BLE001 - write failures become one line
        code = write_error_code(exc)
        if code is None:
            raise
        raise _write_failed(run, code, "the final LoRA files; the checkpoints are intact") from None


def _write_failed(run, code: int, what: str) -> WantrainError:
    reason = "disk full" if code in (errno.ENOSPC, errno.EDQUOT) else os.strerror(code).lower()
    return WantrainError(ProfileProblem(
        "job.output_dir", f"{reason} while writing {what}", str(run.output_dir),
        "free space (rotation runs only after a save succeeds, so a lower keep frees nothing now: "
        "delete checkpoints older than the newest, or other files) and run the same command again to resume"))


# ---------------------------------------------------------------- restore


def restore(run, ckpt: Checkpoint | None) -> None:
    """Put the checkpoint's state into the loaded run (after the optimizer
    exists, before ``on_run_start``). The RNG states are set last."""
    if ckpt is None:
        return
    tree = state_files.read_tree(ckpt.path, ckpt.state)
    for expert, weights in state_files.read_weights(ckpt.path, run.trained).items():
        lora.load_lora_state(run.experts[expert], weights)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(optimizers.regroup(tree["optimizer"], run.optimizer))  # (older: one group)
    run.lr_scheduler.load_state_dict(tree["scheduler"])
    _apply_profile_hyperparameters(run, fresh)
    run.data.load_state_dict(tree["data"])
    run.step = ckpt.step
    load_plugin_states(run, tree["plugins"])
    run.set_rng_state(tree["rng"])


def load_plugin_states(run, states: dict[str, Any]) -> None:
    """Hand each plugin the state saved under its registered name; an entry
    whose plugin is no longer enabled is reported and left alone."""
    loaders = {i.plugin_name for i in run.pm.hook.load_state_dict.get_hookimpls()}
    for name, plugin in run.pm.list_name_plugin():
        if name in states and name in loaders:
            others = [p for other, p in run.pm.list_name_plugin() if other != name]
            run.pm.subset_hook_caller("load_state_dict", remove_plugins=others)(run=run, state=states[name])
    for name in sorted(set(states) - loaders):
        log.warning("resume: the checkpoint holds state of plugin %r, which this run does not load; ignored", name)


def _apply_profile_hyperparameters(run, fresh: list[dict]) -> None:
    """A changed lr or weight decay (safe changes) wins over the checkpoint's."""
    sched = run.lr_scheduler
    for i, (group, new) in enumerate(zip(run.optimizer.param_groups, fresh)):
        changed = new.get("initial_lr") != group.get("initial_lr")
        for key, value in new.items():  # not the optimizer's running values (prodigy's d, schedule-free's k)
            if key in ("weight_decay", "initial_lr") or key in run.profile.training.optimizer_args:
                group[key] = value
        if changed and hasattr(sched, "lr_lambdas"):
            sched.base_lrs[i] = new["initial_lr"]
            group["lr"] = new["initial_lr"] * sched.lr_lambdas[i](sched.last_epoch)
            sched._last_lr[i] = group["lr"]


# ---------------------------------------------------------------- graceful stop


@contextlib.contextmanager
def stop_on_signals(run) -> Iterator[None]:
    """SIGINT / SIGTERM set ``run.stop_requested``: the loop finishes the
    current step, saves a checkpoint and returns. A second signal aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True
        log.warning("%s: stopping after the current step (%d done so far), then saving a checkpoint "
                    "(send it again to abort without saving)", signal.Signals(signum).name, run.step)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def save_on_stop(run) -> dict[str, str]:
    """After a graceful stop: the checkpoint of ``run.step`` (unless a plugin
    already wrote it at this step), in ``[target] save_dtype``."""
    folder = checkpoint_dir(run.output_dir, run.step, run.lineage.tag)
    if folder.is_dir():
        return {"state": str(folder)}
    return save_checkpoint(run, run.step)

