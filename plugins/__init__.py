"""Built-in wantrain plugins: one module per plugin, each with a ``Config``
(frozen attrs, optional) and a ``Plugin`` class taking that config.

Nothing here is imported by the kernel: a plugin runs only when a profile
lists it under ``[plugins] enabled``.
"""
