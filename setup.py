"""The compiled parts (the rest is pyproject.toml): the telemetry reader's line loop, WebSocket unmasking.

hub/ingest/_fastlines.c builds line protocol from decoded points, hub/edge/_unmask.c unmasks frame payloads. Both are
optional: where they cannot be compiled (no C compiler or Python headers, as on a device that installs only
device_client), the install goes on without them and the hub does the same in Python (docs/benchmarks.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("hub.ingest._fastlines", ["hub/ingest/_fastlines.c"], optional=True),
        Extension("hub.edge._unmask", ["hub/edge/_unmask.c"], optional=True),
    ]
)
