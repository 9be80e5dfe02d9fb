"""The trainer and its parts (docs/CONTRACTS.md, "Trainer"). Never imports ray: it runs the same on a laptop,
inside a Tune trial, or on every worker of a Ray Train data-parallel group.

``python -m lmtune.train`` is its command (:mod:`lmtune.train`).
"""

from lmtune.training.checkpoint import REPLAY_CHECKPOINTS, read_checkpoint
from lmtune.training.faults import FAULT_OOM_ENV, Faults, InjectedOOM
from lmtune.training.memory import EmulatedOOM, is_oom
from lmtune.training.optim import build_optimizer, effective_lr, lr_at
from lmtune.training.reporting import Report, wandb_mode
from lmtune.training.trainer import Diverged, Trainer

__all__ = [
    "Diverged", "EmulatedOOM", "FAULT_OOM_ENV", "Faults", "InjectedOOM", "REPLAY_CHECKPOINTS", "Report", "Trainer",
    "build_optimizer", "effective_lr", "is_oom", "lr_at", "read_checkpoint", "wandb_mode",
]
