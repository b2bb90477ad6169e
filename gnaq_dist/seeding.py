"""One seed for every random stream a run draws from (Python, numpy, torch, DGL).

Apart from both trainers so that the distributed one does not import the one-process one.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy, torch and DGL so that a run is repeatable."""
    from gnaq_dist._dgl import dgl

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dgl.seed(seed)


__all__ = ["seed_everything"]
