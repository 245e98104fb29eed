"""onejump's shortcut library: low-rank jumps from any block to the final hidden state.

Nothing heavy is imported here; import the submodules you need (``shortcuts.adapter``,
``shortcuts.jump``, ...).
"""

__version__ = "0.1.0"
