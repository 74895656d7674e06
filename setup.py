"""The one compiled part: hub/ingest/_fastlines.c, the telemetry reader's line loop in C (the rest: pyproject.toml).

Optional: where it cannot be compiled (no C compiler or Python headers, as on a device that installs only
device_client), the install goes on without it and the hub builds its lines in Python (docs/benchmarks.md).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("hub.ingest._fastlines", ["hub/ingest/_fastlines.c"], optional=True)])
