"""Conveyor's kernel: events, message bus, stores, settings, service runtime and CLI."""
