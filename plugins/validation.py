"""Validation loss on held-out items (``[plugins.validation]``).

The training loss is noisy by design (a random timestep and random noise per
step); this plugin measures the same flow-matching loss on items the run
never trains on, under conditions that never change, so the curve is
comparable across steps -- and across runs of the same data:

- **held-out items**: every item of a dataset marked ``role = "held_out"``
  (the kernel leaves such datasets out of training), and/or a ``fraction`` of
  the training datasets' files, picked by a hash of the file name (the same
  files whatever the seed; at least one when the fraction is above 0, never
  all of a dataset), taken out of training before the first step. One fixed
  sample per item: the middle "fps" window, no flips, the caption as written;
  at most ``max_items`` items (the first in file order);
- **fixed timesteps**: ``timesteps`` values per trained expert, evenly spaced
  in the expert's range (midpoints of equal slices: high noise with boundary
  0.875 and 4 timesteps -> 890.6, 921.9, 953.1, 984.4), narrowed when
  ``[plugins.multistage]`` narrows it;
- **fixed noise**: one noise tensor per item from ``seed`` (not the training
  generator, which stays untouched, so validation never changes the run);
- **image-to-video archs** (I2V-A14B, TI2V-5B): every item is measured from
  its start frame (its override image when there is one), with the arch's
  condition -- the TI2V-5B's mixed text-to-video samples are not measured.

Every ``every`` optimizer steps (and at the last step; at step 0 too with
``at_start``) it adds to the step's metrics -- so TensorBoard logs them --
``val/loss`` (mean over experts and timesteps), ``val/high_noise``,
``val/low_noise`` and ``val/t<t>`` (each timestep, e.g. ``val/t0890``), and
appends them to ``<output_dir>/validation.jsonl``. With ``best = true`` a
lower ``val/loss`` than any before writes the LoRA pair into
``<output_dir>/best/`` (replacing the previous best) and ``best.json``.

Cost: latents and text states of the held-out items are computed once (the
VAE and text encoder, through ``encode_videos`` / ``encode_prompts``, so the
latent / text caches answer when enabled) and kept on the host; each
validation is then items x timesteps x trained experts forward passes
without gradients -- about ``timesteps * items / (batch_size *
gradient_accumulation)`` training steps' worth of compute at a third of a
step's cost each (no backward). With schedule-free AdamW the averaged
weights are measured (the ones saved).

Events: ``check_profile``, ``on_run_start`` (picks and encodes the items;
step-0 baseline), ``on_step`` (tryfirst: before TensorBoard reads the
metrics), ``state_dict`` / ``load_state_dict`` (the best loss and step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import attrs
import torch

from wantrain import flow, hookimpl, optimizers
from wantrain.data import Batch, Draw, final_caption, make_spec, scan_dataset
from wantrain.errors import ProfileProblem
from wantrain.profile import in_range, positive
from wantrain.run import Run

log = logging.getLogger("wantrain.validation")

ROLE = "held_out"


@attrs.frozen(kw_only=True)
class Config:
    #: optimizer steps between validations
    every: int = attrs.field(default=100, validator=positive)
    #: share of each training dataset's files held out (0: only role = "held_out" datasets)
    fraction: float = attrs.field(default=0.0, validator=in_range(0.0, 0.5))
    #: most held-out items measured
    max_items: int = attrs.field(default=16, validator=positive)
    #: fixed timesteps per trained expert, evenly spaced in its range
    timesteps: int = attrs.field(default=4, validator=positive)
    #: seed of the fixed noise
    seed: int = 0
    #: also measure before the first step (the baseline)
    at_start: bool = True
    #: keep the LoRA pair of the lowest val/loss in <output_dir>/best/
    best: bool = False


def held_out(path: str, fraction: float) -> bool:
    """Whether a training file is held out: a hash of its name below ``fraction``."""
    digest = hashlib.sha256(Path(path).name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def fixed_timesteps(lo: float, hi: float, n: int) -> list[float]:
    """``n`` midpoints of equal slices of [lo, hi]."""
    return [lo + (k + 0.5) * (hi - lo) / n for k in range(n)]


def one_sample(ds, unit_id: int, trigger_word: str | None) -> tuple:
    """(spec, caption) of the fixed sample of one unit."""
    spec = make_spec(ds, unit_id, Draw(window=0.5, flip_x=False, flip_y=False, drop_caption=False))
    template = ds.items[ds.units[unit_id].item].template
    return spec, final_caption(template, trigger_word)


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.items: list[dict] = []
        self.best: tuple[float, int] | None = None

    @hookimpl
    def check_profile(self, profile):
        if self.config.fraction == 0 and not any(ds.role == ROLE for ds in profile.datasets):
            return [ProfileProblem("plugins.validation", "has no held-out items",
                                   fix='mark a [[datasets]] role = "held_out", or set fraction = 0.1')]
        return []

    # ------------------------------------------------------------ the items

    def pick(self, run: Run) -> list[tuple]:
        """(spec, caption) of every held-out item, training files taken out of training."""
        picked = []
        for index, cfg in enumerate(run.profile.datasets):
            if cfg.role != ROLE:
                continue
            ds, _, problems = scan_dataset(index, cfg, run.profile)
            if ds is None:
                log.warning("validation: datasets[%d] has no usable item (%s)", index, problems[0] if problems else "")
                continue
            picked += [one_sample(ds, u, run.profile.job.trigger_word) for u in range(len(ds.units))]
        split = []  # (dataset, unit) split off training, one unit per file
        if self.config.fraction:
            for ds in run.data.datasets:
                units = [u for u in range(len(ds.units)) if held_out(ds.items[ds.units[u].item].path, self.config.fraction)]
                if not units and ds.units:
                    units = [min(range(len(ds.units)), key=lambda u: hashlib.sha256(
                        Path(ds.items[ds.units[u].item].path).name.encode()).digest())]
                first = {}  # item -> its first unit (an item has a unit per resolution)
                for u in units:
                    first.setdefault(ds.units[u].item, u)
                for group in ds.groups:  # never all of a bucket (nor of a dataset): its last held item trains
                    items = {ds.units[u].item for u in group}
                    if items <= first.keys():
                        first.pop(max(items))
                split += [(ds, u) for u in first.values()]
        seen, out = set(), []
        for spec, caption in picked:  # one sample per file
            if spec.path not in seen:
                seen.add(spec.path)
                out.append((spec, caption))
        for ds, u in split[: max(0, self.config.max_items - len(out))]:  # only what is measured leaves training
            spec, caption = one_sample(ds, u, run.profile.job.trigger_word)
            run.data.exclude(ds.index, spec.path, "held out for validation")
            out.append((spec, caption))
        return out[: self.config.max_items]

    def encode(self, run: Run, picked: list[tuple]) -> None:
        """Latents, text states and the fixed noise of each item, on the host."""
        self.items = []
        for i, (spec, caption) in enumerate(picked):
            pixels = run.data.load(spec)[None]
            start = last = None
            if run.arch.takes_start_frame:  # image-to-video archs: each item from its start (and last) frame
                first, end = run.data.load_condition(spec, pixels[0], run.profile.model.last_frame)
                start, last = first[None], None if end is None else end[None]
            batch = Batch(pixels=pixels, captions=[caption], templates=[caption], paths=[spec.path],
                          cache_keys=[spec.cache_key()], is_regularization=[False], dataset_index=[spec.dataset],
                          specs=(spec,), start=start, last=last)
            with torch.no_grad():
                latents = run.encode_videos(batch).float().cpu()
                text = run.encode_prompts([caption]).cpu()
                cond = run.encode_condition(batch, pixels.shape[2]).to("cpu")
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(self.config.seed * 100003 + i))
            self.items.append({"path": spec.path, "latents": latents, "text": text, "noise": noise, "cond": cond})

    def ranges(self, run: Run) -> dict[str, tuple[float, float]]:
        narrowed = run.extras.get("expert_ranges") or {}
        return {e: tuple(narrowed.get(e, run.expert_range(e))) for e in run.trained}

    # ------------------------------------------------------------ measuring

    def evaluate(self, run: Run) -> dict[str, float]:
        """``val/...`` losses of the current weights (no gradients, no RNG touched)."""
        per_expert, per_t = {}, {}
        with torch.no_grad(), optimizers.eval_weights(run.optimizer):
            for expert, (lo, hi) in self.ranges(run).items():
                run.activate_expert(expert)
                losses = []
                for t in fixed_timesteps(lo, hi, self.config.timesteps):
                    tt = torch.tensor([t], device=run.device)
                    values = []
                    for item in self.items:
                        latents, noise = item["latents"].to(run.device), item["noise"].to(run.device)
                        cond = item["cond"].to(run.device)
                        pred = run.predict(expert, flow.add_noise(latents, noise, tt), tt, item["text"].to(run.device), cond)
                        values.append(float(flow.flow_loss(pred, flow.velocity_target(latents, noise), run.profile.training.loss,
                                                           cond.loss_weight())))
                    per_t[f"val/t{round(t):04d}"] = sum(values) / len(values)
                    losses.append(per_t[f"val/t{round(t):04d}"])
                per_expert[f"val/{expert}"] = sum(losses) / len(losses)
        if run.active_expert is not None:
            run.activate_expert(run.active_expert)  # training continues where it was
        return {"val/loss": sum(per_expert.values()) / len(per_expert), **per_expert, **per_t}

    def record(self, run: Run, step: int, values: dict[str, float]) -> None:
        log.info("validation at step %d: val/loss %.5f (%s)", step, values["val/loss"],
                 ", ".join(f"{k[4:]} {v:.5f}" for k, v in values.items() if k in ("val/high_noise", "val/low_noise")))
        if run.rank:
            return
        with open(run.output_dir / "validation.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.config.best and (self.best is None or values["val/loss"] < self.best[0]):
            self.best = (values["val/loss"], step)
            folder = run.output_dir / "best"
            staging = run.output_dir / ".best.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            from wantrain.run import write_lora_pair  # the weights measured (the event would give EMA's shadow)

            write_lora_pair(run, step, staging)
            (staging / "best.json").write_text(json.dumps({"step": step, "val_loss": values["val/loss"]}) + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)

    # ------------------------------------------------------------ events

    @hookimpl(tryfirst=True)  # before text_cache may unload the text encoder (it runs last)
    def on_run_start(self, run: Run):
        picked = self.pick(run)
        if not picked:
            log.warning("validation: no held-out item could be read; no validation loss")
            return
        self.encode(run, picked)
        self.truncate(run)
        log.info("validation: %d held-out items x %d timesteps per expert, every %d steps",
                 len(self.items), self.config.timesteps, self.config.every)
        if self.config.at_start and run.step == 0:
            self.record(run, 0, self.evaluate(run))

    def truncate(self, run: Run) -> None:
        """A resumed run drops the lines of steps after its checkpoint."""
        path = run.output_dir / "validation.jsonl"
        if run.rank or not path.is_file():
            return
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= run.step] if run.step else []
        path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    @hookimpl(tryfirst=True)
    def on_step(self, run: Run, step, metrics):
        if not self.items or not (step % self.config.every == 0 or step == run.profile.training.steps):
            return
        values = self.evaluate(run)
        metrics.update(values)
        self.record(run, step, values)

    @hookimpl
    def state_dict(self):
        return {"best": list(self.best) if self.best else None}

    @hookimpl
    def load_state_dict(self, state):
        self.best = tuple(state["best"]) if state.get("best") else None
