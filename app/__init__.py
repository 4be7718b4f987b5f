"""The application layer: the ``conveyor`` command line, the demo and the local launcher.

It stands on top of the stages and wires them; nothing below it (``common/`` or a stage)
imports it.
"""
