"""The telemetry hub: device WebSocket endpoint, ingest pipeline, sinks, registry."""
