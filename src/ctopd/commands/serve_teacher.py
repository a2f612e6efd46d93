"""``ctopd serve-teacher``: serve a transformers model's prompt log-probs the way vLLM does, for
``ctopd train --teacher-url`` (see :mod:`ctopd.training.teachers.server`).

Examples:
    ctopd serve-teacher --model runs/teacher/final                  # http://127.0.0.1:8000/v1
    CTOPD_TEACHER_API_KEY=secret ctopd serve-teacher --model T --port 0   # any free port
    ctopd train --teacher T --teacher-url http://127.0.0.1:8000/v1 --student S --data d.jsonl
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

API_KEY_ENV = "CTOPD_TEACHER_API_KEY"


def add_parser(subparsers) -> None:
    """Register ``serve-teacher``."""
    text = "serve a teacher's prompt log-probs (vLLM's completions API subset)"
    parser = subparsers.add_parser("serve-teacher", help=text, description=text, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="model folder or hub id (and tokenizer)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="name in /v1/models and requests (default: --model)",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16")
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import torch

    from ctopd.core.pair import load_tokenizer
    from ctopd.training.config import ConfigError, ModelConfig
    from ctopd.training.models import freeze, load_causal_lm
    from ctopd.training.teachers.server import ScoringModel, TeacherHTTPServer

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    if args.batch_size < 1:
        return _fail("--batch-size must be >= 1")
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else (args.device)
    )
    try:
        tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        model = freeze(
            load_causal_lm(
                ModelConfig(
                    name_or_path=args.model,
                    dtype=args.dtype,
                    trust_remote_code=args.trust_remote_code,
                ),
                side="teacher",
            )
        )
    except (ConfigError, OSError, ValueError) as err:
        return _fail(str(err))
    scorer = ScoringModel(
        model.to(device),
        tokenizer,
        batch_size=args.batch_size,
        name=args.served_model_name or args.model,
    )
    try:
        server = TeacherHTTPServer((args.host, args.port), scorer, api_key=args.api_key)
    except OSError as err:
        return _fail(f"cannot listen on {args.host}:{args.port}: {err}")
    # SIGTERM stops serving cleanly (shutdown must come from another thread than serve_forever).
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without an API key", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"ctopd serve-teacher: {scorer.name} on http://{host}:{server.server_port}/v1 "
        f"({device}, {scorer.num_ids} ids, batch {args.batch_size}"
        f"{', API key required' if args.api_key else ''})",
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


def _fail(message: str) -> int:
    print(f"ctopd serve-teacher: error: {message}", file=sys.stderr)
    return 2
