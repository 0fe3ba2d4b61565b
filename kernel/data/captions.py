"""Captions: read the same-stem text file, keep ``[trigger]`` as a placeholder.

A caption becomes a *template* at scan time (:func:`caption_template`):
``[trigger]`` marks where the trigger word goes, a literal trigger word is
turned into the placeholder, and a caption without either gets ``"[trigger], "``
prepended (never for regularization data). :func:`final_caption` fills the
placeholder in when a batch is built.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..profile import DatasetConfig
from .media import MediaError

TRIGGER = "[trigger]"


def read_caption(media_path: Path, cfg: DatasetConfig) -> str | None:
    """The same-stem caption file's text (whitespace collapsed), None if
    missing or empty; raises MediaError naming the caption file when it
    cannot be read or is not UTF-8."""
    path = media_path.with_name(media_path.stem + "." + cfg.caption_ext.lstrip("."))
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MediaError(f"caption {path.name} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise MediaError(f"caption {path.name} cannot be read ({exc.strerror or exc}); fix its permissions") from None
    text = " ".join(text.split())
    return text or None


def caption_template(text: str, trigger_word: str | None, is_regularization: bool) -> str:
    """The caption with ``[trigger]`` where the trigger word goes.

    ``[trigger]`` (any case) is kept as the placeholder; with a trigger word
    set, a caption that spells the word literally gets it replaced by the
    placeholder, and a non-regularization caption that has neither gets
    ``"[trigger], "`` prepended. Regularization captions never get one added.
    """
    text = re.sub(r"\[trigger\]", TRIGGER, text, flags=re.IGNORECASE)
    if trigger_word and TRIGGER not in text:
        literal = re.compile(rf"(?<!\w){re.escape(trigger_word)}(?!\w)")
        text = literal.sub(TRIGGER, text)
        if TRIGGER not in text and not is_regularization:
            text = f"{TRIGGER}, {text}" if text else TRIGGER
    return text


def final_caption(template: str, trigger_word: str | None) -> str:
    return template.replace(TRIGGER, trigger_word or "")
