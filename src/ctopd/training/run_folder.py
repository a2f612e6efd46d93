"""The run folder belongs to one run: checked, locked and (for ``--overwrite``) cleared before any
model loads, and compared with the checkpoint ``--resume`` continues (the rules:
:mod:`ctopd.training.runtime`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ctopd.training.checkpoint import PREFIX, STATE_FILE, check_checkpoint, resolve_resume
from ctopd.training.config import ConfigError, TrainConfig

# What a run writes into its folder; any of them means the folder holds a run.
RUN_RECORDS = ("config.yaml", "metrics.jsonl", "summary.json", "final")
# Also a run's, removed with it by --overwrite, but no run by themselves.
RUN_EXTRAS = ("tensorboard", "plots")
# Kept by --overwrite: the teacher's samples of `ctopd sft --sft.source teacher` cost a pass of
# the teacher over the data, and are reused when their count matches.
KEPT_CACHES = ("teacher_responses.jsonl",)
LOCK_FILE = ".lock"

# Fields a resumed run may change freely: they change neither the numbers a step computes nor
# the order of the data (how long the run goes, where and how often it saves, logs and
# evaluates, how a served teacher is reached, memory-only options). Every other field is
# compared with the saved config.yaml. max_steps and epochs stretch the learning-rate schedule:
# training on past the planned end is what they are for.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "max_steps",
        "epochs",
        "save_every",
        "keep_checkpoints",
        "resume",
        "resume_changed",
        "overwrite",
        "eval_data",
        "eval_every",
        "eval_max_new_tokens",
        "eval_limit",
        "log_every",
        "report_to",
        "run_name",
        "progress",
        "gradient_checkpointing",
        "objective.slice_size",
        "teacher_server.url",
        "teacher_server.model",
        "teacher_server.api_key_env",
        "teacher_server.sequences_per_request",
        "teacher_server.max_concurrency",
        "teacher_server.timeout_seconds",
        "teacher_server.retries",
        "teacher_server.backoff_seconds",
        "teacher_server.overlap",
    }
)


class FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.lock``, held by the main process for the run's life.

    The kernel drops it when the process ends, however it ends (SIGKILL and out-of-memory
    kills included), so a crashed run never leaves a stale lock. The file keeps the holder's
    process id for the refusal message. Platforms without ``fcntl`` run unlocked.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.handle = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            ConfigError: another live process holds it (its id is named).
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"{self.path.parent} is in use by another ctopd run (process "
                f"{holder}); wait for it to end or stop it, or choose another "
                "--output-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def make_output_dir(folder: Path) -> None:
    """Create the run folder, or say in one line why it cannot be a folder this run writes to.

    Raises:
        ConfigError: a file stands where the folder (or one above it) should be, or the folder
            cannot be created or written (read-only, no permission).
    """
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(
            f"output_dir {folder} cannot be created: {blocker} is a file, not a "
            "folder; choose another --output-dir"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"output_dir {folder} is not writable ({err.strerror or err}); choose "
            "a folder you can write to with --output-dir"
        ) from None


def run_records(folder: Path) -> list[Path]:
    """What a run left in ``folder``: its records and checkpoints (``.tmp`` leftovers too)."""
    if not folder.is_dir():
        return []
    found = [folder / name for name in RUN_RECORDS if (folder / name).exists()]
    return found + sorted(folder.glob(f"{PREFIX}*"))


def claim_folder(
    config: TrainConfig, mode: str, lock: FolderLock, *, num_processes: int
) -> tuple[str | None, list[str]]:
    """Main process, before any model loads: make the run folder, lock it, and check it
    against ``--resume`` / ``--overwrite`` (removing the old run for ``--overwrite``).

    Returns:
        ``(checkpoint to resume from or None, settings changed since it as "field: old → new")``.

    Raises:
        ConfigError: see :class:`Runtime`.
    """
    folder = Path(config.output_dir)
    make_output_dir(folder)
    lock.acquire()
    if config.resume:
        checkpoint = resolve_resume(config.resume, folder)
        check_checkpoint(checkpoint)
        changes = changed_settings(config, mode, checkpoint, num_processes=num_processes)
        if changes and not config.resume_changed:
            raise ConfigError(
                f"--resume: {checkpoint} was made with other settings that change "
                f"what the run computes: {'; '.join(changes)}; put them back, or "
                "pass --resume-changed to continue with the new ones"
            )
        if changes:
            print(f"ctopd {mode}: resuming with changed settings: {'; '.join(changes)}", flush=True)
        return str(checkpoint), changes
    records = run_records(folder)
    if records and not config.overwrite:
        raise ConfigError(
            f"{folder} already holds a run ({', '.join(p.name for p in records)}); "
            "pass --resume to continue it, or --overwrite to start over (removes "
            "them)"
        )
    if records:
        records += [folder / n for n in RUN_EXTRAS if (folder / n).exists()]
        kept = [n for n in KEPT_CACHES if (folder / n).exists()]
        print(
            f"ctopd {mode}: --overwrite: removing {', '.join(p.name for p in records)} from "
            f"{folder}"
            + (
                f" (keeping {', '.join(kept)}: the teacher's samples, reused when "
                "their count matches; delete it if the teacher or the sampling "
                "changed)"
                if kept
                else ""
            ),
            flush=True,
        )
        for path in records:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return None, []


def changed_settings(
    config: TrainConfig, mode: str, checkpoint: Path, *, num_processes: int
) -> list[str]:
    """Differences that change what the run computes, as ``"field: old → new"``, between this
    config and the one ``checkpoint`` was made with (``config.yaml`` beside it; the checkpoint's
    own process count and command). Fields a saved config lacks (an older ctopd) are not
    compared."""
    import yaml

    changes = []
    saved_path = checkpoint.parent / "config.yaml"
    if saved_path.is_file():
        old = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
        new = _flatten(config.to_dict())
        changes = [
            f"{key}: {old[key]} → {value}"
            for key, value in new.items()
            if key in old and key not in RESUMABLE_CHANGES and old[key] != value
        ]
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("command", mode) != mode:
        changes.append(f"command: ctopd {state['command']} → ctopd {mode}")
    if state.get("num_processes", num_processes) != num_processes:
        changes.append(f"number of processes: {state['num_processes']} → {num_processes}")
    return changes


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
