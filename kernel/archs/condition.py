"""A start frame (and optionally a last frame) as the transformer sees it,
built exactly as diffusers' ``WanImageToVideoPipeline.prepare_latents`` and
its denoising loop build it at inference -- so a LoRA trained here meets the
same inputs in ComfyUI or diffusers.

``channels`` (I2V-A14B): the condition video is the start frame followed by
zeros (``num_frames - 1`` of them; with a last frame, ``num_frames - 2`` and
the last frame), VAE-encoded (distribution mode) and normalised; the mask is
1 on the given frames, 0 elsewhere, at the VAE's temporal packing (the first
frame repeated 4x, 4 mask channels per latent frame). The transformer input
is ``[noisy (16), mask (4), condition (16)]`` = 36 channels; every latent
frame is denoised and counted in the loss.

``tokens`` (TI2V-5B, ``expand_timesteps``): the start image alone is
VAE-encoded into the first latent frame, which replaces the noisy first frame
(clean) and gets timestep 0 in the per-token timesteps; the loss leaves that
frame out (its prediction is never used at inference). A sample without a
start frame (text-to-video) has the mask all ones: per-token timesteps all t.
"""

from __future__ import annotations

import attrs
import torch

from . import Arch


@attrs.frozen
class Condition:
    """What one batch's start frames add to the transformer's input."""

    #: I2V-A14B: ``[B, 4 + C, F', H', W']`` mask + condition latents, joined to the noisy latents
    channels: torch.Tensor | None = None
    #: TI2V: ``[B, C, 1, H', W']`` clean first latent frame
    first: torch.Tensor | None = None
    #: TI2V: ``[B, 1, F', H', W']``, 0 where the latent is the clean condition, 1 where it is denoised
    mask: torch.Tensor | None = None

    def to(self, device, dtype=None) -> "Condition":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return Condition(move(self.channels), move(self.first), move(self.mask))

    def select(self, index: torch.Tensor) -> "Condition":
        """The condition of some samples of the batch (``index`` into dim 0)."""
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        return Condition(pick(self.channels), pick(self.first), pick(self.mask))

    def model_input(self, noisy: torch.Tensor) -> torch.Tensor:
        """The transformer's ``hidden_states`` for these noisy latents."""
        if self.channels is not None:
            return torch.cat([noisy, self.channels.to(noisy.dtype)], dim=1)
        if self.first is not None:
            mask = self.mask.to(noisy.dtype)
            return (1 - mask) * self.first.to(noisy.dtype) + mask * noisy
        return noisy

    def timesteps(self, t: torch.Tensor, patch: tuple[int, int, int] = (1, 2, 2)) -> torch.Tensor:
        """``[B]`` timesteps, or ``[B, tokens]`` per-token ones (TI2V: 0 on the condition frame)."""
        if self.mask is None:
            return t
        pt, ph, pw = patch
        tokens = self.mask[:, 0, ::pt, ::ph, ::pw].flatten(1)
        return tokens.to(t.dtype) * t.view(-1, 1)

    def loss_weight(self) -> torch.Tensor | None:
        """Elementwise loss weight (TI2V: the condition frame left out), None = every element."""
        return self.mask


def draw_start_frames(arch: Arch, model_config, batch_size: int, generator: torch.Generator) -> torch.Tensor | None:
    """Which samples of a micro-batch train with a start frame: None = all
    (I2V-A14B; text-to-video archs ignore it); TI2V-5B draws each sample
    with ``[model] i2v_probability`` (default 0.5) from the training RNG."""
    if arch.start_frame != "tokens":
        return None
    p = arch.default_i2v_probability if model_config.i2v_probability is None else model_config.i2v_probability
    if p >= 1.0:
        return None
    return torch.rand(batch_size, generator=generator) < p


def condition_video(arch: Arch, first: torch.Tensor, last: torch.Tensor | None, num_frames: int) -> torch.Tensor:
    """The pixels the VAE encodes into condition latents, ``[B, 3, F, H, W]``
    from start (and last) frames ``[B, 3, H, W]`` in [-1, 1]: I2V-A14B the
    start frame, zeros, (the last frame) -- ``num_frames`` in all; TI2V the
    start frame alone."""
    if arch.start_frame == "tokens":
        return first[:, :, None]
    batch, _, height, width = first.shape
    parts = [first[:, :, None], first.new_zeros(batch, 3, num_frames - (2 if last is not None else 1), height, width)]
    if last is not None:
        parts.append(last[:, :, None])
    return torch.cat(parts, dim=2)


def assemble(arch: Arch, latents: torch.Tensor, num_frames: int, with_last: bool = False,
             use: torch.Tensor | None = None) -> Condition:
    """The condition from condition latents (``latents``: the VAE encoding of
    :func:`condition_video`, normalised) for clips of ``num_frames`` pixel
    frames; ``use`` ``[B]`` bool: which samples get a start frame (TI2V; None
    = all; a one-latent-frame sample -- a still -- never does: nothing would be left to denoise)."""
    batch, _, _, lh, lw = latents.shape
    if arch.start_frame == "channels":
        mask = torch.ones(batch, 1, num_frames, lh, lw)
        mask[:, :, 1:num_frames - (1 if with_last else 0)] = 0
        mask = torch.cat([mask[:, :, :1].repeat_interleave(arch.vae_temporal, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(batch, -1, arch.vae_temporal, lh, lw).transpose(1, 2)
        return Condition(channels=torch.cat([mask.to(latents), latents], dim=1))
    if arch.start_frame == "tokens":
        frames = (num_frames - 1) // arch.vae_temporal + 1
        mask = torch.ones(batch, 1, frames, lh, lw)
        if frames > 1:
            mask[torch.ones(batch, dtype=torch.bool) if use is None else use.cpu(), :, 0] = 0
        return Condition(first=latents, mask=mask.to(latents))
    return Condition()
