"""A Hub-compatible server: over model folders or a Hugging Face cache, or a cache that fills itself.

* :mod:`.hubapi` parses the Hub's URLs and renders its JSON and errors (shared by both servers).
* :mod:`.app` serves folders on disk (``hfmirror serve ROOT``); :mod:`.repos` finds their repos and
  describes their files with the Hub's checksums, :mod:`.scan` keeps folder listings up to date,
  :mod:`.checksums` remembers checksums on disk.
* :mod:`.mirror` is the team mirror (``hfmirror serve ROOT --upstream URL``), built from
  :mod:`.upstream` (the downloader, pointed at the upstream), :mod:`.revisions` (pinned branches,
  kept listings), :mod:`.fills` (one transfer per file), :mod:`.streaming` (cold files streamed
  safely), :mod:`.access` (gated content), :mod:`.repo_filter` (``--allow``/``--deny``),
  :mod:`.eviction` (``--max-size``) and :mod:`.metrics` (``/metrics``).
* :mod:`.runner` runs either with uvicorn behind :mod:`.guard` (stalled connections) and :mod:`.logs`
  (a bounded request log; :mod:`.tally` counts what each answer sent); :mod:`.faults` wraps any of
  them to inject network faults, for tests.

Needs the ``serve`` extra (starlette, uvicorn).
"""
