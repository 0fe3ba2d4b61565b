"""Items and buckets: what a scan keeps of each file, and the size it trains at.

An :class:`Item` is one usable image or clip (its displayed size, frame count,
frame rate and caption template). At each of a dataset's resolutions it
becomes a :class:`Unit` in one bucket: :func:`bucket_for` picks the (w, h),
multiples of 16 with area <= resolution^2, never upscaled, aspect ratio
closest to the item's. :func:`crop_box` is the cover-resize + centre crop that
brings a frame to its bucket.
"""

from __future__ import annotations

import math

import attrs

from .media import MediaError


@attrs.frozen(kw_only=True)
class Item:
    """One usable image or clip of a dataset."""

    path: str
    kind: str  # "image" | "video"
    width: int  # as displayed (EXIF / display-matrix rotation applied)
    height: int
    num_frames: int  # source frames; 1 for an image
    fps: float  # source frame rate; 0.0 for an image
    template: str  # caption before trigger substitution ("[trigger]" in it)
    #: image-to-video archs: a same-stem image beside the clip (``clip.png``) that replaces its start frame
    start: str | None = None
    #: ... and ``clip.last.png``, its last frame (``[model] last_frame``)
    last: str | None = None


@attrs.frozen(kw_only=True)
class Unit:
    """An item at one resolution: what a batch slot holds."""

    item: int
    resolution: int
    width: int  # bucket width
    height: int  # bucket height
    frames: int  # frames per sample (1 for images)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.width, self.height, self.frames)


def bucket_for(width: int, height: int, resolution: int, step: int = 16) -> tuple[int, int]:
    """The bucket (w, h) of an item of native size ``width x height`` at
    ``resolution``: sides multiples of ``step`` (16; 32 for the TI2V-5B's 16x VAE), area <= resolution^2, never larger
    than the item on either side (no upscaling); among those, for each width
    the tallest height, and of these the one whose aspect ratio is closest
    (in log space) to the item's; ties go to the larger area."""
    limit = resolution * resolution
    aspect = width / height
    best: tuple[tuple[float, int], tuple[int, int]] | None = None
    for bw in range(step, min(width, limit // step) + 1, step):
        bh = min(limit // bw, height) // step * step
        if bh < step:
            continue
        score = (abs(math.log(bw / bh / aspect)), -bw * bh)
        if best is None or score < best[0]:
            best = (score, (bw, bh))
    if best is None:
        raise MediaError(f"too small: {width}x{height} has a side below {step} px")
    return best[1]


def needs_upscaling(width: int, height: int, resolution: int, step: int = 16) -> bool:
    """True when the item is too small to fill the bucket a large item of the
    same shape would get at ``resolution`` (so it trains smaller)."""
    scale = math.ceil(2 * resolution / min(width, height))
    big = bucket_for(width * scale, height * scale, resolution, step)
    small = bucket_for(width, height, resolution, step)
    return small[0] * small[1] < big[0] * big[1]


def crop_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """Source box (left, top, right, bottom) of a cover-resize + centre crop."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    cw, ch = bw / scale, bh / scale
    left, top = (width - cw) / 2, (height - ch) / 2
    return (left, top, left + cw, top + ch)
