"""The `serve` and `eval` commands: thin click commands over emloc_edge.serve and emloc_edge.evaluate
(registered on the `emloc-edge` group by cli.py)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_common import _model_or_default, _ratios, handle_errors, model_option
from .compile.policy import FORCES


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--memories", "memories_dir", type=click.Path(path_type=Path), required=True,
              help="Folder of *.emloc task memories; each is served under its file stem (new files appear live).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="EMLOC_EDGE_API_KEY", default=None, help="Require `Authorization: Bearer KEY`.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Server processes.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=16 * 1024**2, show_default=True)
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=16 * 1024**2, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--request-timeout", type=click.FloatRange(min=0.001), default=120.0, show_default=True,
              help="Seconds one request may run.")
@click.option("--memory-cache-mb", type=click.IntRange(min=0), default=2048, show_default=True,
              help="Bound memories kept per model (least recently used dropped first).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads (0: ONNX Runtime decides).")
@click.option("--ray", "use_ray", is_flag=True, help="Run as a Ray Serve application (an existing cluster, or local).")
@click.option("--address", default=None, help="Ray cluster address (e.g. auto) [default: start a local Ray].")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True, help="Ray replicas.")
@handle_errors
def serve(model_dir: Path, memories_dir: Path, **options: object) -> None:
    """Serve MODEL_DIR's task memories over an OpenAI-compatible HTTP API until interrupted.

    POST /v1/chat/completions (model = a memory's name; text and data: image URLs; stream), GET /v1/models,
    GET /health. Needs the [serve] extra.
    """
    from .serve.main import serve_command

    serve_command(model_dir, memories_dir, **options)


@click.command("eval")
@click.argument("demos_dir", type=click.Path(path_type=Path))
@click.argument("test_dir", type=click.Path(path_type=Path))
@model_option
@click.option("--json", "json_out", type=click.Path(path_type=Path, allow_dash=True), default=None,
              help="Write the report as one JSON object to this file ('-': stdout, instead of the table).")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Draw accuracy against memory size (MB) and against kept fraction, a line per policy (.png).")
@click.option("--delta", type=float, default=None, help="EMLoC JS tolerance in nats [default: the compiler's].")
@click.option("--ratios", callback=_ratios, default=None,
              help="EMLoC candidate keep ratios [default: each policy's own, as in compile].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, help="Demonstrations per chunk, for the chunk-wise policies [default: 4].")
@click.option("--policy", default=None, help="Main compile policy: its POLICY-fp32/-int8 are default conditions and "
                                             "it sizes uniform-int8 [default: the compiler's].")
@click.option("--forced", type=click.Choice(FORCES), default=None,
              help="Answer-span tokens every compile keeps, as compile's --forced [default: answer, the whole span].")
@click.option("--sweep", "sweep", multiple=True, metavar="KNOB=V1,V2",
              help="Add each value as a condition for every asked policy that takes KNOB: delta=0.001,0.005,0.02 "
                   "(searched policies), ratio=0.1,0.25,0.5 (budgeted ones, e.g. uniform). Repeatable.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N test items.")
@click.option("--conditions", default=None,
              help="Comma list of conditions to report: zero-shot, full-context, POLICY-PRECISION[@KNOB=V] "
                   "[default: zero-shot,full-context,POLICY-fp32,POLICY-int8,uniform-int8]. full-context is always "
                   "built (JS is measured against it).")
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True,
              help="ort: the exported model under ONNX Runtime (what `run` deploys); torch: the PyTorch reference.")
@click.option("--weights", type=click.Choice(["fp32", "int8", "int4"]), default=None,
              help="Weights of the export the ort backend answers with (exported once, cached) [default: export's].")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX Runtime execution provider (ort backend).")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="ONNX Runtime intra-op threads (0: it decides).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Torch device compile runs on (the torch backend answers on the CPU) [default: the compiler's].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--question", default=None, help="Question for folder-per-answer folders (else their task.json).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def eval_command(demos_dir: Path, test_dir: Path, model: Path | None, json_out: Path | None, plot: Path | None,
                 delta: float | None, ratios: tuple[float, ...] | None, chunk_size: int | None, policy: str | None,
                 forced: str | None, sweep: tuple[str, ...], limit: int | None, conditions: str | None, backend: str,
                 weights: str | None, provider: str, threads: int, device: str | None, max_new_tokens: int,
                 question: str | None, quiet: bool) -> None:
    """Answer the items in TEST_DIR with each kind of context built from DEMOS_DIR and compare.

    Conditions: zero-shot (no demos), full-context (all demos, nothing pruned, fp32), POLICY-PRECISION
    (the demos compiled with a registered policy, stored fp32/fp16/int8, e.g. emloc-int8), uniform-int8
    (one keep ratio in every layer, sized like the main policy's int8 memory). Queries are answered by
    the exported model under ONNX Runtime with the memory files compile writes (--backend ort) or by
    PyTorch. Reports accuracy (exact match), items lost and won against full-context on the same items
    with the exact sign test's p ("vs full": -3 +0 (p 0.25) is no evidence of a loss), memory bytes and
    precision, kept tokens, median ms per query, TTFT and tokens/s (ort), mean JS divergence of the first
    answer token to full-context, and compile time. TEST_DIR has the layout of a demos folder. Needs the
    [compile] extra (torch, transformers; matplotlib for --plot).
    """
    from .evaluate.progress import TqdmProgress
    from .evaluate.report import check_output
    from .evaluate.run import evaluate
    from .evaluate.names import resolve_conditions

    to_stdout = json_out is not None and str(json_out) == "-"
    resolve_conditions(conditions, policy or _default_policy(), sweep)  # a bad name fails before anything loads
    if json_out is not None and not to_stdout:
        check_output(json_out, option="--json")
    if plot is not None:
        check_output(plot, suffix=".png", option="--plot")
    with TqdmProgress(disable=quiet) as bar:
        report = evaluate(demos_dir, test_dir, model if model is not None else (lambda: _model_or_default(None)),
                          conditions=conditions, delta=delta, ratios=ratios, chunk_size=chunk_size, policy=policy,
                          forced=forced, sweep=sweep or None, backend=backend, weights=weights, provider=provider, threads=threads,
                          device=device, limit=limit, max_new_tokens=max_new_tokens, question=question, progress=bar)
    if json_out is not None and not to_stdout:
        report.write_json(json_out)
    if plot is not None:
        report.write_plot(plot)
    click.echo(json.dumps(report.to_dict(), allow_nan=False) if to_stdout else report.table())


def _default_policy() -> str:
    from .compile.compressor import CompileOptions

    return CompileOptions().policy
