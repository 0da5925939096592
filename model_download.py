#!/usr/bin/env python3
"""Download a Hugging Face model or dataset through a mirror, resumably.

A drop-in for the ``model_download.py`` script many users know (same flags, same default folder
``dataroot/models/<repo_id>``), built on hfmirror: several connections per file, resume after a
killed run, retries that honour rate limits, and a checksum check of every file.

    python model_download.py --repo_id Qwen/Qwen-7B
    python model_download.py --repo_id wikitext --repo_type dataset --token hf_xxx

Exit codes are hfmirror's (see ``hfmirror download --help`` and the README).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download a Hugging Face repo through a mirror (resumable, verified).",
    )
    parser.add_argument("--repo_id", required=True, help="Repository id, e.g. Qwen/Qwen-7B.")
    parser.add_argument(
        "--repo_type", default="model", choices=["model", "dataset"], help="model or dataset."
    )
    parser.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Download through a mirror (default: yes; HF_ENDPOINT if set, else hf-mirror.com, then "
        "huggingface.co). --no-mirror talks to huggingface.co only.",
    )
    parser.add_argument(
        "--endpoint", action="append", help="Explicit endpoint URL (repeatable, failover order)."
    )
    parser.add_argument(
        "--token",
        default=None,
        help="Access token for gated or private repos, sent to the mirror too. Without it, HF_TOKEN or "
        "the `hf auth login` token is used, and sent only to huggingface.co and to --endpoint URLs.",
    )
    parser.add_argument(
        "--local_dir", default=None, help="Target folder (default: dataroot/models/<repo_id>)."
    )
    parser.add_argument("--revision", default="main", help="Branch, tag or commit sha.")
    parser.add_argument("--include", action="append", help="Only files matching this glob (repeatable).")
    parser.add_argument("--exclude", action="append", help="Skip files matching this glob (repeatable).")
    parser.add_argument("--max_workers", type=int, default=8, help="Files at once.")
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="Most connections per large file (more than one only if one is slow).",
    )
    parser.add_argument(
        "--max_connections",
        type=int,
        default=16,
        help="Most connections at once to one mirror, shared by all files.",
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.add_argument("--debug", action="store_true", help="Full tracebacks on errors.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hfmirror.cli import exit_code_for, notices_on_stderr
    from hfmirror.download import download
    from hfmirror.errors import HfMirrorError

    folder = "datasets" if args.repo_type == "dataset" else "models"
    local_dir = args.local_dir or os.path.join("dataroot", folder, args.repo_id)
    endpoints = args.endpoint or (None if args.mirror else ["https://huggingface.co"])
    try:
        with notices_on_stderr(not args.quiet, prefix="model_download"):
            result = download(
                args.repo_id,
                repo_type=args.repo_type,
                revision=args.revision,
                include=args.include,
                exclude=args.exclude,
                local_dir=local_dir,
                endpoints=endpoints,
                token=args.token,
                max_workers=args.max_workers,
                connections=args.connections,
                max_connections=args.max_connections,
                progress=not args.quiet,
            )
    except KeyboardInterrupt:
        print("model_download: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except HfMirrorError as error:
        if args.debug:  # the traceback as well, and the same exit code
            traceback.print_exc(file=sys.stderr)
        print(f"model_download: error: {error}", file=sys.stderr)
        return exit_code_for(error)
    except Exception as error:  # a bug: still one line unless asked for more
        if args.debug:
            raise
        print(
            f"model_download: unexpected error: {type(error).__name__}: {error} "
            "(re-run with --debug for details)",
            file=sys.stderr,
        )
        return 1
    if not args.quiet:
        print(result.describe(), file=sys.stderr)
    print(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
