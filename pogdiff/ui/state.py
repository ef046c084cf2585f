"""Server-side state of the app: a loaded data set with what is derived from it, a checkpoint source, the
device models run on."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


# ================================================================================ state
@dataclass
class DatasetBundle:
    """A loaded image-text set with everything derived from it, built lazily."""

    key: str
    name: str
    ds: Any  # pogdiff.data.ImageTextSet
    table: pd.DataFrame
    summary: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The Neighbours tab's view, prepared by pogdiff.method.prepare for the preset in view_preset:
    pooled: np.ndarray | None = None  # [N, D] L2-normalised caption vectors of the preset's encoder
    coords: np.ndarray | None = None  # [N, 2] PCA of pooled
    image_feats: np.ndarray | None = None  # [N, F] the features behind s_img
    x0: Any = None  # [N, ...] the images in the preset's diffusion space
    view_preset: str | None = None
    view_encoder: Any = None  # the preset's caption encoder (for free-text search)
    tables: dict[tuple, Any] = field(default_factory=dict)  # PsiConfig fields -> NeighbourTable
    at_resolution: dict[int, Any] = field(default_factory=dict)  # the set reloaded at a model's size
    judge: Any = None  # pogdiff.evaluation.user_judge.UserJudge of this set's classes, fitted on first use

    @property
    def subjects(self) -> list[str]:
        return list(self.ds.subjects)

    @property
    def captions(self) -> list[str]:
        return list(self.ds.captions)

    def count_of(self) -> dict[str, int]:
        return dict(zip(self.table["subject"], self.table["count"].astype(int)))

    def few_shot_subjects(self) -> list[str]:
        return list(self.table.loc[self.table["shot"] == "few", "subject"])


@dataclass
class Source:
    """A model checkpoint the Compare tab can load."""

    key: str
    label: str
    checkpoint: Path
    metrics_csv: Path | None = None  # per_class.csv shipped beside a demo checkpoint


class Device:
    """The torch device the app runs models on: ``name`` as given, else found on first use (CUDA when
    available), so that building the app imports no torch."""

    def __init__(self, name: str | None = None) -> None:
        self._name = name

    @property
    def name(self) -> str:
        if self._name is None:
            import torch

            self._name = "cuda" if torch.cuda.is_available() else "cpu"
        return self._name

    @property
    def on_gpu(self) -> bool:
        return self.name.startswith("cuda")
