"""wantrain: a LoRA trainer for Wan 2.2 T2V A14B (high-noise + low-noise experts).

The kernel runs the loop and emits events; plugins (pluggy) implement the
features. Plugin authors import ``hookimpl`` from here::

    from wantrain import hookimpl

    class Plugin:
        @hookimpl
        def on_step(self, run, step, metrics): ...
"""

import pluggy

__version__ = "0.1.0"

PROJECT = "wantrain"
hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

__all__ = ["hookimpl", "hookspec", "PROJECT", "__version__"]
