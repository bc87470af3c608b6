"""``kdnctl warm CORPUS --model PATH``: compute the KV of a corpus's chunks and store it under content keys.

The corpus is a folder of ``.txt`` files or a JSONL file (see :mod:`connectors.hf.warm`). Connects to the controller
given by the parent parser's ``--controller`` / ``--token`` / ``--tenant`` / ``--config``; shows a progress bar on
stderr; prints a summary (``--json`` for scripts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kdn.errors import InvalidRequest

log = logging.getLogger(__name__)

__all__ = ["add_warm_parser", "cmd_warm", "load_model"]


def add_warm_parser(sub) -> None:
    """Add ``warm`` to ``kdnctl``'s subcommands (it opens its own connections)."""
    p = sub.add_parser("warm", help="precompute and store the chunk KV of a corpus (folder of .txt or JSONL)")
    p.add_argument("corpus", help="folder of .txt files or a JSONL file (text / extract / content per line)")
    p.add_argument("--model", required=True, help="Hugging Face model folder or .gguf file")
    p.add_argument("--model-id", help="model id in the KV layout (default: the model's name_or_path)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device to compute on (default cpu)")
    p.add_argument("--codec", help="codec of stored chunks (default: client.codec of the config)")
    p.add_argument("--batch", type=int, default=8, help="chunks per store round trip")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_warm, standalone=True)


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)`` from a folder or a ``.gguf`` file, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = Path(path)
    if not p.exists():
        raise InvalidRequest(f"model {path} does not exist")
    kwargs = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    where = str(p.parent if kwargs else p)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **kwargs)
    return model.to(device).eval(), tokenizer


def cmd_warm(args: argparse.Namespace) -> int:
    from connectors.hf import layout_for
    from connectors.hf.warm import warm
    from kdn.client import KDNClient
    from kdn.config import load_config

    config = load_config(args.config).client
    if args.controller:
        config.controller = args.controller
    if args.token is not None:
        config.token = args.token
    if args.tenant:
        config.tenant = args.tenant
    if args.codec:
        config.codec = args.codec
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    layout = layout_for(model, model_id=args.model_id)
    with KDNClient(layout, config) as client:
        if not client.refresh_nodes():
            raise InvalidRequest(f"no storage node registered at controller {config.controller}")
        report = warm(args.corpus, model, tokenizer, client, args.chunk_tokens, progress=not args.no_progress,
                      batch=args.batch)
    data = {"corpus": str(args.corpus), "model": layout.model_id, "tenant": config.tenant, **vars(report)}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"warm {args.corpus}: {report.documents} documents, {report.chunks} chunks ({report.tokens} tokens), "
              f"{report.stored} stored, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":  # pragma: no cover
    from kdn.cli.ctl import main

    sys.exit(main(["warm", *sys.argv[1:]]))
