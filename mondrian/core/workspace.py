"""A workspace: where the job database, the data root and the outputs are (`mondrian.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mondrian.core.config import ConfigError, from_dict, load_yaml
from mondrian.core.db import JobColumns

CONFIG_NAME = "mondrian.yaml"


@dataclass
class Workspace:
    db: str = "mondrian.db"  # the job database, relative to the workspace
    data_root: str = "data"  # every image / analysis path must resolve inside it
    jobs_table: str = "jobs"
    columns: JobColumns = field(default_factory=JobColumns)
    completed_status: list[str] = field(default_factory=lambda: ["completed"])
    advisors_dir: str = "advisors"  # extra advisor contracts (YAML), optional
    max_image_pixels: int = 40_000_000  # larger images are refused as decompression bombs
    max_image_bytes: int = 64 * 1024 * 1024  # larger image files are refused unread
    max_analysis_bytes: int = 1_000_000  # larger analysis files are refused unread
    root: str = "."  # set by the loader: the folder of mondrian.yaml

    def path(self, rel: str) -> Path:
        return (Path(self.root) / rel).resolve()

    @property
    def db_path(self) -> Path:
        return self.path(self.db)

    @property
    def data_path(self) -> Path:
        return self.path(self.data_root)

    @property
    def advisors_path(self) -> Path:
        return self.path(self.advisors_dir)


def load_workspace(folder: str | Path = ".") -> Workspace:
    """Read `mondrian.yaml` in `folder` (defaults when absent)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such workspace folder")
    config = folder / CONFIG_NAME
    data = load_yaml(config) if config.is_file() else {}
    if "root" in data:
        raise ConfigError(f"{config}: unknown key(s) root (the workspace is the config's folder)")
    ws = from_dict(Workspace, data, str(config))
    ws.root = str(folder.resolve())
    return ws


def holding(path: str | Path) -> Path | None:
    """The workspace folder holding `path` (the nearest folder up from it with a mondrian.yaml
    or a mondrian.db), None when there is none."""
    path = Path(path).resolve()
    for parent in [path, *path.parents]:
        if (parent / CONFIG_NAME).is_file() or (parent / "mondrian.db").is_file():
            return parent
    return None
