"""The model card ``policy/README.md`` written with every export of ``python -m agents.ppo_kl``.

It opens with the YAML front matter the Hugging Face Hub reads (``base_model``, ``library_name``,
``tags``, ``license``, ``pipeline_tag``), plus a ``ppokl`` block with the iteration and timestep
counts the folder was exported at (for readers of the card; ``--resume`` decides whether the
export is current from the run's manifest, ``agents.cli.ownership.export_is_current``). The body gives the training command, every setting, the KL estimator, the final
training metrics and held-out evaluation, and the code version.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from agents.cli.formatting import rounded
from lmgym.assets import EMBEDDED_LM
from agents.metrics import EVAL_PREFIX, EVAL_SENTIMENT, TIME_PREFIX

PACKAGE = "lmgym-kl"
REPO = Path(__file__).resolve().parents[1]
# The Hub repository of the embedded model, and its licence.
EMBEDDED_BASE = ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
TAGS = ["text-generation", "reinforcement-learning", "ppo", "kl-regularization", "rlhf", "lmgym-kl"]


def kl_estimator(kl_reward: str, analytic_grad: bool, kl_loss: str | None) -> str:
    """The KL gradient estimator a run's flags add up to, named as in ``kl_estimators.ESTIMATOR_INFO``
    where they match one exactly (the reward part is PPO's clipped surrogate over r_t = -beta KL_t)."""
    named = {
        ("analytic", True, None): "analytic-future",
        ("none", True, None): "analytic-is (direct term only)",
        ("k1", False, None): "reinforce-future (k1 in the reward)",
        ("k3", False, None): "k3-reward",
        ("none", False, None): "none (no KL term)",
    }
    if (kl_reward, analytic_grad, kl_loss) in named:
        return named[kl_reward, analytic_grad, kl_loss]
    parts = [f"{kl_reward} in the reward"]
    if analytic_grad:
        parts.append("the exact per-position KL differentiated in the loss (analytic_grad)")
    if kl_loss:
        parts.append(f"{kl_loss} differentiated in the loss")
    return " + ".join(parts)


def _git(*args: str) -> str:
    """The output of a git command in the package's checkout ("" if that is not a git checkout)."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def code_version() -> str:
    """``lmgym-kl <version>`` and, in a git checkout, ``git <commit>`` (``-dirty`` if tracked files changed)."""
    try:
        version = f"{PACKAGE} {importlib.metadata.version(PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        version = f"{PACKAGE} (not installed)"
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return version
    dirty = "-dirty" if _git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{version}, git {commit}{dirty}"


def _base_model(model: str) -> tuple[str | None, str]:
    """The Hub id of the base model (None for a local folder) and the licence to declare."""
    if model == EMBEDDED_LM:
        return EMBEDDED_BASE
    if Path(model).exists():
        return None, "other"
    return model, "other"


def _table(rows: Mapping[str, Any], rounded_values: bool = False) -> str:
    lines = ["| | |", "|---|---|"]
    lines.extend(f"| `{key}` | {rounded(key, value) if rounded_values else value} |" for key, value in rows.items())
    return "\n".join(lines)


def model_name(model: str) -> str:
    """A readable name for ``model``: the embedded model's Hub name, a Hub id, or a local folder's name."""
    if model == EMBEDDED_LM:
        return EMBEDDED_BASE[0].split("/")[-1]
    return Path(model).name if Path(model).exists() else model


def model_card(args: Any, metrics: list[dict[str, str]], n_iterations: int, num_timesteps: int, command: list[str]) -> str:
    """The card's Markdown for a run with arguments ``args`` (``agents.cli.config.Args``), its metrics.csv
    rows ``metrics``, exported after ``n_iterations`` iterations; ``command`` gives the run's
    settings as flags (``agents.cli.config.command_line``)."""
    settings = {key: value for key, value in dataclasses.asdict(args).items() if key != "resume"}
    base, licence = _base_model(args.model)
    estimator = kl_estimator(args.kl_reward, args.analytic_grad, args.kl_loss)
    front = {
        **({"base_model": base} if base else {}),
        "library_name": "transformers",
        "license": licence,
        "pipeline_tag": "text-generation",
        "tags": TAGS,
        "ppokl": {"iterations": n_iterations, "timesteps": num_timesteps, "kl_estimator": estimator},
    }
    last = metrics[-1] if metrics else {}
    final = {k: v for k, v in last.items() if v not in ("", None) and not k.startswith((TIME_PREFIX, EVAL_PREFIX))}
    evaluations = [row for row in metrics if row.get(EVAL_SENTIMENT) not in (None, "")]
    evaluation = {k: v for k, v in (evaluations[-1] if evaluations else {}).items() if k == "iteration" or k.startswith(EVAL_PREFIX)}
    licence_note = (
        "the base model's licence" if base is None else f"`{licence}`, the licence of the base model [{base}](https://huggingface.co/{base})"
    )
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {model_name(args.model)} fine-tuned with PPO and a KL penalty ({estimator.split(' (')[0]})",
        f"Run `{Path(args.out).name}`, exported after {n_iterations} iterations.",
        f"Trained with `python -m agents.ppo_kl` ({PACKAGE}) on IMDBContinuation-v0: continue a movie review "
        f"so that the reward model `{args.reward}` scores it positive, with a KL penalty of weight beta = "
        f"{args.kl_coef} to the base model. Weights: {licence_note}.",
        "## Use\n\n```python\nfrom transformers import pipeline\n\n"
        'generator = pipeline("text-generation", model="path/to/this/folder")\n'
        'print(generator("This movie was", max_new_tokens=48)[0]["generated_text"])\n```',
        f"## Training\n\nCommand (every setting that differs from the defaults):\n\n"
        f"```\npython -m agents.ppo_kl {shlex.join(command)}\n```\n\n"
        f"KL estimator: **{estimator}**. Exported after {n_iterations} PPO iterations ({num_timesteps} timesteps).\n\n"
        "Settings:\n\n" + _table(settings),
        "## Final metrics\n\nTraining (last iteration):\n\n" + (_table(final, rounded_values=True) if final else "none recorded")
        + "\n\nHeld-out evaluation (last evaluated iteration):\n\n" + (_table(evaluation, rounded_values=True) if evaluation else "none (--eval-every 0)"),
        f"## Code version\n\n{code_version()}",
    ]
    return "\n\n".join(sections) + "\n"


def exported_at(policy: Path) -> dict[str, Any] | None:
    """The ``ppokl`` block of ``policy/README.md`` (None if there is no readable card)."""
    card = policy / "README.md"
    if not card.is_file():
        return None
    try:
        text = card.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return None
    try:
        front = yaml.safe_load(text[4 : text.index("\n---", 4)])
    except yaml.YAMLError:
        return None
    block = front.get("ppokl") if isinstance(front, dict) else None
    return block if isinstance(block, dict) else None
