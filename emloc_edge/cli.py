"""`emloc-edge`: thin click commands over the Python API.

Bad input of any kind ends in one line on stderr and exit code 2 (set EMLOC_EDGE_DEBUG=1 for the
traceback). Torch-using stages are imported inside the commands that need them, so `--help` and the
torch-free commands start fast.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import EmlocError
from .textout import finite as _finite, human_size as _size

EXIT_BAD_INPUT = 2
EXIT_EXPORT_BUG = 3  # ExportValidationError: the ONNX graph disagrees with PyTorch (a bug, not bad input)

#: Library parameter -> the CLI's flag for it; library errors name the parameter, the CLI adds the flag.
FLAGS = {
    "provider": "--provider", "max_new_tokens": "--max-new-tokens", "memory_inputs": "--memory-inputs",
    "threads": "--threads", "question": "--question", "delta": "--delta", "ratios": "--ratios",
    "chunk_size": "--chunk-size", "precision": "--precision", "output": "-o/--output", "append": "--append",
    "weights": "--weights", "validate": "--no-validate", "conditions": "--conditions", "limit": "--limit",
    "sweep": "--sweep", "policy": "--policy", "backend": "--backend", "device": "--device",
}


def _one_line(e: BaseException) -> str:
    """The message the user sees for an exception that reached the top."""
    if isinstance(e, EmlocError):
        flags = [FLAGS.get(p, "--" + p.replace("_", "-")) for p in e.parameters]
        return f"{e} ({', '.join(flags)})" if flags else str(e)
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return f"{type(e).__name__}: {e}"


def handle_errors(fn):
    """One top-level handler: user errors -> one line, exit 2; no traceback unless EMLOC_EDGE_DEBUG is set."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EmlocError, OSError) as e:
            if os.environ.get("EMLOC_EDGE_DEBUG"):
                raise
            line = f"error: {_one_line(e)}".splitlines()[0]
            # a path from the file system may hold lone surrogates (non-UTF-8 names): show them escaped
            click.echo(line.encode("utf-8", "backslashreplace").decode("utf-8"), err=True)
            sys.exit(getattr(e, "exit_code", EXIT_BAD_INPUT))

    return wrapper


