"""The telemetry hub: devices stream telemetry over WebSocket, the hub writes it to InfluxDB and acks what is durable.

Its parts are sub-packages, each re-exporting its public names from private `_x.py` modules: `edge` (the one
listener), `devices` (/v1/device), `control` (/v1/control), `ingest` (pipeline, sinks, spool), `fleet` (registry,
presence, commands), `ops` (metrics, /healthz) and `operator` (the control client, hubctl). `app.serve` starts them
in one nursery tree; `cli` is the `hub` command.
"""
