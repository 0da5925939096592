"""Turn the bench's measurements into bench/results.json and the tables of bench/RESULTS.md.

``python bench/report.py`` re-renders RESULTS.md from results.json (e.g. after editing the notes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ORDER = (
    "large",
    "capped",
    "small",
    "resume",
    "compare",
    "compare-decoders",
    "compare-stream",
    "startup",
    "serve_scale",
    "quota",
    "sharded",
    "mirror_warm",
    "mirror_cold",
)


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _met(value: bool | None) -> str:
    return "—" if value is None else ("**yes**" if value else "**NO**")


def _download_rows(tools: dict[str, dict]) -> list[list[str]]:
    rows = []
    for tool, t in tools.items():
        busy = (t["server_cpu"] / t["seconds"]) if t.get("server_cpu") is not None and t["seconds"] else None
        rows.append(
            [
                tool,
                _f(t["seconds"]),
                _f(t["mib_per_s"], 1),
                _f(t["hfmirror_speedup"], 2, "x"),
                _f(t["client_cpu"]),
                _f(t["server_cpu"]),
                _f(busy, 2),
                f"{t['ok_runs']}/{t['runs']}",
            ]
        )
    return rows


def _scenario_lines(name: str, s: dict[str, Any]) -> list[str]:
    lines = [
        f"## {s['title']}",
        "",
        f"_{s['date']}, median of {s['runs_per_point']} run(s){', --quick' if s.get('quick') else ''}._",
        "",
    ]
    tools = s["tools"]
    if name in ("large", "capped"):
        lines += _table(
            [
                "tool",
                "median s",
                "MiB/s",
                "hfmirror speed ÷ this",
                "client CPU s",
                "server CPU s",
                "server cores busy",
                "ok runs",
            ],
            _download_rows(tools),
        )
    elif name == "small":
        lines += _table(
            ["tool", "median s", "429s provoked", "requests", "client CPU s", "ok runs"],
            [
                [
                    t,
                    _f(v["seconds"]),
                    _f(v["429"], 0),
                    _f(v["requests"], 0),
                    _f(v["client_cpu"]),
                    f"{v['ok_runs']}/{v['runs']}",
                ]
                for t, v in tools.items()
            ],
        )
    elif name == "resume":
        lines += _table(
            [
                "tool",
                "killed at (sent)",
                "resume state saved",
                "sent but not saved MiB",
                "re-run beyond missing MiB",
                "total bytes / size (median)",
                "worst run",
                "re-run s",
                "ok runs",
            ],
            [
                [
                    t,
                    _f(v["killed_at"] * 100, 0, "%"),
                    _f(v["state_saved"] * 100 if v["state_saved"] is not None else None, 1, "%"),
                    _f(v.get("lost_at_kill_mib"), 1),
                    _f(v.get("rerun_beyond_missing_mib"), 1),
                    _f(v["ratio"], 4),
                    _f(v["ratio_max"], 4),
                    _f(v["rerun_seconds"]),
                    f"{v['ok_runs']}/{v['runs']}",
                ]
                for t, v in tools.items()
            ],
        )
    elif name.startswith("compare"):
        lines += _table(
            ["process", "median wall s", "peak RSS MiB", "CPU s", "exit 0 runs"],
            [
                [t, _f(v["seconds"]), _f(v["rss_mib"], 0), _f(v["cpu"]), f"{v['ok_runs']}/{v['runs']}"]
                for t, v in tools.items()
            ],
        )
    elif name == "startup":
        lines += _table(
            ["command", "median s", "min s", "heavy imports", "slowest top-level imports (ms)"],
            [
                [
                    f"`{t}`",
                    _f(v["seconds"], 3),
                    _f(v["min"], 3),
                    ", ".join(v["heavy_imports"]) or "none",
                    ", ".join(f"{m} {us / 1000:.0f}" for m, us in v["slowest_imports_us"]),
                ]
                for t, v in tools.items()
            ],
        )
    elif name == "quota":
        lines += _table(
            ["tool", "median s", "x the quota's bound", "worst s", "429s provoked", "requests", "ok runs"],
            [
                [
                    t,
                    _f(v["seconds"]),
                    _f(v["bound_ratio"], 2, "x"),
                    _f(v["worst_seconds"]),
                    _f(v["429"], 0),
                    _f(v["requests"], 0),
                    f"{v['ok_runs']}/{v['runs']}",
                ]
                for t, v in tools.items()
            ],
        )
    elif name == "sharded":
        lines += _table(
            [
                "tool",
                "median s",
                "x the link's bound",
                "worst s",
                "connections at once",
                "sockets used",
                "ok runs",
            ],
            [
                [
                    t,
                    _f(v["seconds"]),
                    _f(v["bound_ratio"], 2, "x"),
                    _f(v["worst_seconds"]),
                    _f(v["most_connections"], 0),
                    _f(v["sockets_used"], 0),
                    f"{v['ok_runs']}/{v['runs']}",
                ]
                for t, v in tools.items()
            ],
        )
    elif name == "serve_scale":
        lines += _table(
            ["repo", "median GET ms", "p90 ms", "÷ smallest repo", "first listing s", "ok GETs"],
            [
                [
                    t,
                    _f(v["median_ms"]),
                    _f(v["p90_ms"]),
                    _f(v["ratio"], 2, "x"),
                    _f(v["first_listing_s"]),
                    f"{v['ok_runs']}/{v['runs']}",
                ]
                for t, v in tools.items()
            ],
        )
    elif name in ("mirror_warm", "mirror_cold"):
        lines += _table(
            ["server / client", "median s", "MiB/s in all", "ok runs"],
            [
                [t, _f(v["seconds"]), _f(v.get("mib_per_s"), 1), f"{v['ok_runs']}/{v['runs']}"]
                for t, v in tools.items()
            ],
        )
    lines += [""] + _table(
        ["Goal", "Measured", "Met?"], [[g["goal"], g["measured"], _met(g["met"])] for g in s["goals"]]
    )
    errors = [f"{t}: {e}" for t, v in tools.items() for e in (v.get("errors") or []) if e]
    notes = list(s.get("notes", [])) + [f"Error seen — {e}" for e in errors[:4]]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return lines + [""]


def render(data: dict[str, Any]) -> str:
    """RESULTS.md from the contents of results.json."""
    m = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        "# hfmirror benchmark results",
        "",
        "Written by `python bench/run.py` (see bench/README.md). Times are wall-clock medians; ratios are",
        "taken within one run of the bench. The server is `python -m hfmirror.server.faults` (uvicorn) on",
        "the same machine, over loopback.",
        "",
        "## Machine",
        "",
        f"- Date: {m['date']}",
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']} GiB; {m['os']}",
        f"- Python {m['python']}; git {m['git']}",
        f"- {versions}",
        "",
    ]
    summary = []
    for name in ORDER:
        if name in data["scenarios"]:
            for g in data["scenarios"][name]["goals"]:
                if g["met"] is not None:
                    summary.append([name, g["goal"], g["measured"], _met(g["met"])])
    lines += ["## All goals", ""] + _table(["scenario", "Goal", "Measured", "Met?"], summary) + [""]
    for name in ORDER:
        if name in data["scenarios"]:
            lines += _scenario_lines(name, data["scenarios"][name])
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    if data.get("analysis"):
        lines += ["## Analysis", ""] + data["analysis"] + [""]
    return "\n".join(lines)


def write(results: dict[str, dict], machine: dict[str, Any], notes: list[str], folder: Path) -> None:
    """Merge ``results`` into folder/results.json (other scenarios keep theirs) and render RESULTS.md."""
    path = folder / "results.json"
    data: dict[str, Any] = {"scenarios": {}}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            pass
    data["machine"] = machine
    data.setdefault("scenarios", {}).update(results)
    data["notes"] = notes
    path.write_text(json.dumps(data, indent=2) + "\n")
    (folder / "RESULTS.md").write_text(render(data))


if __name__ == "__main__":
    folder = Path(__file__).resolve().parent
    loaded = json.loads((folder / "results.json").read_text())
    (folder / "RESULTS.md").write_text(render(loaded))
    print("re-rendered", folder / "RESULTS.md", file=sys.stderr)
