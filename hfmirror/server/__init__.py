"""A Hub-compatible mirror server: serve model folders (or a Hugging Face cache) over the Hub's HTTP API.

* :mod:`.repos` finds repositories on disk and lists their files, with the Hub's checksums.
* :mod:`.checksums` remembers those checksums on disk, so a restart does not re-hash gigabytes.
* :mod:`.app` is the Starlette application, :func:`~.app.run_server` and a test helper thread.
* :mod:`.faults` wraps the application to inject network faults, for tests and benchmarks.

Needs the ``serve`` extra (starlette, uvicorn).
"""
