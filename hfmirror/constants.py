"""Tunable numbers of the downloader, in one module so that tests and benchmarks can patch them."""

from __future__ import annotations

import os
from pathlib import Path

# The Hub itself: where a token found on this machine (HF_TOKEN, `hf auth login`) is meant to go.
HUB_ENDPOINT = "https://huggingface.co"
# Mirrors first: our users often cannot reach huggingface.co, or reach it slowly.
DEFAULT_ENDPOINTS: tuple[str, ...] = ("https://hf-mirror.com", HUB_ENDPOINT)

USER_AGENT = "hfmirror/0.1.0"

# Files at least this large are cut into pieces fetched over several connections, in file order.
MULTI_CONNECTION_THRESHOLD = 16 * 1024 * 1024
# Pieces per connection, when several connections share a file: more means the hashed prefix trails
# less, fewer means fewer requests (each costs a round trip, and a capped server's pacing restarts).
PIECES_PER_CONNECTION = 4
# Piece sizes stay within [MIN_SEGMENT, MAX_PIECE]; each piece is one ranged request.
MAX_PIECE = 64 * 1024 * 1024
# Pieces are at least this large.
MIN_SEGMENT = 4 * 1024 * 1024
# A running segment is split in two (the "slow tail" re-split) only if both halves keep at least this:
# small enough that no connection idles for long at the end, large enough to be worth a request.
MIN_SPLIT = 1024 * 1024
# ... and only if, at the speed its connection has shown, the segment still needs this many seconds.
SPLIT_IF_SECONDS_LEFT = 0.5
# A large file starts on one connection; the others open as soon as that one proves slower than
# FAST_CONNECTION bytes/s, over its first RAMP_PROBE_SECONDS and then over every RAMP_WINDOW_SECONDS
# (mirrors and CDNs that cap each connection, distant servers). A connection faster than that is not
# capped, and more would only compete with it for the CPU (hashing, writing) and load the server for
# nothing. RAMP_PROBE_SECONDS = 0 opens every connection at once. A first connection that proved
# clearly slow (below a quarter of FAST_CONNECTION) opens the others at once; one in between is judged
# again at RAMP_PROBE_SECONDS_MAX, on all it brought since its request: a fast link's first
# milliseconds (the request, TCP's slow start, threads starting on a busy CPU) say little of its speed.
FAST_CONNECTION = 256 * 1024 * 1024
RAMP_PROBE_SECONDS = 0.03
RAMP_PROBE_SECONDS_MAX = 0.12
RAMP_WINDOW_SECONDS = 1.0
# How much one read from the socket asks for (also the most a connection holds unwritten in memory,
# lost if the process is killed). A connection judged fast enough alone reads FAST_READ_BLOCK at a time:
# large reads cost less CPU per byte, and there CPU is what the download waits for. Several slow
# connections read READ_BLOCK: there the network is the limit, and each connection's unwritten block is
# lost to a kill, so smaller blocks keep what a resume fetches again small. While the first connection
# is on probation, reads are PROBE_READ_BLOCK, so that even a slow link has been heard from by the end
# of RAMP_PROBE_SECONDS. The measurements behind these sizes: bench/RESULTS.md, Analysis.
READ_BLOCK = 256 * 1024
FAST_READ_BLOCK = 1024 * 1024
PROBE_READ_BLOCK = 64 * 1024

# The hash's thread hashes at most this much at a time before it looks whether the transfer stopped.
HASH_STEP = 8 * 1024 * 1024
# A large file's connection writing at the front of the hashed prefix hands its blocks to the hash in
# memory (hashing.HandedBlocks): at most this many blocks (of up to FAST_READ_BLOCK) at once, enough
# that the hash's short pauses (its thread waiting for a core) do not hold the connection back.
HANDED_BLOCKS = 8
# Hashed bytes are dropped from the page cache this far behind the hash (by then they are on disk).
DROP_PAGES_LAG = 32 * 1024 * 1024
# ... asked for PAGES_BATCH bytes at a time.
PAGES_BATCH = 8 * 1024 * 1024

