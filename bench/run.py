#!/usr/bin/env python3
"""The hfmirror benchmark suite: one command, a local server, a results table.

    python bench/run.py                 # everything, 3 runs each, 1 GiB file (~15 min)
    python bench/run.py --quick         # smoke run: 128 MiB file, 1 run, fewer small files
    python bench/run.py --runs 5 --only large --only capped

Scenarios (``--only`` names): ``large`` (unthrottled 1 GiB), ``capped`` (16 MB/s per connection),
``small`` (500 x 100 KB behind a request-rate limit), ``resume`` (kill -9 at ~50%, re-run),
``compare`` (``hfmirror compare`` on a bert-base-sized random model vs the transformers forward
alone), ``startup`` (``--help`` start-up time and heavy imports), ``serve_scale`` (``hfmirror serve``:
one GET's latency at 10 to 20,000 files in the repo; see server_bench.py), ``quota`` (300 small files
behind a fixed window of 100 requests per 2 s, announced in RateLimit headers), ``sharded`` (3 x 40 MiB
shards and small files over a 32 MB/s link capped at 4 MB/s per connection).

Writes bench/results.json (raw numbers; scenarios not re-run keep their previous results) and
bench/RESULTS.md (tables with Goal / Measured / Met?). Big files live in bench/work/ (git-ignored).
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's hfmirror

import benchlib as bl  # noqa: E402
import report  # noqa: E402
import server_bench  # noqa: E402

from hfmirror.resume import ResumeState  # noqa: E402

SCENARIOS = ("large", "capped", "small", "resume", "compare", "startup", "serve_scale", "quota", "sharded")
MB = 1_000_000  # bandwidth caps are in MB/s (10^6), as the issue states them

HF_SCRIPT = r"""
import sys
from huggingface_hub import hf_hub_download, snapshot_download
mode, repo, cache = sys.argv[1:4]
if mode == "file":
    print(hf_hub_download(repo, sys.argv[4], cache_dir=cache))
else:
    print(snapshot_download(repo, cache_dir=cache))
