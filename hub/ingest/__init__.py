"""Ingest: telemetry lines from the sessions to the database, acked once durable.

`_lineproto` builds InfluxDB line protocol, `_reader` reads telemetry frames straight into it (msgspec, then the
line loop in C, `_fastlines.c`, where it was compiled), `_pipeline` batches lines and writes them to a sink (`_sinks`:
InfluxDB v1 and v2 APIs, the embedded file sink), `_spool` keeps batches on disk while the database is away.
"""

from hub.ingest._lineproto import LineBuilder, line, series_prefix
from hub.ingest._pipeline import Mark, OnDurable, Pipeline, PipelineConfig
from hub.ingest._reader import Batch, TelemetryReader
from hub.ingest._reader import available as reader_available
from hub.ingest._reader import compiled as lines_compiled
from hub.ingest._reader import message_type as telemetry_type
from hub.ingest._sinks import (
    FileSink,
    InfluxV1Sink,
    InfluxV2Sink,
    Sink,
    SinkError,
    SinkRejected,
    SinkTooLarge,
    SinkUnavailable,
)
from hub.ingest._spool import Spool, SpoolError, SpoolFull

__all__ = [
    "Batch",
    "FileSink",
    "InfluxV1Sink",
    "InfluxV2Sink",
    "LineBuilder",
    "Mark",
    "OnDurable",
    "Pipeline",
    "PipelineConfig",
    "Sink",
    "SinkError",
    "SinkRejected",
    "SinkTooLarge",
    "SinkUnavailable",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "TelemetryReader",
    "line",
    "lines_compiled",
    "reader_available",
    "series_prefix",
    "telemetry_type",
]
