"""`train(cfg)`: the one entry point for training an advisor's LoRA adapter.

The data decides the trainer: rows with "images" are mlx-vlm rows (mondrian/train/vision.py),
anything else is text (mondrian/train/text.py). Both write the same adapter folder
(mondrian/core/adapters.py) through the same loop (mondrian/train/loop.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from mondrian.train.config import TrainConfig
from mondrian.train.loop import TrainResult
from mondrian.train.text import train_text
from mondrian.train.vision import train_vision


def is_vision_data(data: Path) -> bool:
    """Whether the dataset's first train row has "images" (the vision trainer takes it)."""
    path = data / "train.jsonl"
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return "images" in json.loads(first)
    except json.JSONDecodeError:
        return False


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Train a LoRA adapter as configured, with the trainer the data needs. `stop_after` ends
    the process's work after that many steps, as a kill would (used to test resume); the run
    stays resumable."""
    trainer = train_vision if is_vision_data(Path(cfg.data)) else train_text
    return trainer(cfg, resume=resume, progress=progress, stop_after=stop_after)