"""

MAKE_BERT_SCRIPT = r"""
import sys, torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
BertModel(BertConfig()).save_pretrained(sys.argv[1])
"""

REFERENCE_SCRIPT = r"""
import sys, torch
from transformers import BertModel
model_dir, batch, seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = BertModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
generator = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator)
with torch.no_grad():
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
print(tuple(out.last_hidden_state.shape))
"""


@dataclass
class Context:
    """Everything a scenario needs: options, the server, the test repos and which tools exist."""

    runs: int
    quick: bool
    server: bl.BenchServer
    large_repo: str
    large_file: str
    large_size: int
    small_repo: str
    small_count: int
    small_size: int
    quota_repo: str
    quota_count: int
    sharded_repo: str
    sharded_shard_size: int
    tools: dict[str, str | None]
    notes: list[str] = field(default_factory=list)

    @property
    def large_url(self) -> str:
        return f"{self.server.url}/{self.large_repo}/resolve/main/{self.large_file}"


# ------------------------------------------------------------------------------------ one download


def _download_argv(ctx: Context, tool: str, dest: Path, *, repo: str, connections: int = 8) -> list[str]:
    """The command line of ``tool`` fetching ``repo`` (the large repo: its one file) into ``dest``."""
    py = sys.executable
    if tool == "hfmirror":
        return [
            py,
            "-m",
            "hfmirror",
            "download",
            repo,
            "--endpoint",
            ctx.server.url,
            "--cache-dir",
            str(dest / "cache"),
            "--connections",
            str(connections),
            "--max-workers",
            "8",
            "-q",
        ]
    if tool == "huggingface_hub":
        if repo == ctx.large_repo:
            return [py, "-c", HF_SCRIPT, "file", repo, str(dest / "cache"), ctx.large_file]
        return [py, "-c", HF_SCRIPT, "snapshot", repo, str(dest / "cache")]
    if tool == "aria2c":
        # --file-allocation=none: the default (prealloc) would first write 1 GiB of zeros.
        return [
            ctx.tools["aria2c"] or "aria2c",
            f"-x{connections}",
            f"-s{connections}",
            "-k1M",
            "--file-allocation=none",
            "--quiet=true",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "-d",
            str(dest),
            "-o",
            ctx.large_file,
            ctx.large_url,
        ]
    if tool == "curl":
        return [ctx.tools["curl"] or "curl", "-sS", "-f", "-o", str(dest / ctx.large_file), ctx.large_url]
    if tool == "curl+sha256sum":
        # What a user must run to get what hfmirror gives: the file, and proof it is the right one.
        curl, target = shlex.quote(ctx.tools["curl"] or "curl"), shlex.quote(str(dest / ctx.large_file))
        url = shlex.quote(ctx.large_url)
        return ["sh", "-c", f"{curl} -sS -f -o {target} {url} && sha256sum {target} > /dev/null"]
    raise ValueError(tool)


def _downloaded_size(tool: str, result: bl.ProcResult, dest: Path, name: str) -> int:
    """Size of the file the tool says it wrote (0 if missing)."""
    if tool == "hfmirror":
        path = Path(result.stdout.strip().splitlines()[-1]) / name if result.stdout.strip() else None
    elif tool == "huggingface_hub":
        path = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    else:
        path = dest / name
    return path.stat().st_size if path is not None and path.exists() else 0


def time_download(ctx: Context, tool: str, *, connections: int = 8) -> dict[str, Any]:
    """One timed download of the large file with a fresh cache; returns its measurements."""
    dest = bl.fresh_dir(bl.WORK_DIR / "runs" / tool)
    env = bl.clean_env(HF_ENDPOINT=ctx.server.url, HF_HOME=str(dest / "hf_home"))
    before = ctx.server.stats()["bytes"]
    result = bl.run(
        _download_argv(ctx, tool, dest, repo=ctx.large_repo, connections=connections),
        env=env,
        server=ctx.server,
    )
    size = _downloaded_size(tool, result, dest, ctx.large_file)
    sent = ctx.server.stats()["bytes"] - before
    bl.shutil.rmtree(dest, ignore_errors=True)
    ok = result.ok and size == ctx.large_size
    return {
        "ok": ok,
        "seconds": result.wall,
        "mib_per_s": ctx.large_size / bl.MIB / result.wall,
        "client_cpu": result.cpu,
        "server_cpu": result.server_cpu,
        "bytes_sent": sent,
        "error": None if ok else (result.stderr.strip()[-400:] or f"exit {result.returncode}, size {size}"),
    }


# ------------------------------------------------------------------------------------ scenarios 1, 2


def _compare_tools(ctx: Context, tools: list[str], *, rate: float | None) -> dict[str, list[dict]]:
    """Every tool ``ctx.runs`` times, interleaved (so drift hits all alike), under the given cap."""
    ctx.server.plan(rate=rate)
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    for i in range(ctx.runs):
        for tool in tools:
            ctx.server.plan(rate=rate)
            measured = time_download(ctx, tool)
            runs[tool].append(measured)
            state = "ok" if measured["ok"] else f"FAILED: {measured['error']}"
            print(
                f"  run {i + 1}/{ctx.runs} {tool:<16} {measured['seconds']:7.2f}s "
                f"{measured['mib_per_s']:8.1f} MiB/s  {state}",
                flush=True,
            )
    ctx.server.plan()
    return runs


def _available(ctx: Context, tools: list[str], notes: list[str]) -> list[str]:
    """The tools that are installed; a note for each skipped one."""
    kept = []
    for tool in tools:
        needed = "curl" if tool == "curl+sha256sum" else tool
        if needed in ("aria2c", "curl") and not ctx.tools.get(needed):
            notes.append(
                f"{tool} is not installed: its column is skipped (Debian package "
                f"{'aria2' if tool == 'aria2c' else 'curl'}; or run as root with --install-tools)."
            )
            continue
        kept.append(tool)
    return kept


def _summarise_downloads(runs: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Medians per tool over the successful runs, and each tool's time relative to hfmirror's."""
    summary = {}
    for tool, items in runs.items():
        good = [r for r in items if r["ok"]]
        summary[tool] = {
            "runs": len(items),
            "ok_runs": len(good),
            "seconds": bl.median([r["seconds"] for r in good]),
            "best_seconds": min((r["seconds"] for r in good), default=None),
            "mib_per_s": bl.median([r["mib_per_s"] for r in good]),
            "client_cpu": bl.median([r["client_cpu"] for r in good]),
            "server_cpu": bl.median([r["server_cpu"] for r in good if r["server_cpu"] is not None]),
            "errors": [r["error"] for r in items if not r["ok"]],
        }
    base = summary.get("hfmirror", {}).get("seconds")
    for entry in summary.values():
        # hfmirror's speed as a multiple of this tool's speed (= this tool's time / hfmirror's time).
        entry["hfmirror_speedup"] = entry["seconds"] / base if base and entry["seconds"] else None
    return summary


def _ratio_goal(summary: dict, tool: str, at_least: float, text: str) -> dict[str, Any]:
    """A goal row 'hfmirror speed >= at_least x tool speed'.

    Met only if it holds both for the medians and for each tool's best run: on a noisy machine one
    slow run of the other tool can move a median of three, and a goal should not be met by luck.
    """
    ratio = summary.get(tool, {}).get("hfmirror_speedup")
    ours, theirs = summary.get("hfmirror", {}).get("best_seconds"), summary.get(tool, {}).get("best_seconds")
    best = theirs / ours if ours and theirs else None
    if ratio is None:
        return {"goal": text, "measured": "not measured", "met": None}
    # Three decimals where two would round a miss up to the goal (0.998x shown as 1.00x).
    digits = 3 if any(v is not None and round(v, 2) >= at_least > v for v in (ratio, best)) else 2
    measured = f"{bl.fmt(ratio, digits)}x median"
    measured += f", {bl.fmt(best, digits)}x best run vs best run" if best else ""
    met = ratio >= at_least and (best is None or best >= at_least)
    return {"goal": text, "measured": measured, "met": met}


def scenario_large(ctx: Context) -> dict[str, Any]:
    """1. The large file on unthrottled loopback."""
    notes: list[str] = []
    tools = _available(ctx, ["hfmirror", "huggingface_hub", "aria2c", "curl", "curl+sha256sum"], notes)
    summary = _summarise_downloads(_compare_tools(ctx, tools, rate=None))
    notes.append(
        "hfmirror hashes every byte (sha256) before a file gets its final name; curl does not. "
        "curl+sha256sum is the same check done by hand, for a like-for-like comparison."
    )
    goals = [
        _ratio_goal(summary, "curl", 0.8, "hfmirror >= 0.8x curl's speed"),
        _ratio_goal(summary, "curl+sha256sum", 0.8, "(context) hfmirror >= 0.8x curl + sha256sum"),
        _ratio_goal(summary, "huggingface_hub", 1.0, "hfmirror >= 1.0x huggingface_hub's speed"),
    ]
    return {
        "title": f"1. One {ctx.large_size // bl.MIB} MiB file, unthrottled loopback",
        "tools": summary,
        "goals": goals,
        "notes": notes,
    }


