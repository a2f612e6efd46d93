"""Loading the student and the teacher: weights, tokenizer, chat template, LoRA.

A model is a ``from_pretrained`` folder (or hub id), or a GGUF file read by transformers' own GGUF
loader: dequantised to float on load, trained in float, and saved as a plain ``from_pretrained``
folder (:func:`drop_gguf_quantization`)."""

from __future__ import annotations

from typing import Any

import torch

from ctopd.core.pair import load_tokenizer
from ctopd.training.config import ConfigError, LoraConfig, ModelConfig
from ctopd.training.data import set_chat_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_tokenizer(config: ModelConfig, *, side: str) -> Any:
    """The model's fast tokenizer with a chat template that renders (override applied).

    Raises:
        ConfigError: no tokenizer.json, or no usable chat template.
    """
    source, gguf_file = config.location()
    try:
        if gguf_file is not None:
            from transformers import AutoTokenizer

            _check_gguf_installed(config)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        else:
            tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load the {side} tokenizer from {config.name_or_path!r}: {err}"
        ) from err
    set_chat_template(tokenizer, config.chat_template, side=side)
    if tokenizer.pad_token_id is None:
        # Padding is always masked; any id works, EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(config: ModelConfig, *, side: str) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the config's dtype and options; a GGUF
    checkpoint comes back dequantised, as a plain float model."""
    from transformers import AutoModelForCausalLM

    source, gguf_file = config.location()
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if gguf_file is not None:
        _check_gguf_installed(config)
        kwargs["gguf_file"] = gguf_file
    kwargs["dtype"] = "auto" if config.dtype == "auto" else DTYPES[config.dtype]
    if config.revision:
        kwargs["revision"] = config.revision
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load the {side} model from {config.name_or_path!r}: {err}"
        ) from err
    return drop_gguf_quantization(model) if gguf_file is not None else model


def drop_gguf_quantization(model: torch.nn.Module) -> torch.nn.Module:
    """Forget that ``model`` was read from a GGUF file. transformers dequantises GGUF weights to
    float when it loads them but keeps a GGUF quantisation config, and then refuses
    ``save_pretrained``; the weights are plain float tensors, so the config is dropped and the
    model saves (checkpoints, the exported student) as an ordinary ``from_pretrained`` folder."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _check_gguf_installed(config: ModelConfig) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"{config.name_or_path!r} is a GGUF checkpoint, which transformers reads "
            "with the gguf package: `pip install 'ctopd[gguf]'`"
        ) from err


def check_vocab(model: torch.nn.Module, tokenizer: Any, side: str) -> None:
    """The model must have an output row for every tokenizer id."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ConfigError(
            f"the {side} model has {rows} output rows but its tokenizer has "
            f"{len(tokenizer)} ids; they do not belong together"
        )


def add_lora(model: torch.nn.Module, config: LoraConfig) -> torch.nn.Module:
    """Wrap the student with LoRA adapters (``peft``)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as err:
        raise ConfigError("lora.enabled needs `pip install 'ctopd[lora]'` (peft)") from err
    targets = config.target_modules
    target_modules: Any = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def prepare_student(
    model: torch.nn.Module, *, gradient_checkpointing: bool, lora: LoraConfig
) -> torch.nn.Module:
    """Gradient checkpointing and LoRA, in the order ``peft`` expects."""
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    if lora.enabled:
        if gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, lora)
    model.train()
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model
