"""``python -m studies.lm_variance_policies``: the fixed policies of the LM gradient-variance study.

Three PPOKL policies trained with the CLI (``python -m agents.ppo_kl``, the LM study's base config
``configs/study_lm.yaml``, k1 in the reward, seed 0) at beta = 0.3, 0.1 and 0.03, which the LM
study found to end at about 0.75, 1.5 and 3.2 nats of KL(pi || pi_ref) per sequence. Each run
trains ``ITERS - 1`` iterations, its exported policy is copied to ``<run>/behaviour`` (the
behaviour policy mu of the off-policy measurement: pi one iteration, two Adam updates, earlier),
then it resumes to ``ITERS`` iterations, leaving ``<run>/policy``; the checkpoint is then deleted. Resumable: a finished step is
skipped. The commands are printed and appended to ``<run>.commands.txt`` beside the run (``log_paths``).

``--stale 1,5`` also exports the policy 5 iterations back (``<run>/behaviour-5``; 1 back stays
``behaviour``), and ``--seed 1`` trains another seed into ``k1-b<beta>-seed1``: the staleness levels
and training seeds ``studies.lm_variance_exact_run`` measures. A finished run cannot go back to
export an earlier iteration: that is refused (train into a new ``--root``).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from agents.cli.run_dir import CHECKPOINT, POLICY

REPO = Path(__file__).resolve().parents[1]
BETAS = (0.3, 0.1, 0.03)
ITERS = 20
BEHAVIOUR = "behaviour"


def run_dir(root: Path, beta: float, seed: int = 0) -> Path:
    return root / (f"k1-b{beta:g}" + (f"-seed{seed}" if seed else ""))


def behaviour_name(back: int) -> str:
    """The export folder of the policy ``back`` iterations before the last."""
    return BEHAVIOUR if back == 1 else f"{BEHAVIOUR}-{back}"


def command(config: Path, beta: float, out: Path, iters: int, resume: bool, seed: int = 0) -> list[str]:
    """The ``agents.ppo_kl`` command line of one training step."""
    flags = ["--config", str(config), "--kl-reward", "k1", "--no-analytic-grad", "--kl-coef", str(beta), "--seed", str(seed)]
    return [sys.executable, "-m", "agents.ppo_kl", *flags, "--out", str(out), "--iters", str(iters), *(["--resume"] if resume else [])]


def log_paths(out: Path) -> tuple[Path, Path]:
    """The command list and training log of the run ``out``: beside it, as ``<run>.commands.txt``
    and ``<run>.train.log`` (inside, they would make a new ``--out`` a folder that holds no run,
    which the CLI refuses)."""
    return out.with_name(out.name + ".commands.txt"), out.with_name(out.name + ".train.log")


def _run(cmd: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    commands, train_log = log_paths(out)
    text = " ".join(["python", *cmd[1:]])
    print(f"$ {text}", flush=True)
    with commands.open("a") as log:
        log.write(text + "\n")
    with train_log.open("a") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)


def train_policy(config: Path, beta: float, root: Path, seed: int = 0, stale: tuple[int, ...] = (1,)) -> Path:
    """Train (or finish) the policy at ``beta``; its run folder, holding ``policy`` and one
    ``behaviour_name(k)`` export per k in ``stale`` (iterations before the last)."""
    out = run_dir(root, beta, seed)
    missing = [k for k in stale if not (out / behaviour_name(k)).is_dir()]
    if missing and (out / "done").is_file():
        raise ValueError(f"{out} is finished; it cannot export the policy {missing[0]} iterations back (use a new --root)")
    for back in sorted(stale, reverse=True):
        if not (out / behaviour_name(back)).is_dir():
            _run(command(config, beta, out, ITERS - back, resume=(out / CHECKPOINT).is_file(), seed=seed), out)
            shutil.copytree(out / POLICY, out / behaviour_name(back))
    if not (out / "done").is_file():
        _run(command(config, beta, out, ITERS, resume=True, seed=seed), out)
        (out / "done").write_text("ok\n")
    (out / CHECKPOINT).unlink(missing_ok=True)  # 1.6 GB with the Adam state; the exports suffice
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.lm_variance_policies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/study_lm.yaml"))
    parser.add_argument("--root", type=Path, default=Path("runs/lm_variance"), help="one run folder per beta")
    parser.add_argument("--betas", type=lambda s: [float(x) for x in s.split(",")], default=list(BETAS))
    parser.add_argument("--seed", type=int, default=0, help="training seed (0: the committed runs' folders)")
    parser.add_argument("--stale", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1,),
                        help="iterations back of the behaviour exports, each in 1..ITERS-1")
    options = parser.parse_args(argv)
    if not all(1 <= k < ITERS for k in options.stale):
        print(f"error: --stale: each value must be in 1..{ITERS - 1}", file=sys.stderr)
        return 2
    if not options.config.is_file():
        print(f"error: --config: no such file {options.config}", file=sys.stderr)
        return 2
    for beta in options.betas:
        try:
            train_policy(options.config, beta, options.root, options.seed, options.stale)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except subprocess.CalledProcessError:
            train_log = log_paths(run_dir(options.root, beta, options.seed))[1]
            print(f"error: training failed, see {train_log}; rerun to resume", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
