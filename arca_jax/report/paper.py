"""The paper's published setting and numbers (arXiv 2606.00257; /work/shared/PAPER_NOTES.md)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PaperSetting:
    """What the paper's sweep ran on."""

    model: str = "Qwen/Qwen3-1.7B-Base"
    task: str = "MATH"
    steps: int = 100
    seed: int = 1337
    k: int = 4
    eval_problems: int = 200


@dataclasses.dataclass(frozen=True)
class PaperPerformance:
    """One row of the paper's held-out performance table (trainable params as published)."""

    method: str
    rank: int
    trainable_params: str
    greedy_accuracy: float
    pass_at_k: float
    mean_train_reward: float


@dataclasses.dataclass(frozen=True)
class PaperDiagnostics:
    """One row of the paper's token-weight diagnostics table."""

    method: str
    rank: int
    gini: float
    effective_token_ratio: float


PAPER_SETTING = PaperSetting()

PAPER_PERFORMANCE: tuple[PaperPerformance, ...] = (
    PaperPerformance("uniform", 64, "69.7M", 0.620, 0.675, 0.362),
    PaperPerformance("surprisal", 64, "69.7M", 0.520, 0.650, 0.326),
    PaperPerformance("entropy_reduction", 64, "69.7M", 0.600, 0.700, 0.367),
    PaperPerformance("divergence", 64, "69.7M", 0.565, 0.670, 0.351),
    PaperPerformance("arca", 4, "4.36M", 0.525, 0.640, 0.327),
    PaperPerformance("arca", 16, "17.4M", 0.510, 0.655, 0.336),
    PaperPerformance("arca", 64, "69.7M", 0.590, 0.680, 0.353),
)

PAPER_DIAGNOSTICS: tuple[PaperDiagnostics, ...] = (
    PaperDiagnostics("uniform", 64, 0.000, 1.000),
    PaperDiagnostics("surprisal", 64, 0.941, 0.052),
    PaperDiagnostics("entropy_reduction", 64, 0.920, 0.073),
    PaperDiagnostics("divergence", 64, 0.939, 0.055),
    PaperDiagnostics("arca", 4, 0.353, 0.467),
    PaperDiagnostics("arca", 16, 0.388, 0.460),
    PaperDiagnostics("arca", 64, 0.490, 0.334),
)
