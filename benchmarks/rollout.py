"""Rollout speed of transformers' generation options on the real pair, side by side in one run.

    python benchmarks/rollout.py [--models gemma-3-270m,smollm2-135m-instruct] [--lengths 64,256]
        [--batch-size 4] [--options dynamic,static,static+compile] [--threads 2] [--json]

Each model (float32, CPU, from ``$CTOPD_REAL_MODELS``) samples ``--batch-size`` GSM8K prompts
(``$CTOPD_GSM8K``, under its chat template; Gemma-3-270m with the template of
``examples/real_pair``) through :class:`ctopd.training.rollout_engine.HFRolloutEngine` at
temperature 1, with its end-of-turn ids, for each length and each option:

- ``dynamic``: today's path, ``generate`` with its default dynamic KV cache;
- ``static``: ``cache_implementation="static"`` (a preallocated KV cache);
- ``static+compile``: the static cache and ``torch.compile`` of the decoding forward
  (``CompileConfig`` with ``_compile_all_devices``: generate compiles on CPU only when asked);
- ``chunked-prefill``: ``prefill_chunk_size=16`` (the prompt prefilled in slices).

Every option runs once untimed (4 new tokens; the full length for ``static+compile``, whose
warm-up is its compilation), then
``--repeats`` timed runs from the same seed. ``same ids`` is the share of the timed run's tokens
equal to the ``dynamic`` run's under the same seed (a different cache changes float rounding, so
a long sample may fork; the distribution is tested in ``tests/training/test_sampling.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "dynamic": {},
    "static": {"cache_implementation": "static"},
    "static+compile": {"cache_implementation": "static", "compile": True},
    "chunked-prefill": {"prefill_chunk_size": 16},
}


def generate_options(option: str) -> dict:
    """``GenerationConfig`` fields of an option (``compile`` becomes a ``CompileConfig``)."""
    from transformers import CompileConfig

    fields = dict(OPTIONS[option])
    if fields.pop("compile", False):
        compile_config = CompileConfig(mode="default")  # reduce-overhead means CUDA graphs
        compile_config._compile_all_devices = True  # generate compiles off-GPU only when told
        fields["compile_config"] = compile_config
    else:
        fields["disable_compile"] = True
    return fields


def load(name: str, batch_size: int):
    """The model, its prompts (``batch_size`` ids lists), end ids, pad id and id count."""
    from ctopd.core.byte_table import end_of_turn_ids
    from ctopd.training.config import DataConfig, ModelConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.models import load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import count_token_ids

    folder = Path(os.environ.get("CTOPD_REAL_MODELS", ROOT / "models" / "real-pair")) / name
    if not (folder / "config.json").is_file():
        sys.exit(f"rollout.py: no model at {folder} (set CTOPD_REAL_MODELS)")
    template = ROOT / "examples" / "real_pair" / "gemma3_chat_template.jinja"
    config = ModelConfig(
        str(folder), dtype="float32", chat_template=str(template) if "gemma" in name else None
    )
    tokenizer = load_model_tokenizer(config, side="student")
    model = load_causal_lm(config, side="student").eval()
    data = DataConfig(
        path=os.environ.get("CTOPD_GSM8K", str(ROOT.parent / "shared/data/gsm8k/train.jsonl")),
        prompt_field="question",
        answer_field="answer",
        limit=batch_size,
    )
    prompts = encode_prompts(tokenizer, load_examples(data), side="student")
    return (
        model,
        prompts,
        end_of_turn_ids(tokenizer),
        tokenizer.pad_token_id,
        count_token_ids(tokenizer),
    )


def run(model, prompts, end_ids, pad_id, num_ids, length: int, option: str, seed: int):
    """One timed rollout: ``(seconds, response ids)``."""
    from ctopd.training.rollout_engine import HFRolloutEngine

    engine = HFRolloutEngine(
        model,
        end_ids=end_ids,
        pad_id=pad_id,
        max_new_tokens=length,
        temperature=1.0,
        num_ids=num_ids,
        generate_options=generate_options(option),
    )
    torch.manual_seed(seed)
    start = time.perf_counter()
    rollout = engine.generate(prompts)
    return time.perf_counter() - start, rollout.response_ids


def same_share(responses: list[list[int]], reference: list[list[int]]) -> float:
    """Share of ``reference``'s tokens matched position by position in ``responses``."""
    matched = sum(sum(a == b for a, b in zip(r, q)) for r, q in zip(responses, reference))
    return matched / max(1, sum(len(q) for q in reference))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gemma-3-270m,smollm2-135m-instruct")
    parser.add_argument("--lengths", default="64,256")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--options", default="dynamic,static,static+compile")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    options = args.options.split(",")
    if "dynamic" not in options or set(options) - set(OPTIONS):
        parser.error(f"--options: among {', '.join(OPTIONS)}, with dynamic (the reference)")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    results = []
    for name in args.models.split(","):
        model, prompts, end_ids, pad_id, num_ids = load(name, args.batch_size)
        for length in [int(n) for n in args.lengths.split(",")]:
            reference = None
            for option in options:
                setting = (model, prompts, end_ids, pad_id, num_ids, length, option)
                # Compilation needs the very shapes; the others only a first call.
                warm_length = length if "compile" in option else min(4, length)
                warm_seconds, _ = run(*setting[:-2], warm_length, option, seed=1)
                timed = [run(*setting, seed=0) for _ in range(args.repeats)]
                seconds = min(s for s, _ in timed)
                responses = timed[0][1]
                reference = responses if option == "dynamic" else reference
                tokens = sum(len(r) for r in responses)
                results.append(
                    dict(
                        model=name,
                        new_tokens=length,
                        option=option,
                        seconds=seconds,
                        warmup_seconds=warm_seconds,
                        tokens=tokens,
                        tokens_per_second=tokens / seconds,
                        same_ids=same_share(responses, reference),
                    )
                )
                print(json.dumps(results[-1]), file=sys.stderr)
        del model
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"batch {args.batch_size}, float32, CPU, {args.threads} threads, temperature 1; "
        f"best of {args.repeats} after one warm-up"
    )
    print(
        "| model | new tokens | option | seconds | tokens/s | vs dynamic | warm-up s | same ids |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for r in results:
        key = (r["model"], r["new_tokens"])
        base.setdefault(key, r["seconds"])
        print(
            f"| {r['model']} | {r['new_tokens']} | {r['option']} | {r['seconds']:.2f} | "
            f"{r['tokens_per_second']:.1f} | {base[key] / r['seconds']:.2f}x | "
            f"{r['warmup_seconds']:.1f} | {100 * r['same_ids']:.0f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
