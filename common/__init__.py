"""Conveyor's ground floor: events, message bus, stores, settings, errors, logging, metrics
and the service runtime. It imports no stage."""
