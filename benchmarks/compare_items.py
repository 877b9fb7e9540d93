"""Pair two benchmark rows answered on the same queries, item by item: lost, won, the exact sign test.

    python benchmarks/compare_items.py A.json#press=adakv,target_kept=0.433 B.json#policy=emloc-context,precision=int8

Each side is a JSON file written by compile_benchmark.py, kvpress_peers.py or `emloc-edge eval --json`
(its conditions: '#name=full-context'), then after '#' the row's fields to match (values compared as
text); 'full' names compile_benchmark's full context, 'run=NAME' one run of a results file that holds
several (benchmarks/results/*.json). Rows carry their per-query correctness ("correct_items") since
these scripts record it. Prints how many queries the
second side loses and wins against the first, and p (`emloc_edge/evaluate/paired.py`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emloc_edge.evaluate.paired import compare  # noqa: E402


def correct_items(spec: str) -> list[bool]:
    """The per-query correctness of the row `spec` (FILE#field=value,... or FILE#full) names."""
    path, _, selector = spec.partition("#")
    data = json.loads(Path(path).read_text())
    fields = [f for f in selector.split(",") if f]
    wanted = dict(f.split("=", 1) for f in fields if "=" in f)
    if "run" in wanted:  # a results file that holds several runs
        data = data["runs"][wanted.pop("run")]
    if "full" in fields:
        return data["correct_items_full_context"]
    candidates = data.get("rows", data.get("conditions", []))  # a benchmark's rows, or an eval report's conditions
    rows = [r for r in candidates if all(str(r.get(k)) == v for k, v in wanted.items())]
    if len(rows) != 1:
        raise SystemExit(f"{spec}: {len(rows)} rows match (want 1)")
    if "correct_items" not in rows[0]:
        raise SystemExit(f"{spec}: the row has no correct_items (written before they were recorded)")
    return rows[0]["correct_items"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", help="FILE#field=value,... (or FILE#full)")
    ap.add_argument("other", help="FILE#field=value,... (or FILE#full)")
    args = ap.parse_args()
    reference, other = correct_items(args.reference), correct_items(args.other)
    paired = compare(reference, other)
    print(f"{sum(reference)}/{len(reference)} -> {sum(other)}/{len(other)}: {paired.describe()}")


if __name__ == "__main__":
    main()