# Partial-download state is saved every CHECKPOINT_BYTES of new data or CHECKPOINT_INTERVAL seconds,
# whichever comes first, but at most once per CHECKPOINT_MIN_GAP seconds: the most a kill -9 can lose
# is what arrived since the last save (plus what was in flight), 4 MiB on a slow link, 20 ms worth on
# a fast one (where a save per 4 MiB would come every 4 ms, taking CPU the hash needs, to save what
# takes 20 ms to fetch again). A save costs a small JSON write: the page cache keeps written data
# through a kill. Every SYNC_INTERVAL seconds a save first flushes the data to disk (fdatasync),
# which bounds what a power cut can lose.
CHECKPOINT_INTERVAL = 0.5
CHECKPOINT_BYTES = 4 * 1024 * 1024
CHECKPOINT_MIN_GAP = 0.02
SYNC_INTERVAL = 5.0

# Connections (requests in flight) to one endpoint at once, shared by every file of a run: enough to
# fill a fast link behind a per-connection cap (16 x 4 MB/s), few enough not to look like an attack.
CONNECTION_BUDGET = 16

CONNECT_TIMEOUT = 10.0
# No byte for this long on an open connection means it has stalled: drop it and resume.
DEFAULT_STALL_TIMEOUT = 30.0

# Retries of one request that makes no progress (a request that delivers bytes resets the count).
MAX_RETRIES = 8
# A file whose checksum or size does not match is fetched again this many times before giving up.
MAX_VERIFY_ATTEMPTS = 3
# Consecutive connection-level failures on an endpoint before we fail over to the next one.
FAILOVER_AFTER = 3
# Rate-limit pauses (429/503, each waited out) in a row, with no success between them, before an
# endpoint counts as one that keeps refusing and the run moves to the next. One 429 is a rate limit to
# obey; an endpoint that answers 429 again after every pause it asked for is not going to serve us.
RATE_LIMITED_FAILOVER_AFTER = 3
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
# Longest Retry-After (or RateLimit reset) we wait out. The Hub counts requests per 5-minute window,
# so a rate limit it (or a mirror copying it) sets never asks for more than 300 s: everything the Hub
# itself would ask for is obeyed. A server asking for more is not pacing us but shutting us out (a
# daily quota, a ban): the run fails over at once, or fails saying so, instead of sitting silent.
MAX_RETRY_AFTER = 300.0
# Waits at least this long are announced on stderr (by the CLI; never with -q or --json), and so is a
# listing request still unanswered after SILENCE_NOTICE_SECONDS.
NOTICE_WAIT_SECONDS = 3.0
SILENCE_NOTICE_SECONDS = 10.0

# The listing: seconds to wait for its answer to begin, and for the whole of it to arrive (a server
# trickling a byte at a time is cut off), and the most of it we read. The largest Hub repos list about
# 100,000 files, ~22 MB with checksums; 64 MiB leaves room and bounds what a hostile server can make
# us hold.
LISTING_TIMEOUT = 30.0
LISTING_DEADLINE = 120.0
LISTING_MAX_BYTES = 64 * 1024 * 1024
# Error answers (4xx/5xx) are read, when they are small and quick, only so that their connection can
# be reused; a larger or slower one is cut off and its connection closed.
ERROR_BODY_MAX = 64 * 1024
ERROR_BODY_DEADLINE = 5.0
# Disk space kept free beyond what the download needs.
FREE_SPACE_MARGIN = 64 * 1024 * 1024

PARTIAL_SUFFIX = ".hfmirror.incomplete"
STATE_SUFFIX = ".hfmirror.json"


def default_cache_dir() -> Path:
    """The Hugging Face cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def default_endpoints() -> list[str]:
    """HF_ENDPOINT if set (a single endpoint, as huggingface_hub reads it), else the mirror-first list."""
    env = chosen_endpoint()
    return [env] if env else list(DEFAULT_ENDPOINTS)


def chosen_endpoint() -> str:
    """The endpoint the user chose with HF_ENDPOINT ("" if none)."""
    return os.environ.get("HF_ENDPOINT", "").strip()
