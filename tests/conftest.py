"""Shared fixtures. Importing mondrian first preloads OpenBLAS before mlx is imported."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import mondrian  # noqa: E402,F401
