"""The application layer: the ``conveyor`` command line, the demo and the local launcher.

It stands on top of the stages and wires them; neither ``common/`` nor any stage imports
it. It reads the assembled pipeline config (``app.config``) once and hands it to each
stage's ``build(settings, config)`` (``app.services``).
"""
