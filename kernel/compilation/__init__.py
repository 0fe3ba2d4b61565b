"""``[training] compile = true``: regional compilation -- each transformer
block's forward compiled with ``torch.compile`` (``nn.Module.compile``), not
the whole model.

Why per block: the 40 blocks of an expert are the same code on different
weights, and PyTorch (>= 2.5, ``inline_inbuilt_nn_modules``) treats a module's
parameters as graph inputs, so one compiled graph serves every block of both
experts: compile time is one block's, not forty's, and switching experts
recompiles nothing. LoRA layers (peft, with the bf16 adapter compute of
:mod:`wantrain.adapters.compute`) and quantized layers are traced inside the
block. The modules outside the blocks (embeddings, output projection) stay
eager: they run once per step. Off by default: on the CPU compilation costs
more than it saves on the demo's tiny model.

:func:`graph_count` reads dynamo's counter of compiled graphs, so a test can
check that it stays at its first value over steps and an expert switch.
"""

from __future__ import annotations

import torch


#: graphs one block may hold (one per bucket shape): dynamo's default (8) is below a multi-resolution run's
RECOMPILE_LIMIT = 64


def compile_blocks(module: torch.nn.Module, enabled: bool, backend: str = "inductor") -> int:
    """Compile each of ``module.blocks`` in place when ``enabled``; returns how many."""
    blocks = getattr(module, "blocks", None)
    if not enabled or blocks is None:
        return 0
    # one graph per token shape (each bucket's frames x height x width, the no-grad passes too): past dynamo's
    # default of 8 a block would quietly run eager again
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def graph_count() -> int:
    """Graphs dynamo has compiled in this process (each recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
