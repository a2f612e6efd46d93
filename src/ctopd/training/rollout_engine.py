"""Where rollouts come from: one small seam between the loop and whatever generates.

The loop asks an engine for responses to its prompts and tells it when the weights changed:

- ``generate(prompt_ids, samples_per_prompt=..., logprobs=True)`` → a
  :class:`~ctopd.training.rollout.Rollout`: the sampled ids and each token's log-prob under the
  policy that drew it (temperature, top-k, top-p and the padded-row mask applied, exactly the
  issue-24 policy; ``logprobs=False`` skips them);
- ``refresh(model)`` after each optimiser step, so the next rollout samples the new policy.

``hf`` (:class:`HFRolloutEngine`) runs ``transformers``' ``generate`` on the live student, so
its ``refresh`` has nothing to do; ``hf_static`` is the same with a static KV cache. An engine
with its own copy of the weights (vLLM, a server) is a contained addition: a class with these two
methods, one entry in :data:`ROLLOUT_ENGINES` and in ``rollout.engine``'s choices; nothing else
in the loop changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Protocol

import torch

from ctopd.training.rollout import Rollout, generate_rollout


class RolloutEngine(Protocol):
    """What the loop needs from a generator (see the module docstring)."""

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        samples_per_prompt: int = 1,
        logprobs: bool = True,
    ) -> Rollout:
        """``B`` prompts (chat template applied) → ``B * samples_per_prompt`` responses,
        adjacent per prompt, with their log-probs unless ``logprobs=False``."""
        ...

    def refresh(self, model: torch.nn.Module) -> None:
        """Take the weights of ``model`` (after an optimiser step) for the next ``generate``."""
        ...


class HFRolloutEngine:
    """Rollouts with ``transformers``' ``generate`` on the live model (no copy of the weights).

    Args:
        model: the policy, or a zero-argument callable returning a context manager that yields
            a plain module ``generate`` can run (the loop's ``_generation_model``: DDP unwrapped,
            FSDP / ZeRO-3 parameters gathered for the duration).
        end_ids: end-of-turn ids; a response stops after the first.
        pad_id: id for the left-padded prompt batch.
        max_new_tokens: longest response (cut there, no end id).
        temperature, top_p, top_k: the sampling policy (``temperature=0``: greedy).
        num_ids: the tokenizer's id count; output rows from it on are never sampled.
        device: where the prompts go (the model's device).
        generate_options: extra ``GenerationConfig`` fields that change how ``generate`` runs,
            not what it samples (``{"cache_implementation": "static"}``).
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable[[], AbstractContextManager[torch.nn.Module]],
        *,
        end_ids: Sequence[int],
        pad_id: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_ids: int | None = None,
        device: torch.device | str = "cpu",
        generate_options: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(model, torch.nn.Module):
            self._policy = lambda: nullcontext(model)
        else:
            self._policy = model
        self.settings = dict(
            end_ids=list(end_ids),
            pad_id=pad_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_ids=num_ids,
            device=device,
            generate_options=dict(generate_options or {}),
        )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        samples_per_prompt: int = 1,
        logprobs: bool = True,
    ) -> Rollout:
        """Sample with the live weights; see :func:`ctopd.training.rollout.generate_rollout`."""
        with self._policy() as model:
            return generate_rollout(
                model,
                prompt_ids,
                samples_per_prompt=samples_per_prompt,
                logprobs=logprobs,
                **self.settings,
            )

    def refresh(self, model: torch.nn.Module) -> None:
        """Nothing to do: ``generate`` runs on the live model, which the optimiser updated."""


# rollout.engine name -> engine factory (every one takes HFRolloutEngine's keyword arguments).
# hf_static: generate with a preallocated KV cache instead of the dynamic one (docs/rollout.md):
# the same policy (tests/training/test_sampling.py), faster on the real pair on CPU.
ROLLOUT_ENGINES: dict[str, Callable[..., RolloutEngine]] = {
    "hf": HFRolloutEngine,
    "hf_static": partial(HFRolloutEngine, generate_options={"cache_implementation": "static"}),
}


def build_rollout_engine(name: str, model, **settings: Any) -> RolloutEngine:
    """The engine called ``name`` (``rollout.engine``) for ``model``; ``settings`` as
    :class:`HFRolloutEngine`'s keyword arguments.

    Raises:
        ValueError: an unknown engine name.
    """
    if name not in ROLLOUT_ENGINES:
        raise ValueError(
            f"unknown rollout engine {name!r}; choose one of {sorted(ROLLOUT_ENGINES)}"
        )
    return ROLLOUT_ENGINES[name](model, **settings)
