"""The damaged run directories ``--resume`` is tried on: one table that parametrises
``tests/test_agents_faults.py`` and is printed in docs/reliability.md (``fault_table``).

Each case starts from a copy of a finished 2-iteration tiny run, damages it with ``damage(out,
context)``, and runs ``python -m agents.ppo_kl ... --resume`` (``--iters 3``, or ``--iters 2`` for
the finish steps). ``exit_code`` 2 means one line, naming ``named``, and every file in the run
left as it was; exit 0 means the run was completed (checked per case by the tests).
"""
from __future__ import annotations

import json
import os
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


def _manifest(out: Path, **changes: Any) -> None:
    path = out / ".ppokl-run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _symlinked_policy(out: Path) -> None:
    elsewhere = out.parent / "elsewhere"
    shutil.move(out / "policy", elsewhere)
    (out / "policy").symlink_to(elsewhere)


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


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
    # issue 28: what the run owns, what it trusts, and where errors go
    FaultCase("reference-weights-changed", "the checkpoint's fingerprint of the reference model's weights differs from the model on disk",
              "refused: names the model and `identity.reference_sha256`", lambda out, c: _rewrite_checkpoint(out, _edit("identity.reference_sha256", "0" * 64)), "reference_sha256"),
    FaultCase("policy-weights-changed", "the checkpoint's fingerprint of the initial policy's weights differs", "refused: names the model and `identity.policy_sha256`",
              lambda out, c: _rewrite_checkpoint(out, _edit("identity.policy_sha256", "f" * 64)), "policy_sha256"),
    FaultCase("fingerprint-malformed", "a fingerprint that is not 64 hex digits", "refused: names `identity.policy_sha256`",
              lambda out, c: _rewrite_checkpoint(out, _edit("identity.policy_sha256", "xyz")), "identity.policy_sha256"),
    FaultCase("rng-python-malformed", "python's RNG state with an internal state of the wrong length", "refused: names `rng`",
              lambda out, c: _rewrite_checkpoint(out, _edit("rng.python", [3, [1, 2, 3], None])), "rng"),
    FaultCase("rng-numpy-malformed", "numpy's RNG state with a position past its key", "refused: names `rng`",
              lambda out, c: _rewrite_checkpoint(out, _edit("rng.numpy", ["MT19937", [1] * 624, 10**6, 0, 0.0])), "rng"),
    FaultCase("meta-nested", "checkpoint metadata nested 100 000 deep", "refused: names the checkpoint", lambda out, c: _rewrite_checkpoint(out, raw="[" * 100_000), "checkpoint.safetensors"),
    FaultCase("user-file-in-policy", "a user's `notes.txt` put into `policy/`", "refused (the export would replace the folder): names `policy/notes.txt`",
              lambda out, c: (out / "policy" / "notes.txt").write_text("mine"), "notes.txt"),
    FaultCase("policy-symlink", "`policy/` replaced by a symlink to a folder elsewhere", "refused: names `policy`; the folder it points to kept",
              lambda out, c: _symlinked_policy(out), "policy"),
    FaultCase("run-file-not-ours", "the manifest does not list `curves.png` (a user's file of that name)", "refused: names `curves.png`",
              lambda out, c: _manifest(out, created=["checkpoint.safetensors", "metrics.csv", "args.json", "policy", "sb3_logs"]), "curves.png"),
    FaultCase("manifest-not-json", "`.ppokl-run.json` is not JSON", "refused: names `.ppokl-run.json`", lambda out, c: (out / ".ppokl-run.json").write_text("{"), ".ppokl-run.json"),
    FaultCase("manifest-symlink", "`.ppokl-run.json` is a symlink", "refused: names `.ppokl-run.json`",
              lambda out, c: ((out / ".ppokl-run.json").rename(out.parent / "m.json"), (out / ".ppokl-run.json").symlink_to(out.parent / "m.json")), ".ppokl-run.json"),
    FaultCase("lock-symlink", "`.lock` is a symlink to a file outside `--out`", "refused: \"is a symlink\"; the file it points to unchanged",
              lambda out, c: ((out.parent / "precious").write_text("keep"), (out / ".lock").unlink(missing_ok=True), (out / ".lock").symlink_to(out.parent / "precious")), "symlink"),
    FaultCase("lock-fifo", "`.lock` is a FIFO", "refused without blocking: \"not a regular file\"", lambda out, c: _fifo(out / ".lock"), "regular file"),
    FaultCase("progress-fifo", "`sb3_logs/progress.csv` is a FIFO", "refused without blocking: names `progress.csv`", lambda out, c: _fifo(out / "sb3_logs" / "progress.csv"), "progress.csv"),
    FaultCase("metrics-fifo", "`metrics.csv` is a FIFO", "refused without blocking: names `metrics.csv`", lambda out, c: _fifo(out / "metrics.csv"), "metrics.csv"),
    FaultCase("metrics-long-field", "a 200 000-character field appended to `metrics.csv`", "refused (`csv.Error`): names `metrics.csv`",
              lambda out, c: _append(out / "metrics.csv", '"' + "x" * 200_000 + '"\n'), "metrics.csv"),
    FaultCase("metrics-not-utf8", "`metrics.csv` is not UTF-8", "refused: names `metrics.csv`", lambda out, c: (out / "metrics.csv").write_bytes(b"iteration\n\xff\n"), "metrics.csv"),
    FaultCase("user-files-kept", "a user's `notes.txt` and `.metrics.csv.backup` in `--out`", "resumed; both files kept (a run removes only its own temporaries)",
              lambda out, c: ((out / "notes.txt").write_text("mine"), (out / ".metrics.csv.backup").write_text("mine")), exit_code=0),
    FaultCase("export-weights-deleted", "`policy/model.safetensors` deleted (the card still says current)", "`--resume` exports again: every recorded file is checked",
              lambda out, c: (out / "policy" / "model.safetensors").unlink(), exit_code=0, iters=2),
    FaultCase("export-card-not-utf8", "`policy/README.md` is not UTF-8", "`--resume` exports again (was: every later resume blocked)",
              lambda out, c: (out / "policy" / "README.md").write_bytes(b"\xff\xfe"), exit_code=0, iters=2),
    FaultCase("swap-leftover-file", "`.policy.new` is a file", "removed; the export is current", lambda out, c: (out / ".policy.new").write_text("x"), exit_code=0, iters=2),
    FaultCase("swap-leftover-symlink", "`.policy.old` is a symlink to a folder outside `--out`", "the link removed, the folder it points to kept",
              lambda out, c: ((out.parent / "outside").mkdir(), (out / ".policy.old").symlink_to(out.parent / "outside")), exit_code=0, iters=2),
]  # fmt: skip


def fault_table() -> str:
    """The Markdown table of ``FAULT_CASES`` for docs/reliability.md."""
    lines = ["| case | what was done to a finished run before `--resume` | what you get | exit |", "|---|---|---|---|"]
    lines.extend(f"| `{case.id}` | {case.done} | {case.result} | {case.exit_code} |" for case in FAULT_CASES)
    return "\n".join(lines)

