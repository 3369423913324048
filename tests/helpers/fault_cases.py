"""The damaged run directories ``--resume`` is tried on: one table that parametrises
``tests/test_agents_faults.py`` and is printed in docs/reliability.md (``fault_table``).

Each case starts from a copy of a finished 2-iteration tiny run, damages it with ``damage(out,
context)``, and runs ``python -m agents.ppo_kl ... --resume`` (``--iters 3``, or ``--iters 2`` for
the finish steps). ``exit_code`` 2 means one line, naming ``named``, and every file in the run
left as it was; exit 0 means the run was completed (checked per case by the tests).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass(frozen=True)
class FaultCase:
    id: str
    done: str  # what was done to the run directory (docs)
    result: str  # what the user gets (docs)
    damage: Callable[[Path, dict[str, Any]], None]
    named: str = ""  # the one-line error contains this
    exit_code: int = 2
    iters: int = 3


def _rewrite_checkpoint(out: Path, meta: Callable[[Any], Any] | None = None, tensors: Callable[[dict], None] | None = None, raw: str | None = None) -> None:
    """Rewrite checkpoint.safetensors with its JSON metadata and/or tensors changed."""
    path = out / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        data = {name: f.get_tensor(name) for name in f.keys()}
        text = f.metadata()["ppokl"]
    if tensors is not None:
        tensors(data)
    if raw is None:
        document = json.loads(text)
        raw = json.dumps(meta(document) if meta is not None else document)
    save_file(data, str(path), metadata={"ppokl": raw})


def _edit(key_path: str, value: Any = None, delete: bool = False) -> Callable[[Any], Any]:
    """A metadata edit: set (or delete) the key at a dotted path."""

    def edit(document: Any) -> Any:
        *parents, last = key_path.split(".")
        node = document
        for key in parents:
            node = node[key]
        if delete:
            del node[last]
        else:
            node[last] = value
        return document

    return edit


def _args(out: Path, **changes: Any) -> None:
    saved = json.loads((out / "args.json").read_text())
    (out / "args.json").write_text(json.dumps({**saved, **changes}))


def _shrink_optimizer_tensor(data: dict) -> None:
    name = next(n for n in sorted(data) if n.startswith("optimizer.") and n.endswith(".exp_avg") and data[n].numel() > 1)
    data[name] = data[name].flatten()[:-1].clone()


def _headerless_metrics(out: Path) -> None:
    lines = (out / "metrics.csv").read_text().splitlines(keepends=True)
    (out / "metrics.csv").write_text("".join(lines[1:]))


def _bad_progress(out: Path) -> None:
    text = (out / "sb3_logs" / "progress.csv").read_text().splitlines()
    header = text[0].split(",")
    column = header.index("time/total_timesteps")
    row = text[1].split(",")
    row[column] = "many"
    (out / "sb3_logs" / "progress.csv").write_text("\n".join([text[0], ",".join(row), *text[2:]]) + "\n")


def _checkpoint_dir(out: Path) -> None:
    (out / "checkpoint.safetensors").unlink()
    (out / "checkpoint.safetensors").mkdir()


def _policy_aside(out: Path) -> None:
    """The state a kill between the two renames of an export leaves."""
    (out / "policy").rename(out / ".policy.old")
    shutil.copytree(out / ".policy.old", out / ".policy.new")
    (out / ".policy.new" / "model.safetensors").write_bytes(b"partial")


FAULT_CASES: list[FaultCase] = [
    FaultCase("other-model", "checkpoint of a run on another model (its settings and args copy name it)",
              "refused: names `model`", lambda out, c: _rewrite_checkpoint(out, lambda m: _edit("run.model", c["other_model"])(_edit("settings.policy_kwargs.model", c["other_model"])(m))), "model"),
    FaultCase("config-hash", "checkpoint's model identity (config hash) differs from the model on disk",
              "refused: names `identity.config_sha256`", lambda out, c: _rewrite_checkpoint(out, _edit("identity.config_sha256", "0" * 64)), "config_sha256"),
    FaultCase("args-n-envs", "`args.json` edited: `n_envs` 2 -> 3", "refused: names `n_envs`", lambda out, c: _args(out, n_envs=3), "n_envs"),
    FaultCase("args-max-new-tokens", "`args.json` edited: `max_new_tokens` 3 -> 4", "refused: names `max_new_tokens`",
              lambda out, c: _args(out, max_new_tokens=4), "max_new_tokens"),
    FaultCase("args-kl-coef", "`args.json` edited: `kl_coef` 0.1 -> 0.5", "refused: names `kl_coef`", lambda out, c: _args(out, kl_coef=0.5), "kl_coef"),
    FaultCase("args-list", "`args.json` holds a JSON list", "refused: names `args.json`",
              lambda out, c: (out / "args.json").write_text("[1, 2]"), "args.json"),
    FaultCase("args-string-number", "`args.json` holds a string where a number belongs", "refused: names `args.json` and `n_envs`",
              lambda out, c: _args(out, n_envs="two"), "n_envs"),
    FaultCase("args-not-json", "`args.json` is not JSON", "refused: names `args.json`", lambda out, c: (out / "args.json").write_text("{"), "args.json"),
    FaultCase("args-deleted", "`args.json` deleted", "resumed with the checkpoint's copy of the arguments; `args.json` rewritten",
              lambda out, c: (out / "args.json").unlink(), exit_code=0),
    FaultCase("meta-list", "checkpoint metadata is a JSON list", "refused: names the file", lambda out, c: _rewrite_checkpoint(out, raw="[]"), "JSON object"),
    FaultCase("meta-string", "checkpoint metadata is a JSON string", "refused: names the file", lambda out, c: _rewrite_checkpoint(out, raw='"x"'), "JSON object"),
    FaultCase("meta-not-json", "checkpoint metadata is not JSON", "refused: \"not valid JSON\"", lambda out, c: _rewrite_checkpoint(out, raw="{"), "not valid JSON"),
    *[
        FaultCase(f"meta-missing-{key.replace('_', '-')}", f"checkpoint metadata without `{key}`", f"refused: names `{key}`",
                  (lambda key: lambda out, c: _rewrite_checkpoint(out, _edit(key, delete=True)))(key), key)
        for key in ("rng", "counters", "settings", "not_stored")
    ],
    FaultCase("counter-string", "a counter is a string (`n_iterations: \"2\"`)", "refused: names `counters.n_iterations`",
              lambda out, c: _rewrite_checkpoint(out, _edit("counters.n_iterations", "2")), "counters.n_iterations"),
    FaultCase("counter-extra", "an extra counter (`kl_reward`), which would have been set on the model", "refused: names `counters`",
              lambda out, c: _rewrite_checkpoint(out, _edit("counters.kl_reward", "none")), "counters"),
    FaultCase("setting-extra", "an unknown setting in the checkpoint", "refused: names `settings.bogus`",
              lambda out, c: _rewrite_checkpoint(out, _edit("settings.bogus", 1)), "settings.bogus"),
    FaultCase("negative-iterations", "`n_iterations` = -1", "refused: names `counters.n_iterations`; metrics.csv kept",
              lambda out, c: _rewrite_checkpoint(out, _edit("counters.n_iterations", -1)), "counters.n_iterations"),
    FaultCase("huge-iterations", "`n_iterations` = 10^12", "refused: counters disagree",
              lambda out, c: _rewrite_checkpoint(out, _edit("counters.n_iterations", 10**12)), "n_iterations"),
    FaultCase("huge-timesteps", "`num_timesteps` = 10^30", "refused: names `counters.num_timesteps`",
              lambda out, c: _rewrite_checkpoint(out, _edit("counters.num_timesteps", 10**30)), "num_timesteps"),
    FaultCase("bad-rng-tensor", "torch RNG state tensor replaced by 3 bytes", "refused: names `rng`",
              lambda out, c: _rewrite_checkpoint(out, tensors=lambda d: d.update({"rng.torch": torch.zeros(3, dtype=torch.uint8)})), "rng"),
    FaultCase("optimizer-shape", "an optimizer moment of the wrong shape", "refused: names the tensor",
              lambda out, c: _rewrite_checkpoint(out, tensors=_shrink_optimizer_tensor), "optimizer."),
    FaultCase("checkpoint-directory", "`checkpoint.safetensors` is a directory", "refused: \"is not a file\"; metrics.csv kept",
              lambda out, c: _checkpoint_dir(out), "not a file"),
    FaultCase("metrics-deleted", "`metrics.csv` deleted", "refused (no silent restart with a new evaluation): names `metrics.csv`",
              lambda out, c: (out / "metrics.csv").unlink(), "metrics.csv"),
    FaultCase("metrics-headerless", "`metrics.csv` without its header", "refused: names `metrics.csv`", lambda out, c: _headerless_metrics(out), "metrics.csv"),
    FaultCase("progress-malformed", "`sb3_logs/progress.csv` with a non-number timestep", "refused: names `progress.csv`",
              lambda out, c: _bad_progress(out), "progress.csv"),
    FaultCase("locked", "another process holds the run's lock", "refused: names the holder's pid", lambda out, c: None, "pid"),
    FaultCase("policy-missing", "`policy/` deleted after the last checkpoint", "`--resume` exports it again (same weights)",
              lambda out, c: shutil.rmtree(out / "policy"), exit_code=0, iters=2),
    FaultCase("policy-between-renames", "killed between the two renames of an export", "the previous `policy/` is put back; the partial one removed",
              lambda out, c: _policy_aside(out), exit_code=0, iters=2),
    FaultCase("curves-partial", "`curves.png` cut to 16 bytes", "`--resume` redraws it", lambda out, c: (out / "curves.png").write_bytes(b"\x89PNG" + b"\0" * 12),
              exit_code=0, iters=2),
]  # fmt: skip


def fault_table() -> str:
    """The Markdown table of ``FAULT_CASES`` for docs/reliability.md."""
    lines = ["| case | what was done to a finished run before `--resume` | what you get | exit |", "|---|---|---|---|"]
    lines.extend(f"| `{case.id}` | {case.done} | {case.result} | {case.exit_code} |" for case in FAULT_CASES)
    return "\n".join(lines)

