"""``python -m agents.ppo_kl``: PPO fine-tuning on IMDBContinuation-v0 with exact KL handling.

    python -m agents.ppo_kl --analytic-grad --kl-reward analytic --iters 20 --out runs/analytic

Writes into ``--out`` (see ``agents.cli.run_dir``): ``metrics.csv``, ``checkpoint.safetensors``
(every ``--save-every`` iterations), ``policy/`` (the trained LM as a Hugging Face folder with a
model card, at the end), ``curves.png``, ``args.json`` and SB3's CSV and TensorBoard logs, under an
exclusive lock on ``--out``. ``--resume`` continues the run from its checkpoint exactly, once the
checkpoint, the run's settings, the model and the files have been checked against each other:
the rows written after it are dropped, the resumed iterations reproduce those of an
uninterrupted run with the same seed, and the finish steps (``agents.cli.finish``) are completed.
Errors are one line and exit 2; Ctrl-C is one line and exit 130 (docs/reliability.md).

NLPO (PPO with the actions restricted to the top-p nucleus of a masking policy that is a copy of
the policy synced every few iterations; see ``agents.rollout.masking``):

    python -m agents.ppo_kl --config configs/nlpo_demo.yaml --out runs/nlpo

Data-parallel on W processes (``--n-envs`` per rank; rank 0 writes; see ``agents.distributed``):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m agents.ppo_kl --n-envs 5 --out runs/ddp
"""
from __future__ import annotations

import signal
import sys

__all__ = ["main"]

_NOTHING_WRITTEN = "interrupted before the run started: nothing was written"


def _interrupted_at_start(signum: int, frame: object) -> None:
    """Ctrl-C while the modules are imported: one line and exit 130, not a traceback."""
    print(_NOTHING_WRITTEN, file=sys.stderr)
    raise SystemExit(130)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags (exit 2 on a bad one, before any model library loads), then train.

    Args:
        argv: the command line without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, 2 after a one-line error, 130 after Ctrl-C.
    """
    previous = signal.signal(signal.SIGINT, _interrupted_at_start)
    try:
        from agents.cli.config import parse_args

        args = parse_args(argv)
        from agents.cli.train import run  # torch, transformers and SB3 load here
    except OSError as error:  # a flag's path the system refuses (too long, not readable, ...)
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: the --config file is nested too deeply", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)  # Ctrl-C is KeyboardInterrupt from here on
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
