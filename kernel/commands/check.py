"""``wantrain check``: everything that can be checked without loading a
weight -- the profile's plugins and their cross-checks (through the one
start-up path), the model folder and the LoRA rank against its config, the
dataset folders -- all problems at once."""

from __future__ import annotations

from .. import archs
from ..archs import checks
from ..formats import sources
from ..data import build_train_data
from ..errors import ProfileError, ProfileProblem, WantrainError
from ..profile import Profile
from ..run import open_run


def check(profile: Profile) -> list[ProfileProblem]:
    """``wantrain check``: plugins, cross-checks, dataset folders, model path;
    loads no weights. Every problem at once."""
    problems: list[ProfileProblem] = []
    try:
        open_run(profile, purpose="inspect")
    except ProfileError as exc:
        problems += exc.problems
    problems += checks.check_model_source(profile.model.name_or_path, profile.model.arch)
    problems += checks.check_rank(profile.model.name_or_path, profile.target.rank, profile.target.modules)
    problems += sources.single_file_problems(profile, archs.get(profile.model.arch))
    try:
        build_train_data(profile, seed=profile.job.seed).close()
    except WantrainError as exc:
        problems += exc.problems
    return problems
