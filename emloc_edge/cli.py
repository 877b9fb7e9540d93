"""`emloc-edge`: thin click commands over the Python API.

Bad input of any kind ends in one line on stderr and exit code 2 (set EMLOC_EDGE_DEBUG=1 for the
traceback). Torch-using stages are imported inside the commands that need them, so `--help` and the
torch-free commands start fast.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from . import __version__
from .cli_common import (  # noqa: F401  (EXIT_*, FLAGS, _one_line: part of the CLI module's surface)
    EXIT_BAD_INPUT, EXIT_EXPORT_BUG, FLAGS, _emit, _model_or_default, _one_line, _ratios, handle_errors, json_option,
    model_option,
)
from .cli_serving import eval_command, serve
from .compile.policy import DEFAULT_POLICY, FORCES, PAPER_RATIOS, POLICIES, default_ratios
from .textout import comma_list, human_size as _size

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




@main.command()
@click.argument("demos_dir", type=click.Path(path_type=Path))
@model_option
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Memory file to write [default: task.emloc, or the --append file].")
@click.option("--delta", type=float, default=None, help="JS divergence tolerance in nats [default: 0.005].")
@click.option("--ratios", callback=_ratios, default=None,
              help=f"Candidate keep ratios, smallest first [default: the policy's own: "
                   f"{comma_list(default_ratios(DEFAULT_POLICY))} for {DEFAULT_POLICY}, the paper's "
                   f"{comma_list(PAPER_RATIOS)} for the others].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, help="Demonstrations per chunk, for the chunk-wise policies [default: 4].")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default=None,
              help="How K/V are stored [default: int8].")
@click.option("--append", type=click.Path(path_type=Path), default=None,
              help="Compress the demos as further chunks of this memory (its chunks stay as they are).")
@click.option("--question", default=None, help="Question for folder-per-answer demos (else DEMOS_DIR/task.json).")
@click.option("--policy", type=click.Choice(list(POLICIES)), default=None,
              help="Layer budget policy [default: emloc-context, one search and one budget over the whole "
                   "context; emloc: chunk-wise; emloc-paper: the authors' search; uniform: one ratio].")
@click.option("--forced", type=click.Choice(FORCES), default=None,
              help="Answer-span tokens every layer keeps [default: answer, the whole span: the newline opening "
                   "the turn, the answer, the end-of-turn; answer+end: without the newline; content: the answer's "
                   "own tokens only, smaller memories where the task allows: check on a validation split].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the compiler runs (torch); auto: CUDA when torch sees a GPU.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
@handle_errors
def compile(demos_dir: Path, model: Path | None, output: Path | None, delta: float | None,
            ratios: tuple[float, ...] | None, chunk_size: int | None, precision: str | None, append: Path | None,
            question: str | None, policy: str | None, forced: str | None, device: str, quiet: bool,
            as_json: bool) -> None:
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
            forced=forced,
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
def run(images: tuple[Path, ...], memory_path: Path, model_dir: Path | None, question: str | None,
        prompts: tuple[str, ...], max_new_tokens: int, provider: str, threads: int, memory_inputs: str,
        as_json: bool) -> None:
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


def _chunks(s: dict) -> str:
    """'2 chunks'; a chunk record holding no demonstration (emloc-context's first token, stored with its
    own int8 scales) is named for what it is rather than counted as a chunk."""
    segments = sum(1 for c in s.get("chunk_details") or [] if c.get("demos") == 0)
    n = s["chunks"] - segments
    text = f"{n} chunk" if n == 1 else f"{n} chunks"
    if segments == 1:
        return f"{text} + the first token's own segment"
    return f"{text} + {segments} segments without demos" if segments else text


def _compile_text(s: dict) -> str:
    return "\n".join([
        f"compiled {s['demos']} demos in {_chunks(s)} with {s['model']}",
        _kept_line(s),
        f"compression {100 * s['compression']:.1f}% of the context, {s['precision']} "
        f"-> {s['output']} ({_size(s['file_bytes'])}) in {s['seconds']:.1f} s",
    ])


def _forced_text(s: dict) -> str:
    """', forced answer+end' when the memory was compiled with a non-default forced-token set."""
    return f", forced {s['forced']}" if s.get("forced") else ""


def _inspect_text(path: Path, s: dict) -> str:
    kept = s["kept_tokens_per_layer"]
    rows = [
        ("file", f"{path} ({_size(s['file_bytes'])}, format v{s['format_version']})"),
        ("model", f"{s['model']} ({s.get('model_family', '?')}, {s['num_layers']} layers)"),
        ("demos", f"{s['demos']} in {_chunks(s)}"),
        ("context", _kept_line(s)),
        ("compression", f"{100 * s['compression']:.1f}% of the context"),
        ("kept per layer", " ".join(str(k) for k in kept)),
        ("position offset", str(s["position_offset"])),
        ("precision", s["precision"]),
        ("settings", f"policy {s.get('policy')}{_forced_text(s)}, delta {s['delta']}, ratios {s['ratios']}, chunk size {s.get('chunk_size')}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


main.add_command(serve)  # cli_serving.py: the server and eval commands, kept apart so each file reads in one sitting
main.add_command(eval_command)

if __name__ == "__main__":
    main()