def scenario_capped(ctx: Context) -> dict[str, Any]:
    """2. The large file with every connection capped at 16 MB/s."""
    notes: list[str] = []
    tools = _available(ctx, ["hfmirror", "huggingface_hub", "aria2c", "curl"], notes)
    summary = _summarise_downloads(_compare_tools(ctx, tools, rate=16 * MB))
    goals = [
        _ratio_goal(summary, "huggingface_hub", 6.0, "hfmirror (8 connections) >= 6x huggingface_hub"),
        _ratio_goal(summary, "aria2c", 1.0, "hfmirror >= 1.0x aria2c -x8 -s8"),
    ]
    return {
        "title": f"2. One {ctx.large_size // bl.MIB} MiB file, 16 MB/s per connection",
        "tools": summary,
        "goals": goals,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------ scenario 3


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("part_*.bin") if p.is_file())


def scenario_small(ctx: Context, max_rps: float = 50) -> dict[str, Any]:
    """3. Many small files behind a server that answers 429 beyond ``max_rps`` requests per second."""
    runs: dict[str, list[dict]] = {"hfmirror": [], "huggingface_hub": []}
    for i in range(ctx.runs):
        for tool in runs:
            ctx.server.plan(max_rps=max_rps)
            dest = bl.fresh_dir(bl.WORK_DIR / "runs" / tool)
            env = bl.clean_env(HF_ENDPOINT=ctx.server.url, HF_HOME=str(dest / "hf_home"))
            result = bl.run(
                _download_argv(ctx, tool, dest, repo=ctx.small_repo), env=env, server=ctx.server, timeout=900
            )
            stats = ctx.server.stats()
            files = _count_files(dest / "cache")
            ok = result.ok and files == ctx.small_count
            runs[tool].append(
                {
                    "ok": ok,
                    "seconds": result.wall,
                    "files": files,
                    "requests": stats["requests"],
                    "429": bl.status_count(stats, "429"),
                    "server_cpu": result.server_cpu,
                    "client_cpu": result.cpu,
                    "error": None if ok else (result.stderr.strip()[-400:] or f"exit {result.returncode}"),
                }
            )
            bl.shutil.rmtree(dest, ignore_errors=True)
            print(
                f"  run {i + 1}/{ctx.runs} {tool:<16} {result.wall:7.2f}s  files {files}  "
                f"429s {runs[tool][-1]['429']}  requests {stats['requests']}  "
                f"{'ok' if ok else 'FAILED'}",
                flush=True,
            )
    ctx.server.plan()
    summary = {}
    for tool, items in runs.items():
        good = [r for r in items if r["ok"]] or items
        summary[tool] = {
            "runs": len(items),
            "ok_runs": sum(r["ok"] for r in items),
            "seconds": bl.median([r["seconds"] for r in good]),
            "best_seconds": min((r["seconds"] for r in good), default=None),
            "429": bl.median([r["429"] for r in good]),
            "requests": bl.median([r["requests"] for r in good]),
            "client_cpu": bl.median([r["client_cpu"] for r in good]),
            "errors": [r["error"] for r in items if not r["ok"]],
        }
    hfm, hf = summary["hfmirror"], summary["huggingface_hub"]
    goals = [
        {
            "goal": f"hfmirror fetches all {ctx.small_count} files despite the 429s",
            "measured": f"{hfm['ok_runs']}/{hfm['runs']} runs complete",
            "met": hfm["ok_runs"] == hfm["runs"],
        }
    ]
    if hfm["seconds"] and hf["seconds"]:
        goals.append(
            {
                "goal": "(info) time vs huggingface_hub",
                "measured": f"{bl.fmt(hf['seconds'] / hfm['seconds'])}x faster"
                f"{'' if hf['ok_runs'] == hf['runs'] else ' (huggingface_hub failed some runs)'}",
                "met": None,
            }
        )
    return {
        "title": f"3. {ctx.small_count} files of {ctx.small_size // 1000} KB, server limited to "
        f"{max_rps:g} requests/s (429 + Retry-After: 1 beyond)",
        "tools": summary,
        "goals": goals,
        "notes": [],
        "max_rps": max_rps,
    }


# ------------------------------------------------------------------------------------ quota, sharded

QUOTA = (100, 2.0)  # requests per window, window seconds: the Hub's kind of limit, scaled down
QUOTA_FILE_SIZE = 10_000
LINK_RATE = 32 * MB  # the whole link
LINK_PER_CONNECTION = 4 * MB  # what the mirror allows one connection
SHARDED_SMALL_FILES = {"config.json": 700, "tokenizer.json": 2_000_000, "tokenizer_config.json": 1_200}


