"""``hfmirror compare``: check the from-scratch transformer against transformers on a real checkpoint.

Only click, the standard library and hfmirror's light modules are imported here; torch,
transformers, matplotlib and the ``compare`` package are imported inside the command, so
``hfmirror --help`` stays instant. Problems are raised as ``hfmirror.errors`` exceptions
(``hfmirror.cli`` turns them into messages and exit codes); a comparison that ran and found a
difference exits with status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import BadInputError
from .extras import require_extras

__all__ = ["compare"]

EXIT_MISMATCH = 1  # as documented in hfmirror.cli

# compare.architectures.supported_model_types(), written out so that --help needs no torch (a test
# keeps the two equal).
SUPPORTED_MODEL_TYPES = (
    "bert",
    "gpt2",
    "llama",
    "mistral",
    "qwen",
    "qwen2",
    "qwen3",
    "roberta",
    "xlm-roberta",
)


@click.command()
@click.argument("model")
@click.option(
    "--text",
    "texts",
    multiple=True,
    metavar="TEXT",
    help="A sentence to run through both models (repeatable; tokenised as one padded batch, so "
    "texts of different lengths exercise the padding mask). "
    "Without --text, random token ids with random padding are used.",
)
@click.option(
    "--tokenizer",
    metavar="DIR_OR_REPO",
    help="Tokenise --text with this tokenizer (a folder, or a repo id whose tokenizer files are "
    "downloaded) instead of the checkpoint's. Custom tokenizer code is never run.",
)
@click.option(
    "--seq-len",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Length of the random input (ignored with --text).",
)
@click.option(
    "--batch",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Rows of the random input (ignored with --text).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Precision of both models. Rerun in float64 to tell a bug (stays) from rounding (vanishes).",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Absolute tolerance [default: 1e-5 for float32, 1e-10 for float64].",
)
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    help="Relative tolerance [default: 1e-5 for float32, 1e-10 for float64].",
)
@click.option(
    "--layers",
    metavar="A-B",
    help="Compare layers A to B only (counted from 0, inclusive); the reference's output of the layer "
    "before A feeds layer A. Embeddings and final stages are compared when the range includes the "
    "first or the last layer.",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Compare one layer at a time. Every comparison does (one code path for every size, with one "
    "layer's weights in memory at a time, so models larger than memory can be checked); the flag is "
    "accepted for scripts that want to say so.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the report as one JSON object instead of a table."
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    metavar="PATH",
    help="Also write the report as one self-contained HTML page (opens offline): the verdict, the "
    "error of every stage down the depth, the stage table, and every layer's and head's attention "
    "map for the first text, ours beside the reference's and their difference. Needs the 'report' "
    "extra.",
)
@click.option(
    "--revision",
    default="main",
    show_default=True,
    help="Branch, tag or commit sha (when MODEL is a repo id).",
)
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    metavar="URL",
    help="Mirror to download from; repeat for failover order (when MODEL is a repo id).",
)
@click.option("--token", help="Access token for gated or private repos.")
@click.option(
    "--cache-dir", type=click.Path(file_okay=False), help="Hugging Face cache folder to download into."
)
def compare(
    model: str,
    texts: tuple[str, ...],
    tokenizer: str | None,
    seq_len: int,
    batch: int,
    seed: int,
    dtype: str,
    atol: float | None,
    rtol: float | None,
    layers: str | None,
    stream: bool,
    as_json: bool,
    html_path: Path | None,
    revision: str,
    endpoints: tuple[str, ...],
    token: str | None,
    cache_dir: str | None,
) -> None:
    """Compare our from-scratch implementation of MODEL with transformers, stage by stage.

    MODEL is a local folder (config.json + weights) or a repo id: then config.json is fetched first
    (an unsupported model type is refused before any weight), then one weight format and the
    tokenizer, not the TensorFlow/Flax/ONNX/... copies.
    Supported model types: bert, gpt2, llama, mistral, qwen (Qwen v1, e.g. Qwen/Qwen-7B), qwen2,
    qwen3, roberta, xlm-roberta.

    Every stage is compared, one layer at a time, twice: carried (our model on its own numbers, what a
    user sees) and isolated (each component fed the reference's input: its own error). A stage passes
    when its isolated error is within tolerance (in float64 its carried error too); the first that
    does not is named. Encoders: embeddings; per layer attention, attention_add_norm, feed_forward,
    output; last_hidden_state; pooler. Decoders: embeddings; per layer attention,
    attention_residual, mlp, output; final_norm; logits, plus next-token agreement and KL
    divergence. Exit status: 0 the verdict passes, 1 a stage fails it. --html PATH also writes
    the report as a self-contained page (whatever the verdict).

    \b
    Examples:
      hfmirror compare bert-base-uncased
      hfmirror compare Qwen/Qwen-7B
      hfmirror compare ./gpt2 --text "the cat sat on the mat" --text "hello"
      hfmirror compare ./llama --dtype float64 --json
      hfmirror compare ./llama --layers 20-23
      hfmirror compare ./gpt2 --text "the cat sat on the mat" --html report.html
    """
    if html_path is not None:  # before anything is downloaded or compared
        require_extras("report")
        if not html_path.absolute().parent.is_dir():
            raise BadInputError(
                f"--html {html_path}: the folder {html_path.absolute().parent} does not exist"
            )

    from compare.runner import compare_model_dir

    del stream  # nothing to switch on: every comparison runs one layer at a time

    fetched = {"endpoints": list(endpoints) or None, "token": token, "cache_dir": cache_dir}

    def fetch_model(repo_id: str) -> Path:
        """A local folder as it is; a repo id: config.json first, then one weight format and the
        tokenizer (see compare.fetch)."""
        if Path(repo_id).is_dir():
            return Path(repo_id)
        from compare.fetch import fetch_checkpoint

        return fetch_checkpoint(repo_id, revision=revision, progress=not as_json, **fetched)

    def fetch_tokenizer(repo_id: str) -> Path:
        """A local folder as it is; a repo id: only its tokenizer files (see compare.fetch)."""
        if Path(repo_id).is_dir():
            return Path(repo_id)
        from compare.fetch import fetch_tokenizer as fetch_tokenizer_files

        return fetch_tokenizer_files(repo_id, progress=not as_json, **fetched)

    model_dir = fetch_model(model)
    tokenizer_dir = fetch_tokenizer(tokenizer) if tokenizer and texts else None

    report = compare_model_dir(
        model_dir,
        texts=list(texts) or None,
        tokenizer=tokenizer_dir,
        seq_len=seq_len,
        batch=batch,
        seed=seed,
        dtype=dtype,
        atol=atol,
        rtol=rtol,
        model_name=model,
        layers=layers,
        keep_attention=html_path is not None,  # only the page draws them: an ordinary run keeps none
        attention_cells=_page_budget() if html_path is not None else None,
        on_note=lambda note: click.echo(f"hfmirror: note: {note}", err=True),
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        if report.hint() is not None:  # the table prints it under the verdict
            click.echo(f"hfmirror: {report.hint()}", err=True)
    else:
        click.echo(report.render_table())
    if html_path is not None:
        from compare.html_report import write_report

        click.echo(f"hfmirror: HTML report written to {write_report(html_path, report)}", err=True)
    if not report.passed:
        sys.exit(EXIT_MISMATCH)


def _page_budget() -> int:
    """The most attention cells the HTML page draws (compare.html_attention.MAX_DRAWN_CELLS)."""
    from compare.html_attention import MAX_DRAWN_CELLS

    return MAX_DRAWN_CELLS