def _ratios(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return tuple(float(r) for r in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 0.1,0.2,0.5, got {value!r}") from None


def _emit(as_json: bool, data: dict, text: str) -> None:
    click.echo(json.dumps(_finite(data), allow_nan=False, default=str) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="emloc-edge")
def main() -> None:
    """Training-free task adaptation of vision-language models at the edge.

    \b
    compile   demonstrations -> pruned, int8 EMLoC task memory (PyTorch)
    inspect   show what a task memory file holds
    export    model -> ONNX graphs + manifest for the runtime (PyTorch)
    run       answer queries with a task memory under ONNX Runtime (no torch)
    eval      accuracy, memory size, speed and JS of each kind of context on held-out items (PyTorch)
    serve     OpenAI-compatible HTTP API over one model and a folder of memories (no torch; Ray Serve)
    """


model_option = click.option(
    "--model", "model", type=click.Path(path_type=Path), envvar="EMLOC_EDGE_MODEL", default=None,
    help="Local HF model folder or .gguf file (env EMLOC_EDGE_MODEL) [default: the embedded emloc-tiny-vlm, "
         "built once from its installed packages].",
)


def _model_or_default(model: Path | None) -> Path:
    """The given model, else the embedded default (assembled on first use, messages on stderr)."""
    if model is not None:
        return model
    from .models.default_model import ensure_default_model

    return ensure_default_model(progress=lambda m: click.echo(m, err=True))
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


@main.command()
@click.argument("demos_dir", type=click.Path(path_type=Path))
@model_option
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Memory file to write [default: task.emloc, or the --append file].")
@click.option("--delta", type=float, default=None, help="JS divergence tolerance in nats [default: 0.005].")
@click.option("--ratios", callback=_ratios, default=None, help="Candidate keep ratios, smallest first [default: 0.1,0.2,0.5].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, help="Demonstrations per chunk [default: 4].")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default=None,
              help="How K/V are stored [default: int8].")
@click.option("--append", type=click.Path(path_type=Path), default=None,
              help="Compress the demos as further chunks of this memory (its chunks stay as they are).")
@click.option("--question", default=None, help="Question for folder-per-answer demos (else DEMOS_DIR/task.json).")
@click.option("--policy", type=click.Choice(["emloc", "emloc-paper", "uniform"]), default=None,
              help="Layer budget policy [default: emloc; emloc-paper: the authors' search].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the compiler runs (torch); auto: CUDA when torch sees a GPU.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
@handle_errors
def compile(demos_dir, model, output, delta, ratios, chunk_size, precision, append, question, policy, device, quiet,
            as_json) -> None:
    """Compress the demonstrations in DEMOS_DIR into a task memory file.

    DEMOS_DIR holds demos.jsonl ({"image", "question", "answer"} per line) or one folder per answer
    with its images. Needs the [compile] extra (torch, transformers).
    """
    from .compile.api import compile_memory
    from .memory import TaskMemory

    output = output or append or Path("task.emloc")
    started = time.perf_counter()
    model = _model_or_default(model)
    with _ProgressBar(disable=quiet or as_json) as bar:
        memory: TaskMemory = compile_memory(
            demos_dir, model, output=output, delta=delta, ratios=ratios, chunk_size=chunk_size,
            precision=precision, append=append, question=question, progress=bar, policy=policy, device=device,
        )
    summary = memory.summary(file_bytes=output.stat().st_size)
    summary.update(output=str(output), seconds=round(time.perf_counter() - started, 2))
    _emit(as_json, summary, _compile_text(summary))


@main.command()
@click.argument("memory_file", type=click.Path(path_type=Path))
@json_option
@handle_errors
def inspect(memory_file: Path, as_json: bool) -> None:
    """Validate a task memory file and show what it holds."""
    from .memory import TaskMemory

    memory = TaskMemory.load(memory_file)
    summary = memory.summary(file_bytes=memory_file.stat().st_size)
    _emit(as_json, summary, _inspect_text(memory_file, summary))


@main.command()
@model_option
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder to write the exported model to (replaced atomically if it is an earlier export) "
                   "[default with the embedded model: where `run` looks for it].")
@click.option("--weights", type=click.Choice(["fp32", "int8", "int4"]), default="int8", show_default=True,
              help="Decoder weight precision (int8/int4: MatMulNBits, block 32, accuracy level 4; int8 embedding table).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX-vs-PyTorch check of every decoder output (fp32 traces).")
@click.option("--progress/--no-progress", " /-q", default=True, show_default=True,
              help="One line per export step on stderr, with its time (-q: none).")
@json_option
@handle_errors
def export(model: Path, out_dir: Path, weights: str, no_validate: bool, progress: bool, as_json: bool) -> None:
    """Export the model as ONNX graphs (decoder step, vision encoder) with tokenizer and manifest.

    One export serves any number of task memories compiled with the same model. Needs the
    [compile] extra (torch, transformers).
    """
    from .export.api import export_model
    from .models.default_model import default_export_dir

    if out_dir is None:
        if model is not None:
            raise click.UsageError("give -o/--output: the folder to export the model to")
        out_dir = default_export_dir()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _StepLines(disable=not progress) as steps:
        manifest = export_model(_model_or_default(model), out_dir, weights=weights, validate=not no_validate,
                                progress=steps)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    summary = {"output": str(out_dir), "model": manifest["model_name"], "weights": weights,
               "graphs": sorted(manifest["graphs"]), "bytes": size,
               "validation_max_scaled_diff": max((manifest.get("validation_max_scaled_diff") or {}).values(), default=None),
               "seconds": round(time.perf_counter() - started, 1)}
    _emit(as_json, summary, f"exported {summary['model']} ({weights} weights; {', '.join(summary['graphs'])}) "
                            f"-> {out_dir} ({_size(size)}) in {summary['seconds']:.1f} s")


class _StepLines:
    """`progress(step)` for export_model: "step ... 6.9 s" on stderr, one line per step as it ends."""

    def __init__(self, disable: bool = False) -> None:
        self.disable, self.open, self.started = disable, False, 0.0

    def __enter__(self) -> "_StepLines":
        return self

    def __exit__(self, *exc) -> None:
        self._end()

    def __call__(self, step: str) -> None:
        self._end()
        if not self.disable:
            click.echo(f"{step} ...", nl=False, err=True)
            self.open, self.started = True, time.perf_counter()

    def _end(self) -> None:
        if self.open:
            click.echo(f" {time.perf_counter() - self.started:.1f} s", err=True)
            self.open = False


@main.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--memory", "memory_path", type=click.Path(path_type=Path), default=Path("task.emloc"), show_default=True,
              help="Task memory file (.emloc).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), envvar="EMLOC_EDGE_MODEL_DIR", default=None,
              help="Exported model folder (env EMLOC_EDGE_MODEL_DIR) [default: the embedded model's export, "
                   "made once on first use when the [compile] extra is installed].")
@click.option("--question", default=None, help="Question asked about each image [default: the demos' own question, "
                                                "stored in the memory].")
@click.option("--prompt", "prompts", multiple=True, help="A text query (text-only models; repeatable).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX Runtime execution provider; auto takes CUDA when onnxruntime-gpu sees a GPU.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads (0: ONNX Runtime decides).")
@click.option("--memory-inputs", type=click.Choice(["auto", "int8", "float"]), default="auto", show_default=True,
              help="int8: an int8 memory stays int8 on the device (scales applied in each step); "
                   "float: dequantized once at load (same answers, ~4x the RAM); auto: int8 for int8 memories.")
@json_option
@handle_errors
def run(images, memory_path, model_dir, question, prompts, max_new_tokens, provider, threads, memory_inputs, as_json) -> None:
    """Answer IMAGES (or --prompt texts) with the task memory as context.

    Plain output streams each answer as it is generated; --json prints one object per query:
    {"image", "question", "answer", "token_ids", "ttft_ms", "tokens_per_s"}. All queries share one
    loaded session.
    """
    from .runtime.session import EdgeSession

    if not images and not prompts:
        raise click.UsageError("give one or more images, or --prompt TEXT")
    if model_dir is None:
        model_dir = _default_export()
    session = EdgeSession(model_dir, memory_path, provider=provider, threads=threads, max_new_tokens=max_new_tokens,
                          memory_inputs=memory_inputs)
    question = question or session.memory.meta.template.get("default_question")
    queries = [(image, question) for image in images] + [(None, p) for p in prompts]
    for image, text in queries:
        if as_json:
            a = session.answer(image, text)
            click.echo(json.dumps({"image": a.image, "question": text, "answer": a.text, "token_ids": a.token_ids,
                                   "ttft_ms": round(a.ttft_ms, 2), "tokens_per_s": round(a.tokens_per_s, 2)}))
            continue
        if len(queries) > 1:
            click.echo(f"{image if image is not None else text}: ", nl=False)
        for piece in session.stream(image, text):
            click.echo(piece, nl=False)
        click.echo()


@main.command()
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
def serve(model_dir, memories_dir, **options) -> None:
    """Serve MODEL_DIR's task memories over an OpenAI-compatible HTTP API until interrupted.

    POST /v1/chat/completions (model = a memory's name; text and data: image URLs; stream), GET /v1/models,
    GET /health. Needs the [serve] extra.
    """
    from .serve.main import serve_command

    serve_command(model_dir, memories_dir, **options)


@main.command("eval")
@click.argument("demos_dir", type=click.Path(path_type=Path))
@click.argument("test_dir", type=click.Path(path_type=Path))
@model_option
@click.option("--json", "json_out", type=click.Path(path_type=Path, allow_dash=True), default=None,
              help="Write the report as one JSON object to this file ('-': stdout, instead of the table).")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Draw accuracy against memory size (MB) and against kept fraction, a line per policy (.png).")
@click.option("--delta", type=float, default=None, help="EMLoC JS tolerance in nats [default: the compiler's].")
@click.option("--ratios", callback=_ratios, default=None, help="EMLoC candidate keep ratios [default: the compiler's].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, help="Demonstrations per chunk [default: 4].")
@click.option("--policy", default=None, help="Main compile policy: its POLICY-fp32/-int8 are default conditions and "
                                             "it sizes uniform-int8 [default: the compiler's].")
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
def eval_command(demos_dir, test_dir, model, json_out, plot, delta, ratios, chunk_size, policy, sweep, limit,
                 conditions, backend, weights, provider, threads, device, max_new_tokens, question, quiet) -> None:
    """Answer the items in TEST_DIR with each kind of context built from DEMOS_DIR and compare.

    Conditions: zero-shot (no demos), full-context (all demos, nothing pruned, fp32), POLICY-PRECISION
    (the demos compiled with a registered policy, stored fp32/fp16/int8, e.g. emloc-int8), uniform-int8
    (one keep ratio in every layer, sized like the main policy's int8 memory). Queries are answered by
    the exported model under ONNX Runtime with the memory files compile writes (--backend ort) or by
    PyTorch. Reports accuracy (exact match), memory bytes and precision, kept tokens, median ms per
    query, TTFT and tokens/s (ort), mean JS divergence of the first answer token to full-context, and
    compile time. TEST_DIR has the layout of a demos folder. Needs the [compile] extra (torch,
    transformers; matplotlib for --plot).
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
                          sweep=sweep or None, backend=backend, weights=weights, provider=provider, threads=threads,
                          device=device, limit=limit, max_new_tokens=max_new_tokens, question=question, progress=bar)
    if json_out is not None and not to_stdout:
        report.write_json(json_out)
    if plot is not None:
        report.write_plot(plot)
    click.echo(json.dumps(report.to_dict(), allow_nan=False) if to_stdout else report.table())


def _default_policy() -> str:
    from .compile.compressor import CompileOptions

    return CompileOptions().policy


def _default_export() -> Path:
    """The embedded model's exported folder; exported once here if missing and torch is installed."""
    import importlib.util

    from .errors import BadInputError
    from .models.default_model import default_export_dir
    from .runtime.model_folder import MANIFEST

    folder = default_export_dir()
    if (folder / MANIFEST).is_file():
        return folder
    if importlib.util.find_spec("torch") is None:
        raise BadInputError(f"{folder}: the embedded model is not exported yet; run `emloc-edge export` on a "
                            "machine with the [compile] extra and copy the folder here, or give --model")
    from .export.api import export_model

    click.echo(f"exporting the embedded model to {folder} (once, under a minute):", err=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _StepLines() as steps:
        export_model(_model_or_default(None), folder, weights="int8", progress=steps)
    return folder


class _ProgressBar:
    """tqdm over layer decisions (chunks × layers), labelled with the current chunk."""

    def __init__(self, disable: bool) -> None:
        self.disable = disable
        self.bar = None

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def chunk(self, index: int, total: int, demos: int, layers: int) -> None:
        if self.disable:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total * layers, unit="layer", desc="compiling", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_description(f"chunk {index + 1}/{total} ({demos} demos)")

    def layer(self) -> None:
        if self.bar is not None:
            self.bar.update(1)


def _kept_line(s: dict) -> str:
    kept = s["kept_tokens_per_layer"]
    mean = sum(kept) / len(kept) if kept else 0.0
    return f"{s['context_tokens']} context tokens -> {mean:.1f} kept per layer (mean; min {min(kept)}, max {max(kept)})"


def _compile_text(s: dict) -> str:
    return "\n".join([
        f"compiled {s['demos']} demos in {s['chunks']} chunks with {s['model']}",
        _kept_line(s),
        f"compression {100 * s['compression']:.1f}% of the context, {s['precision']} "
        f"-> {s['output']} ({_size(s['file_bytes'])}) in {s['seconds']:.1f} s",
    ])


def _inspect_text(path: Path, s: dict) -> str:
    kept = s["kept_tokens_per_layer"]
    rows = [
        ("file", f"{path} ({_size(s['file_bytes'])}, format v{s['format_version']})"),
        ("model", f"{s['model']} ({s.get('model_family', '?')}, {s['num_layers']} layers)"),
        ("demos", f"{s['demos']} in {s['chunks']} chunks"),
        ("context", _kept_line(s)),
        ("compression", f"{100 * s['compression']:.1f}% of the context"),
        ("kept per layer", " ".join(str(k) for k in kept)),
        ("position offset", str(s["position_offset"])),
        ("precision", s["precision"]),
        ("settings", f"delta {s['delta']}, ratios {s['ratios']}, chunk size {s.get('chunk_size')}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    main()
