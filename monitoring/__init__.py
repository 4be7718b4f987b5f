"""Conveyor monitoring: drift, live quality and serving figures per model version.

``drift`` and ``quality`` are pure functions, ``core.MonitoringCore`` the transport-free
accumulator and ``core.DecisionRules`` the rules that turn its findings into events,
``service.MonitoringService`` the thin service (``conveyor run monitoring``),
``outcomes`` the API applications report observed outcomes with.
"""
