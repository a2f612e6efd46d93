"""Atomic checkpoints that resume exactly, and student exports that load with plain
``from_pretrained``.

A checkpoint folder ``OUTPUT_DIR/checkpoint-000040/`` holds

* ``state/`` — ``accelerator.save_state``: model weights, optimiser, scheduler and the RNG states
  of every rank (works under DDP, FSDP and DeepSpeed alike);
* ``student/`` — the student as a Hugging Face folder with its tokenizer and chat template
  (LoRA runs: the adapter, which ``from_pretrained`` also loads when ``peft`` is installed);
* ``trainer_state.json`` — step, data position (epoch, prompts consumed), counters.

It is written to ``checkpoint-000040.tmp/`` and renamed when complete, so a run killed while
saving leaves the previous checkpoint intact and only a ``.tmp`` folder that the next save removes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ctopd.training.config import ConfigError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` leftovers are ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.glob(f"{PREFIX}*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


class CheckpointError(ConfigError):
    """There is no checkpoint to resume from, or the one named is incomplete or damaged."""


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``latest`` (or ``true``) picks the newest in
    ``output_dir``; anything else is a folder. None when ``resume`` is unset (a new run).

    Raises:
        CheckpointError: ``resume`` is set but there is nothing to resume (a resumed run never
            quietly starts afresh).
        FileNotFoundError: ``resume`` names a folder that is not a checkpoint.
    """
    if not resume or resume.lower() in ("false", "no", "none"):
        return None
    if resume.lower() in ("latest", "true", "yes", "auto"):
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"--resume: {output_dir} holds no checkpoint to continue "
                "from; drop --resume to start a new run there (--overwrite "
                "if it holds one)"
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume: {resume!r} is not a checkpoint folder (no {STATE_FILE}); use --resume latest"
        )
    return path


def check_checkpoint(folder: Path) -> None:
    """Read the headers of a checkpoint's weight and optimiser files (not the tensors), so a
    file cut short (a full disk, a copy that stopped) is named before any model loads.

    Raises:
        CheckpointError: naming the damaged file and the checkpoints to fall back to.
    """
    import zipfile

    from safetensors import safe_open

    for path in sorted((folder / "state").rglob("*")) + sorted((folder / "student").rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix in (".bin", ".pt") and path.stat().st_size > 0:
                zipfile.ZipFile(path).close()  # torch.save files are zip archives
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CheckpointError(damaged(folder, path, err)) from None


def damaged(folder: Path, path: Path, err: BaseException) -> str:
    """One line: which file of which checkpoint is damaged, and what to resume from instead."""
    others = [str(p) for p in list_checkpoints(folder.parent) if p != folder]
    instead = (
        f"resume from an earlier one with --resume {others[-1]}"
        if others
        else "there is no earlier checkpoint; start over with --overwrite"
    )
    return f"checkpoint {folder} is damaged: {path.relative_to(folder)}: {err}; {instead}"


def export_student(
    accelerator: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    folder: Path,
    *,
    end_ids: list[int],
    merge_lora: bool = False,
) -> None:
    """Save the student as a Hugging Face folder (collective: every rank must call it).

    Args:
        accelerator: the run's ``Accelerator``.
        model: the prepared student.
        tokenizer: the student tokenizer (its chat template is saved with it).
        folder: destination.
        end_ids: written as the generation config's ``eos_token_id`` so a plain ``generate``
            stops at the end of the turn.
        merge_lora: fold LoRA adapters into the weights first (for the final model; this
            changes ``model`` in place).
    """
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    if merge_lora and hasattr(unwrapped, "merge_and_unload"):
        unwrapped = unwrapped.merge_and_unload()
        state_dict = unwrapped.state_dict()
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        generation = getattr(unwrapped, "generation_config", None)
        if generation is not None:
            generation.eos_token_id = list(end_ids)
            if getattr(tokenizer, "pad_token_id", None) is not None:
                generation.pad_token_id = tokenizer.pad_token_id
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    output_dir: str | Path,
    trainer_state: dict,
    *,
    end_ids: list[int],
    keep: int,
) -> Path:
    """Write ``checkpoint-{step}`` atomically and delete all but the newest ``keep``.

    Args:
        trainer_state: JSON-able run state; must hold ``step``.
    """
    final = checkpoint_dir(output_dir, int(trainer_state["step"]))
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # accelerate warns that the tied lm_head is stored once; it is restored through the tie.
    quiet = logging.getLogger("accelerate.utils.other")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp / "state"))
    finally:
        quiet.setLevel(level)
    export_student(accelerator, model, tokenizer, tmp / "student", end_ids=end_ids)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, folder: Path) -> dict:
    """Restore model, optimiser, scheduler and RNG states; returns the trainer state.

    Raises:
        CheckpointError: a file of the checkpoint cannot be read (the message names it).
    """
    try:
        accelerator.load_state(str(folder / "state"))
        return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as err:
        raise CheckpointError(damaged(folder, folder / "state", err)) from err
