"""The application layer: the ``conveyor`` command line, the demo and the local launcher.

It stands on top of the stages and wires them; ``common/`` never imports it. One exception
runs the other way: the stages' service shells read the assembled pipeline config
(``app.config``) in their ``build(settings)``; moving those factories here, beside the
catalogue in ``app.services``, would remove it.
"""
