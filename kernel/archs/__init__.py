"""The Wan 2.2 family as data: what each ``[model] arch`` is made of.

The kernel never branches on an arch's name: it reads an :class:`Arch` --
the experts and their subfolders, the routing boundary, how a start frame
reaches the transformer (:mod:`wantrain.archs.condition`), the latent shape
and the buckets' size step. Checked against the model folder's own configs
(:func:`folder_problems`) before any weight loads.

============== ================ ========== ====== ========== ==============
arch           experts          boundary   in ch  latent ch  start frame
============== ================ ========== ====== ========== ==============
wan22_t2v_a14b high, low noise  0.875      16     16         none
wan22_i2v_a14b high, low noise  0.9        36     16         channels
wan22_ti2v_5b  one ("full")     --         48     48         tokens
============== ================ ========== ====== ========== ==============

``channels`` (I2V-A14B): 16 noisy channels + 4 mask channels + 16 channels of
the VAE-encoded condition video (start frame, zeros after it; optionally a
last frame), as ``WanImageToVideoPipeline.prepare_latents`` builds them.
``tokens`` (TI2V-5B, ``expand_timesteps``): the first latent frame is the
clean VAE-encoded start image with timestep 0, per-token timesteps.
"""

from __future__ import annotations

from typing import Mapping

import attrs

from ..errors import ProfileProblem

HIGH, LOW, FULL = "high_noise", "low_noise", "full"


@attrs.frozen(kw_only=True)
class Arch:
    """One member of the Wan 2.2 family, as the kernel reads it."""

    name: str
    title: str
    #: trained/loaded experts in routing order (high noise first)
    experts: tuple[str, ...]
    #: expert -> Diffusers subfolder
    subfolders: Mapping[str, str]
    #: t >= boundary * 1000 routes to the first expert (model_index's
    #: ``boundary_ratio`` wins when present); 0 for a single expert
    boundary: float
    #: transformer input channels (``transformer/config.json`` in_channels)
    in_channels: int
    #: VAE latent channels (``vae/config.json`` z_dim)
    latent_channels: int
    #: VAE compression: pixels per latent (spatial), frames per latent (temporal)
    vae_spatial: int
    vae_temporal: int = 4
    #: how a start frame reaches the transformer: "none" | "channels" | "tokens"
    start_frame: str = "none"
    #: share of samples trained with a start frame when ``[model] i2v_probability`` is not set
    default_i2v_probability: float = 0.0
    #: the diffusers pipeline that renders this arch with a start image (or text only)
    pipeline: str = "WanPipeline"
    #: native size and frame rate (previews and recipes)
    native: tuple[int, int, int] = (832, 480, 16)
    #: the hub id of the Diffusers model
    hub_id: str = ""

    @property
    def single_expert(self) -> bool:
        return len(self.experts) == 1

    @property
    def size_multiple(self) -> int:
        """Bucket sides step: VAE compression x the transformer's 2x2 patch."""
        return self.vae_spatial * 2

    @property
    def takes_start_frame(self) -> bool:
        return self.start_frame != "none"

    def expert_for(self, t: float, boundary: float) -> str:
        """The expert that denoises at ``t`` (``boundary``: the run's)."""
        if self.single_expert:
            return self.experts[0]
        return self.experts[0] if t >= boundary * 1000.0 else self.experts[1]


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(name="wan22_t2v_a14b", title="Wan 2.2 T2V-A14B", experts=(HIGH, LOW),
             subfolders={HIGH: "transformer", LOW: "transformer_2"}, boundary=0.875, in_channels=16,
             latent_channels=16, vae_spatial=8, hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
        Arch(name="wan22_i2v_a14b", title="Wan 2.2 I2V-A14B", experts=(HIGH, LOW),
             subfolders={HIGH: "transformer", LOW: "transformer_2"}, boundary=0.9, in_channels=36,
             latent_channels=16, vae_spatial=8, start_frame="channels", default_i2v_probability=1.0,
             pipeline="WanImageToVideoPipeline", hub_id="Wan-AI/Wan2.2-I2V-A14B-Diffusers"),
        Arch(name="wan22_ti2v_5b", title="Wan 2.2 TI2V-5B", experts=(FULL,), subfolders={FULL: "transformer"},
             boundary=0.0, in_channels=48, latent_channels=48, vae_spatial=16, start_frame="tokens",
             default_i2v_probability=0.5, pipeline="WanImageToVideoPipeline", native=(1280, 704, 24),
             hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
    )
}
DEFAULT = "wan22_t2v_a14b"
#: every expert name any arch uses, in a fixed order (file names, state keys)
ALL_EXPERTS = (HIGH, LOW, FULL)


def get(name: str) -> Arch:
    return ARCHS[name]


def identify(index: Mapping, transformer: Mapping, vae: Mapping | None = None) -> Arch | None:
    """The arch a Diffusers folder holds, from ``model_index.json`` and the
    configs of ``transformer`` (and ``vae``); None when it is none of them."""
    two = "transformer_2" in index and index.get("transformer_2") not in (None, [None, None])
    channels = transformer.get("in_channels")
    for arch in ARCHS.values():
        if (len(arch.experts) == 2) == two and channels == arch.in_channels:
            if vae is None or vae.get("z_dim", arch.latent_channels) == arch.latent_channels:
                return arch
    return None


def describe(index: Mapping, transformer: Mapping) -> str:
    """A short description of a folder that matches no arch."""
    experts = "two experts" if "transformer_2" in index else "one transformer"
    return f"{experts}, transformer in_channels {transformer.get('in_channels')}"


def folder_problems(arch: Arch, where: str, spec: str, index: Mapping, transformer: Mapping,
                    vae: Mapping | None = None) -> list[ProfileProblem]:
    """``[model] arch`` against the folder's configs: one line naming both."""
    found = identify(index, transformer, vae)
    if found is arch:
        return []
    what = found.title if found else f"not a Wan 2.2 model this trainer knows ({describe(index, transformer)})"
    return [ProfileProblem(where, f'is "{arch.name}" ({arch.title}) but the model {spec} is {what}', arch.name,
                           f'set [model] arch = "{found.name}"' if found else "point [model] name_or_path at a Wan 2.2 model")]
