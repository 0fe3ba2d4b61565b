"""How an offloaded expert's tensors move: host copies of frozen weights
(quantized ones included), whole-expert parking (:class:`ExpertHome`) and
per-block streaming with prefetch (:class:`BlockStreamer`)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

HOST, DEVICE = "host", "device"


# ---------------------------------------------------------------- tensors


def _is_wrapper(t: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t)


def _map_inner(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` to the plain tensors inside a (nested) wrapper subclass
    such as quanto's quantized weights, keeping the class and its metadata."""
    if not _is_wrapper(t):
        return fn(t)
    names, ctx = t.__tensor_flatten__()
    inner = {n: _map_inner(getattr(t, n), fn) for n in names}
    return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())


def to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy of a frozen tensor. Quantized weights are first converted
    back to quanto's portable layout (device-specific packings such as
    tinygemm or marlin are rebuilt on the device by ``.to``); with ``pin``
    their inner tensors go to page-locked memory, so copies in are async."""
    t = t.detach()
    for convert in ("weight_qbits_tensor", "weight_qbytes_tensor"):
        fn = getattr(type(t), convert, None)
        if fn is not None:
            try:
                t = fn(t)
            except NotImplementedError:  # already the portable class
                pass
            break
    pin = pin and torch.cuda.is_available()
    return _map_inner(t, lambda x: x.to("cpu").pin_memory() if pin else x.to("cpu"))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def frozen_slots(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
    """``(owner, name, "param" | "buffer")`` for every frozen tensor of ``module``."""
    slots = []
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and not p.requires_grad:
                slots.append((sub, name, "param"))
        for name, b in sub._buffers.items():
            if b is not None:
                slots.append((sub, name, "buffer"))
    return slots


def put(owner: torch.nn.Module, name: str, kind: str, tensor: torch.Tensor) -> None:
    if kind == "param":
        owner._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def move_optimizer_state(optimizer, params: Iterable[torch.nn.Parameter], device: torch.device) -> None:
    if optimizer is None:
        return
    for p in params:
        state = optimizer.state.get(p)
        for key, value in (state or {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                state[key] = value.to(device, non_blocking=True)


# ---------------------------------------------------------------- one expert


class ExpertHome:
    """The host copies of one expert's frozen weights and where they are now.

    ``streamed`` blocks keep their frozen weights on the host even when the
    expert is on the device; :class:`BlockStreamer` brings them in per call.
    """

    def __init__(self, name: str, module: torch.nn.Module, pin: bool, real: bool):
        self.name, self.module, self.real, self.pin = name, module, real, pin
        self.streamed: set[int] = set()
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        self.slots = frozen_slots(module)
        self._owner_block: dict[int, int] = {}

    def host(self, owner: torch.nn.Module, slot: str) -> torch.Tensor:
        """The host copy of a frozen tensor, made on first use (frozen
        weights never change, so one copy serves every later park)."""
        key = (id(owner), slot)
        if key not in self._host:
            self._host[key] = to_host(getattr(owner, slot), self.pin)
        return self._host[key]

    def block_of(self, owner: torch.nn.Module) -> int | None:
        return self._owner_block.get(id(owner))

    def index_blocks(self) -> None:
        self._owner_block = {}
        for i, block in enumerate(getattr(self.module, "blocks", [])):
            for sub in block.modules():
                self._owner_block[id(sub)] = i

    def park(self, device_of_lora: torch.device, optimizer) -> None:
        """Frozen tensors -> their host copies; LoRA and its optimizer state -> host."""
        if not self.real:
            return
        for owner, slot, kind in self.slots:
            put(owner, slot, kind, self.host(owner, slot))
        params = trainable(self.module)
        for p in params:
            p.data = p.data.to(device_of_lora)
        move_optimizer_state(optimizer, params, device_of_lora)

    def bring(self, device: torch.device, optimizer) -> None:
        """Everything to ``device`` except the frozen weights of streamed blocks."""
        if not self.real:
            return
        for owner, slot, kind in self.slots:
            if self.block_of(owner) in self.streamed:
                continue
            put(owner, slot, kind, to_device(self.host(owner, slot), device))
        params = trainable(self.module)
        for p in params:
            p.data = p.data.to(device, non_blocking=True)
        move_optimizer_state(optimizer, params, device)

    def block_slots(self, i: int) -> list[tuple[torch.nn.Module, str, str]]:
        return [s for s in self.slots if self.block_of(s[0]) == i]


class BlockStreamer:
    """Forward pre/post hooks on the streamed blocks of one expert: weights
    copied in before the block runs, dropped after; the next streamed block
    in the direction of travel prefetched on a side stream."""

    def __init__(self, home: ExpertHome, device: torch.device, placement: dict, prefetch: bool):
        self.home, self.device, self.placement = home, device, placement
        self.order = sorted(home.streamed)
        self.stream = torch.cuda.Stream(device) if home.real and device.type == "cuda" else None
        self.prefetch = prefetch and self.stream is not None
        self.pending: dict[int, tuple[list, Any]] = {}
        self.last: int | None = None
        self.copies_in = 0
        self.handles = []
        for i in self.order:
            block = home.module.blocks[i]
            self.handles.append(block.register_forward_pre_hook(self._pre(i)))
            self.handles.append(block.register_forward_hook(self._post(i)))

    def key(self, i: int) -> str:
        return f"{self.home.name}.blocks.{i}"

    def _copy(self, i: int) -> tuple[list, Any]:
        slots = self.home.block_slots(i)
        if self.stream is None:
            return [(s, to_device(self.home.host(s[0], s[1]), self.device)) for s in slots], None
        # the side stream waits for the work queued so far, so memory freed
        # by earlier blocks is not reused while the main stream still reads it
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            tensors = [(s, to_device(self.home.host(s[0], s[1]), self.device)) for s in slots]
            event = torch.cuda.Event()
            event.record(self.stream)
        return tensors, event

    def _neighbour(self, i: int) -> int | None:
        forward = self.last is None or i > self.last
        pos = self.order.index(i) + (1 if forward else -1)
        return self.order[pos] if 0 <= pos < len(self.order) else None

    def _pre(self, i: int):
        def hook(module, args):
            # blocks run one at a time: whatever else is still in is done
            # (in backward, checkpointing may stop a recompute before the
            # block's post hook, so this is where those go out)
            self.send_out(keep=i)
            if self.home.real:
                tensors, event = self.pending.pop(i, None) or self._copy(i)
                if event is not None:
                    torch.cuda.current_stream(self.device).wait_event(event)
                for (owner, slot, kind), t in tensors:
                    put(owner, slot, kind, t)
            self.copies_in += 1
            self.placement[self.key(i)] = DEVICE
            nxt = self._neighbour(i)
            if self.prefetch and nxt is not None and nxt not in self.pending:
                self.pending[nxt] = self._copy(nxt)
            self.last = i
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            self._out(i)
        return hook

    def _out(self, i: int) -> None:
        if self.home.real:
            for owner, slot, kind in self.home.block_slots(i):
                put(owner, slot, kind, self.home.host(owner, slot))
        self.placement[self.key(i)] = HOST

    def send_out(self, keep: int | None = None) -> None:
        for j in self.order:
            if j != keep and self.placement.get(self.key(j)) == DEVICE:
                self._out(j)

    def reset(self) -> None:
        """Every streamed block out, prefetched copies dropped (after
        backward, at a switch, when parked)."""
        self.send_out()
        self.pending.clear()
        self.last = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending.clear()


