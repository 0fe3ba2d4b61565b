"""The ``wantrain`` command line and the tools behind its commands.

``cli`` parses and dispatches; ``estimate`` predicts memory from a config;
``export`` converts and describes LoRA files; ``tiny`` writes the tiny
random model the tests and the demo use. Plugins add commands of their own
through the ``add_commands`` event (``wantrain sample`` is the ``sample``
plugin's).
"""