def _timed_repo_download(
    ctx: Context, tool: str, repo: str, *, count_sockets: bool = False, **plan: Any
) -> tuple[bl.ProcResult, dict[str, Any], int | None, Path]:
    """One download of ``repo`` by ``tool`` with a fresh cache, under the server plan ``plan``.
    Returns the process result, the server's stats, the most sockets open at once (if counted) and
    the destination folder (deleted by the caller)."""
    ctx.server.plan(**plan)
    dest = bl.fresh_dir(bl.WORK_DIR / "runs" / tool)
    env = bl.clean_env(HF_ENDPOINT=ctx.server.url, HF_HOME=str(dest / "hf_home"))
    argv = _download_argv(ctx, tool, dest, repo=repo)
    if count_sockets:
        with bl.SocketSampler(ctx.server.port) as sampler:
            result = bl.run(argv, env=env, server=ctx.server, timeout=900)
        most: int | None = sampler.most
    else:
        result, most = bl.run(argv, env=env, server=ctx.server, timeout=900), None
    return result, ctx.server.stats(), most, dest


def _median_summary(items: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    good = [r for r in items if r["ok"]] or items
    summary: dict[str, Any] = {"runs": len(items), "ok_runs": sum(r["ok"] for r in items)}
    for key in keys:
        summary[key] = bl.median([r[key] for r in good if r[key] is not None])
    summary["worst_seconds"] = max((r["seconds"] for r in good), default=None)
    summary["errors"] = [r["error"] for r in items if not r["ok"]]
    return summary


def scenario_quota(ctx: Context) -> dict[str, Any]:
    """Many small files behind a fixed-window quota that the server announces on every answer."""
    limit, window = QUOTA
    # The least time the quota allows: the first window opens with the first file request, and the
    # last file can go at the start of window ceil(N / limit).
    bound = (-(-ctx.quota_count // limit) - 1) * window
    runs: dict[str, list[dict]] = {"hfmirror": [], "huggingface_hub": []}
    for i in range(ctx.runs):
        for tool in runs:
            result, stats, _, dest = _timed_repo_download(ctx, tool, ctx.quota_repo, quota=QUOTA)
            files = _count_files(dest / "cache")
            ok = result.ok and files == ctx.quota_count
            runs[tool].append(
                {
                    "ok": ok,
                    "seconds": result.wall,
                    "bound_ratio": result.wall / bound if bound else None,
                    "429": bl.status_count(stats, "429"),
                    "requests": stats["requests"],
                    "client_cpu": result.cpu,
                    "error": None if ok else (result.stderr.strip()[-400:] or f"exit {result.returncode}"),
                }
            )
            bl.shutil.rmtree(dest, ignore_errors=True)
            r = runs[tool][-1]
            print(
                f"  run {i + 1}/{ctx.runs} {tool:<16} {r['seconds']:7.2f}s  {r['bound_ratio']:.2f}x bound  "
                f"429s {r['429']}  requests {r['requests']}  {'ok' if ok else 'FAILED'}",
                flush=True,
            )
    ctx.server.plan()
    keys = ("seconds", "bound_ratio", "429", "requests", "client_cpu")
    summary = {tool: _median_summary(items, keys) for tool, items in runs.items()}
    hfm, hf = summary["hfmirror"], summary["huggingface_hub"]
    worst = max((r["bound_ratio"] for r in runs["hfmirror"] if r["ok"]), default=None)
    most_429 = max((r["429"] for r in runs["hfmirror"] if r["ok"]), default=None)
    goals = [
        {
            "goal": f"hfmirror within 1.5x the quota's bound ({bound:g} s for {ctx.quota_count} files)",
            "measured": f"{bl.fmt(hfm['bound_ratio'])}x median, {bl.fmt(worst)}x worst run",
            "met": hfm["ok_runs"] == hfm["runs"] and worst is not None and worst <= 1.5,
        },
        {
            "goal": "hfmirror provokes at most 3 429s",
            "measured": f"{bl.fmt(hfm['429'], 0)} median, {most_429} worst run",
            "met": hfm["ok_runs"] == hfm["runs"] and most_429 is not None and most_429 <= 3,
        },
        {
            "goal": "(info) huggingface_hub: x the bound, 429s",
            "measured": f"{bl.fmt(hf['bound_ratio'])}x, {bl.fmt(hf['429'], 0)} 429s"
            f"{'' if hf['ok_runs'] == hf['runs'] else ' (failed some runs)'}",
            "met": None,
        },
    ]
    return {
        "title": f"{ctx.quota_count} files of {QUOTA_FILE_SIZE // 1000} KB behind a fixed window of {limit} "
        f"file requests per {window:g} s, announced in RateLimit / RateLimit-Policy headers",
        "tools": summary,
        "goals": goals,
        "notes": [
            'The quota counts file requests (resolve URLs), as the Hub\'s "resolvers" quota does; every '
            "answer to one says what is left (RateLimit r, t) and the policy (RateLimit-Policy q, w), and "
            "a 429 beyond it carries Retry-After.",
            "Bound: the first window opens with the first file request; the last file can go no earlier "
            "than the start of window ceil(N / quota), (ceil(N / quota) - 1) x window seconds later.",
        ],
        "bound_seconds": bound,
    }


def scenario_sharded(ctx: Context) -> dict[str, Any]:
    """A sharded repo over a fast link whose mirror caps each connection."""
    names = [path for path in (ctx.server.root / ctx.sharded_repo).iterdir() if path.is_file()]
    total = sum(path.stat().st_size for path in names)
    bound = total / LINK_RATE
    runs: dict[str, list[dict]] = {"hfmirror": [], "huggingface_hub": []}
    for i in range(ctx.runs):
        for tool in runs:
            result, stats, most, dest = _timed_repo_download(
                ctx, tool, ctx.sharded_repo, count_sockets=True, rate=LINK_PER_CONNECTION, link_rate=LINK_RATE
            )
            records = ctx.server.records()
            fetched = sum(1 for p in (dest / "cache").rglob("*") if p.is_file() and "snapshots" in p.parts)
            ok = result.ok and fetched == len(names)
            runs[tool].append(
                {
                    "ok": ok,
                    "seconds": result.wall,
                    "bound_ratio": result.wall / bound,
                    "most_connections": most,
                    "sockets_used": len({r["client"] for r in records}),
                    "requests": stats["requests"],
                    "client_cpu": result.cpu,
                    "error": None if ok else (result.stderr.strip()[-400:] or f"exit {result.returncode}"),
                }
            )
            bl.shutil.rmtree(dest, ignore_errors=True)
            r = runs[tool][-1]
            print(
                f"  run {i + 1}/{ctx.runs} {tool:<16} {r['seconds']:7.2f}s  {r['bound_ratio']:.2f}x bound  "
                f"connections at once {most}  sockets {r['sockets_used']}  {'ok' if ok else 'FAILED'}",
                flush=True,
            )
    ctx.server.plan()
    keys = ("seconds", "bound_ratio", "most_connections", "sockets_used", "requests", "client_cpu")
    summary = {tool: _median_summary(items, keys) for tool, items in runs.items()}
    hfm, hf = summary["hfmirror"], summary["huggingface_hub"]
    worst = max((r["bound_ratio"] for r in runs["hfmirror"] if r["ok"]), default=None)
    most = max((r["most_connections"] or 0 for r in runs["hfmirror"]), default=None)
    shard_mib = ctx.sharded_shard_size // bl.MIB
    goals = [
        {
            "goal": f"hfmirror within 1.15x the link's bound ({bound:.2f} s for {total / MB:.0f} MB)",
            "measured": f"{bl.fmt(hfm['bound_ratio'])}x median, {bl.fmt(worst)}x worst run",
            "met": hfm["ok_runs"] == hfm["runs"] and worst is not None and worst <= 1.15,
        },
        {
            "goal": "hfmirror never has more than 16 connections open at once",
            "measured": f"{most} at most (sampled every 10 ms)",
            "met": most is not None and most <= 16,
        },
        {
            "goal": "(info) huggingface_hub: x the bound, connections at once",
            "measured": f"{bl.fmt(hf['bound_ratio'])}x, {bl.fmt(hf['most_connections'], 0)} connections",
            "met": None,
        },
    ]
    return {
        "title": f"A sharded repo (3 x {shard_mib} MiB + small files) over a {LINK_RATE / MB:g} MB/s link, "
        f"{LINK_PER_CONNECTION / MB:g} MB/s per connection",
        "tools": summary,
        "goals": goals,
        "notes": [
            "The server paces every response to 4 MB/s and all of them together to 32 MB/s (fault plan "
            "`bandwidth` + `link_rate`). Bound: every byte of the repo at the link's rate.",
            "Connections at once: the server's ESTABLISHED sockets (idle keep-alive ones too), sampled "
            "from /proc/net/tcp every 10 ms; sockets used: distinct client ports over the run.",
        ],
        "bound_seconds": bound,
    }


# ------------------------------------------------------------------------------------ scenario 4


def _state_fraction(cache: Path, size: int) -> float | None:
    """Fraction of the file hfmirror's resume state records as done (None if there is no state)."""
    found = glob.glob(str(cache / "**" / "*.hfmirror.incomplete.hfmirror.json"), recursive=True)
    return ResumeState.saved_bytes(Path(found[0])) / size if found else None


def _kill_at(ctx: Context, proc: bl.subprocess.Popen, fraction: float, timeout: float = 300) -> float:
    """SIGKILL ``proc`` once the server has sent ``fraction`` of the file; returns the fraction sent."""
    suffix = f"/{ctx.large_file}"
    deadline = time.monotonic() + timeout
    sent = 0
    while time.monotonic() < deadline and proc.poll() is None:
        sent = bl.bytes_for(ctx.server.stats(), suffix)
        if sent >= fraction * ctx.large_size:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    bl.wait(proc)
    return bl.bytes_for(ctx.server.stats(), suffix) / ctx.large_size


def resume_once(ctx: Context, tool: str, *, target_seconds: float) -> dict[str, Any]:
    """Start ``tool`` capped so the whole file would take ``target_seconds``, kill -9 at ~50%,
    re-run unthrottled, and count the file's bytes the server sent over both runs."""
    connections = 8 if tool == "hfmirror" else 1
    rate = ctx.large_size / target_seconds / connections
    dest = bl.fresh_dir(bl.WORK_DIR / "runs" / f"resume-{tool}")
    env = bl.clean_env(HF_ENDPOINT=ctx.server.url, HF_HOME=str(dest / "hf_home"))
    argv = _download_argv(ctx, tool, dest, repo=ctx.large_repo)
    ctx.server.plan(rate=rate)
    proc = bl.start(argv, env=env)
    killed_at = _kill_at(ctx, proc, 0.5)
    first = bl.bytes_for(ctx.server.stats(), f"/{ctx.large_file}")
    saved = _state_fraction(dest / "cache", ctx.large_size) if tool == "hfmirror" else None
    ctx.server.plan()  # the re-run is not throttled
    result = bl.run(argv, env=env, server=ctx.server)
    second = bl.bytes_for(ctx.server.stats(), f"/{ctx.large_file}")
    size = _downloaded_size(tool, result, dest, ctx.large_file)
    bl.shutil.rmtree(dest, ignore_errors=True)
    ok = result.ok and size == ctx.large_size
    # Where the extra bytes come from: sent but never recorded as saved (in flight, or written after the
    # last checkpoint), versus re-fetched by the second run beyond what the state said was missing.
    lost = first - saved * ctx.large_size if saved is not None else None
    refetch = second - (1 - saved) * ctx.large_size if saved is not None else None
    return {
        "ok": ok,
        "killed_at": killed_at,
        "state_saved": saved,
        "ratio": (first + second) / ctx.large_size,
        "lost_at_kill_mib": None if lost is None else lost / bl.MIB,
        "rerun_beyond_missing_mib": None if refetch is None else refetch / bl.MIB,
        "rate_per_conn": rate,
        "rerun_seconds": result.wall,
        "error": None if ok else (result.stderr.strip()[-400:] or f"exit {result.returncode}"),
    }


def scenario_resume(ctx: Context) -> dict[str, Any]:
    """4. kill -9 at ~50%, re-run: bytes fetched in total / file size."""
    target = 4.0 if ctx.quick else 8.0
    runs: dict[str, list[dict]] = {"hfmirror": [], "huggingface_hub": []}
    for i in range(ctx.runs):
        for tool in runs:
            measured = resume_once(ctx, tool, target_seconds=target)
            runs[tool].append(measured)
            saved = measured["state_saved"]
            print(
                f"  run {i + 1}/{ctx.runs} {tool:<16} killed at {measured['killed_at']:.0%} sent"
                f"{'' if saved is None else f', state json had {saved:.0%}'}; total/size "
                f"{measured['ratio']:.4f}  {'ok' if measured['ok'] else 'FAILED: ' + str(measured['error'])}",
                flush=True,
            )
    summary = {}
    for tool, items in runs.items():
        good = [r for r in items if r["ok"]] or items
        summary[tool] = {
            "runs": len(items),
            "ok_runs": sum(r["ok"] for r in items),
            "killed_at": bl.median([r["killed_at"] for r in good]),
            "state_saved": bl.median([r["state_saved"] for r in good if r["state_saved"] is not None]),
            "ratio": bl.median([r["ratio"] for r in good]),
            "ratio_max": max(r["ratio"] for r in good),
            "rerun_seconds": bl.median([r["rerun_seconds"] for r in good]),
            "lost_at_kill_mib": bl.median(
                [r["lost_at_kill_mib"] for r in good if r["lost_at_kill_mib"] is not None]
            ),
            "rerun_beyond_missing_mib": bl.median(
                [r["rerun_beyond_missing_mib"] for r in good if r["rerun_beyond_missing_mib"] is not None]
            ),
            "errors": [r["error"] for r in items if not r["ok"]],
        }
    hfm = summary["hfmirror"]
    goals = [
        {
            "goal": "hfmirror: bytes fetched in total / file size <= 1.01 (worst run)",
            "measured": f"{bl.fmt(hfm['ratio_max'], 4)} (median {bl.fmt(hfm['ratio'], 4)})",
            "met": hfm["ok_runs"] == hfm["runs"] and hfm["ratio_max"] <= 1.01,
        }
    ]
    return {
        "title": "4. Resume after kill -9 at ~50% of the large file",
        "tools": summary,
        "goals": goals,
        "notes": [
            f"First run capped so the whole file would take ~{target:.0f} s (hfmirror: 8 connections, "
            "huggingface_hub: 1), killed with SIGKILL once the server had sent half the file; "
            "the re-run is unthrottled. 'total/size' counts body bytes the server sent in both runs. "
            "'sent but not saved' = bytes the server sent in the first run minus what the resume state "
            "recorded (in socket buffers, or received after the last checkpoint); 're-run beyond missing' = "
            "bytes the re-run fetched minus what the state said was missing."
        ],
    }


# ------------------------------------------------------------------------------------ scenario 5


def ensure_bert(folder: Path) -> Path:
    """A bert-base-sized random BertModel saved with save_pretrained (made once, then reused)."""
    if not (folder / "config.json").exists() or not list(folder.glob("*.safetensors")):
        bl.fresh_dir(folder)
        result = bl.run([sys.executable, "-c", MAKE_BERT_SCRIPT, str(folder)], env=bl.clean_env())
        if not result.ok:
            raise RuntimeError(f"could not make the bert model: {result.stderr[-1000:]}")
    return folder


def scenario_compare(ctx: Context, seq_len: int = 128, batch: int = 1) -> dict[str, Any]:
    """5. ``hfmirror compare`` vs the transformers forward pass alone: wall time and peak RSS."""
    model = ensure_bert(bl.WORK_DIR / "bert-base")
    weight_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    env = bl.clean_env(HF_HUB_OFFLINE="1")
    commands = {
        "reference": [sys.executable, "-c", REFERENCE_SCRIPT, str(model), str(batch), str(seq_len)],
        "hfmirror compare": [
            sys.executable,
            "-m",
            "hfmirror",
            "compare",
            str(model),
            "--seq-len",
            str(seq_len),
            "--batch",
            str(batch),
        ],
    }
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for i in range(ctx.runs):
        for name, argv in commands.items():
            result = bl.run(argv, env=env, cwd=bl.REPO_DIR)
            runs[name].append(
                {
                    "ok": result.ok,
                    "seconds": result.wall,
                    "rss_mib": result.maxrss_mib,
                    "cpu": result.cpu,
                    "returncode": result.returncode,
                    "error": None if result.ok else result.stderr.strip()[-400:],
                }
            )
            print(
                f"  run {i + 1}/{ctx.runs} {name:<17} {result.wall:6.2f}s  peak RSS "
                f"{result.maxrss_mib:7.0f} MiB  exit {result.returncode}",
                flush=True,
            )
    summary = {
        name: {
            "runs": len(items),
            "ok_runs": sum(r["ok"] for r in items),
            "seconds": bl.median([r["seconds"] for r in items]),
            "rss_mib": bl.median([r["rss_mib"] for r in items]),
            "cpu": bl.median([r["cpu"] for r in items]),
            "errors": [r["error"] for r in items if r["error"]],
        }
        for name, items in runs.items()
    }
    ours, ref = summary["hfmirror compare"], summary["reference"]
    time_ratio = ours["seconds"] / ref["seconds"]
    rss_ratio = ours["rss_mib"] * bl.MIB / weight_bytes
    goals = [
        {
            "goal": "compare wall time <= 2.5x the reference forward alone",
            "measured": f"{time_ratio:.2f}x ({ours['seconds']:.2f} s vs {ref['seconds']:.2f} s)",
            "met": time_ratio <= 2.5,
        },
        {
            "goal": "compare peak RSS <= 2.5x the fp32 weight bytes",
            "measured": f"{rss_ratio:.2f}x ({ours['rss_mib']:.0f} MiB vs "
            f"{weight_bytes / bl.MIB:.0f} MiB of weights)",
            "met": rss_ratio <= 2.5,
        },
        {
            "goal": "compare reports a match (exit 0)",
            "measured": f"{ours['ok_runs']}/{ours['runs']} runs exit 0",
            "met": ours["ok_runs"] == ours["runs"],
        },
    ]
    return {
        "title": f"5. hfmirror compare on a random bert-base (12 layers, hidden 768), "
        f"batch {batch}, seq-len {seq_len}",
        "tools": summary,
        "goals": goals,
        "weight_bytes": weight_bytes,
        "notes": [
            f"Reference: BertModel.from_pretrained(fp32, eager) + one forward, in its own process. "
            f"Peak RSS from os.wait4 (ru_maxrss) of each process. The reference alone peaks at "
            f"{ref['rss_mib'] * bl.MIB / weight_bytes:.2f}x the weight bytes."
        ],
    }


# ------------------------------------------------------------------------------------ scenario 6


HEAVY = (
    "torch",
    "transformers",
    "huggingface_hub",
    "requests",
    "numpy",
    "safetensors",
    "uvicorn",
    "starlette",
)


def _heavy_imports(argv: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """Which heavy packages ``argv`` (a Python command) imports, and its slowest top-level imports (us)."""
    result = bl.run([argv[0], "-X", "importtime", *argv[1:]], env=bl.clean_env(), cwd=bl.REPO_DIR)
    tops: dict[str, int] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if cumulative.isdigit():
            top = name.split(".")[0]
            tops[top] = max(tops.get(top, 0), int(cumulative))
    heavy = sorted(name for name in tops if name in HEAVY)
    slowest = sorted(tops.items(), key=lambda kv: -kv[1])[:5]
    return heavy, slowest


def scenario_startup(ctx: Context) -> dict[str, Any]:
    """6. Start-up time of ``--help`` (median of ~10) and whether torch/transformers got imported."""
    repeats = 3 if ctx.quick else 10
    commands = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "hfmirror --help": [sys.executable, bl.console_script("hfmirror"), "--help"],
        "python model_download.py --help": [sys.executable, "model_download.py", "--help"],
    }
    summary = {}
    for name, argv in commands.items():
        times = []
        for _ in range(repeats):
            result = bl.run(argv, env=bl.clean_env(), cwd=bl.REPO_DIR)
            times.append(result.wall)
        heavy, slowest = _heavy_imports(argv) if "baseline" not in name else ([], [])
        summary[name] = {
            "seconds": bl.median(times),
            "min": min(times),
            "runs": repeats,
            "heavy_imports": heavy,
            "slowest_imports_us": slowest,
            "ok": result.ok,
        }
        print(
            f"  {name:<33} median {summary[name]['seconds']:.3f}s  heavy imports: "
            f"{', '.join(heavy) or 'none'}",
            flush=True,
        )
    goals = []
    for name in ("hfmirror --help", "python model_download.py --help"):
        entry = summary[name]
        goals.append(
            {
                "goal": f"`{name}` < 0.3 s",
                "measured": f"{entry['seconds']:.3f} s",
                "met": entry["seconds"] < 0.3,
            }
        )
        bad = [m for m in entry["heavy_imports"] if m in ("torch", "transformers")]
        goals.append(
            {
                "goal": f"`{name}` imports neither torch nor transformers",
                "measured": ", ".join(bad) or "neither imported",
                "met": not bad,
            }
        )
    return {
        "title": f"6. Start-up time (median of {repeats})",
        "tools": summary,
        "goals": goals,
        "notes": [
            "The console script is run directly with this interpreter (a pyenv shim in front of "
            "it would add its own ~50 ms). Heavy imports from `python -X importtime`."
        ],
    }


# ------------------------------------------------------------------------------------ driver


SCENARIO_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "large": scenario_large,
    "capped": scenario_capped,
    "small": scenario_small,
    "resume": scenario_resume,
    "compare": scenario_compare,
    "startup": scenario_startup,
    "quota": scenario_quota,
    "sharded": scenario_sharded,
    "serve_scale": server_bench.scenario_serve_scale,
}
NEEDS_SERVER = {"large", "capped", "small", "resume", "quota", "sharded"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 128 MiB file, 100 small files, 1 run (unless --runs)"
    )
    parser.add_argument(
        "--runs", type=int, help="runs per measurement, medians reported (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--size-mib", type=int, help="size of the large file (default 1024; 128 with --quick)"
    )
    parser.add_argument(
        "--install-tools", action="store_true", help="apt-get install aria2/curl if missing (root only)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave RESULTS.md/results.json alone"
    )
    return parser.parse_args(argv)


def detect_tools(install: bool, notes: list[str]) -> dict[str, str | None]:
    """Find aria2c and curl (installing them with apt-get if asked and allowed)."""
    missing = [pkg for tool, pkg in (("aria2c", "aria2"), ("curl", "curl")) if not bl.tool_path(tool)]
    if missing and install:
        notes.append(bl.install_tools(missing))
    return {"aria2c": bl.tool_path("aria2c"), "curl": bl.tool_path("curl")}


def build_context(args: argparse.Namespace, server: bl.BenchServer, tools: dict, notes: list[str]) -> Context:
    """Make (or reuse) the test data and describe it."""
    size_mib = args.size_mib or (128 if args.quick else 1024)
    large_repo, large_file = f"bench/large-{size_mib}mib", "weights.bin"
    small_count, small_size = (100 if args.quick else 500), 100_000
    small_repo = f"bench/small-{small_count}x100kb"
    quota_count = 120 if args.quick else 300
    quota_repo = f"bench/quota-{quota_count}x{QUOTA_FILE_SIZE // 1000}kb"
    shard_size = (20 if args.quick else 40) * bl.MIB  # above MULTI_CONNECTION_THRESHOLD either way
    sharded_repo = f"bench/sharded-3x{shard_size // bl.MIB}mib"
    print(f"test data in {server.root} (generated once, reused)", flush=True)
    bl.make_random_file(server.root / large_repo / large_file, size_mib * bl.MIB)
    bl.make_small_files(server.root / small_repo, small_count, small_size)
    bl.make_small_files(server.root / quota_repo, quota_count, QUOTA_FILE_SIZE)
    for index in range(3):
        shard = f"model-{index + 1:05d}-of-00003.safetensors"
        bl.make_random_file(server.root / sharded_repo / shard, shard_size)
    for name, size in SHARDED_SMALL_FILES.items():
        bl.make_random_file(server.root / sharded_repo / name, size)
    return Context(
        runs=args.runs or (1 if args.quick else 3),
        quick=args.quick,
        server=server,
        large_repo=large_repo,
        large_file=large_file,
        large_size=size_mib * bl.MIB,
        small_repo=small_repo,
        small_count=small_count,
        small_size=small_size,
        quota_repo=quota_repo,
        quota_count=quota_count,
        sharded_repo=sharded_repo,
        sharded_shard_size=shard_size,
        tools=tools,
        notes=notes,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s in args.only]
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bl.WORK_DIR.mkdir(exist_ok=True)
    notes: list[str] = []
    tools = detect_tools(args.install_tools, notes)
    server = bl.BenchServer(bl.WORK_DIR / "root", bl.WORK_DIR / "server-state", bl.WORK_DIR / "server.log")
    results: dict[str, dict] = {}
    try:
        (bl.WORK_DIR / "root").mkdir(exist_ok=True)
        ctx = build_context(args, server, tools, notes)
        if NEEDS_SERVER & set(chosen):
            server.start()
            print(f"server {server.url} (pid {server.proc.pid}); hashing the test files once...", flush=True)
            # What `pip install` does for an installed package; an editable one compiles on first use.
            package = str(bl.REPO_DIR / "hfmirror")
            subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=False)
            server.warm(ctx.large_repo)
            server.warm(ctx.small_repo)
            server.warm(ctx.quota_repo)
            server.warm(ctx.sharded_repo)
        for name in chosen:
            print(f"== {name}", flush=True)
            results[name] = SCENARIO_FUNCS[name](ctx)
            results[name]["date"] = bl.machine_info()["date"]
            results[name]["runs_per_point"] = ctx.runs
            results[name]["quick"] = ctx.quick
    except KeyboardInterrupt:
        print("interrupted; stopping the server and every process the bench started", file=sys.stderr)
        return 130
    finally:
        server.stop()
        bl.cleanup()
        bl.shutil.rmtree(bl.WORK_DIR / "runs", ignore_errors=True)
        if results and not args.no_write:
            report.write(results, bl.machine_info(), notes, bl.BENCH_DIR)
    print(
        f"wrote {bl.BENCH_DIR / 'RESULTS.md'} and results.json" if not args.no_write else "done", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
