"""What a training run is configured with, shared by the text and vision trainers.

`TrainConfig` takes mlx-lm's LoRA config keys (same names, same meaning) plus mondrian's
own; `load_config` reads it from YAML and refuses what would fail or silently do nothing
later; `make_optimizer` builds the optimizer both trainers step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.optimizers as optim

from mondrian.core.config import ConfigError, from_dict, load_yaml


@dataclass
class TrainConfig:
    # -- keys shared with mlx-lm's LoRA config (same names, same meaning) --
    model: str = "smollm2-135m"
    data: str = "workspace/datasets/fit-query"
    adapter_path: str = "adapters"
    fine_tune_type: str = "lora"
    num_layers: int = 16
    lora_parameters: dict = field(default_factory=lambda: {"rank": 8, "dropout": 0.0, "scale": 20.0})
    batch_size: int = 4
    iters: int = 1000
    learning_rate: float = 1e-5
    lr_schedule: dict | None = None
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)
    mask_prompt: bool = False
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    resume_adapter_file: str | None = None
    hf_dataset: dict | None = None
    # -- mlx-lm keys with no effect here, accepted so an mlx-lm config just works --
    train: bool = True
    test: bool = False
    test_batches: int = 500
    report_to: str | None = None
    project_name: str | None = None
    config: str | None = None
    clear_cache_threshold: int = 0
    trust_remote_code: bool = False
    # -- mondrian's own keys --
    advisor: str | None = None  # recorded with the run
    db: str | None = None  # runs database [the data's workspace mondrian.db, else ./mondrian.db]
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement
    keep_checkpoints: int = 2
    answer_only_logits: bool = True  # project to the vocabulary only where the loss is taken
    # Length-bucketing window, in batches (1 = none). Off by default: a bucketed batch holds one
    # kind of row (long place lists, short FiT ids, ...), and at LoRA learning rates that made
    # answers loop (README, Training: bench_quality's ablations).
    bucket_batches: int = 1
    # An adapter folder whose LoRA weights a new run starts from (e.g. the production version's,
    # to retrain on new data); its layout must be this config's. The optimizer starts fresh.
    init_adapter: str | None = None
    # Which answers of a chat row carry loss under mask_prompt: `last` (mlx-lm's way) or `all`,
    # every assistant turn, so a retrieval row's solved examples are learnt too (each from the
    # examples before it): several answers per row for the price of one forward pass. Validation
    # always scores the last answer, the one a served prompt asks for. Text advisors only.
    answer_turns: str = "last"
    # The data mix: rows are drawn so that each answer shape (the set of fields a JSON answer
    # holds) comes up in proportion to count**mix_alpha: 1 keeps the data's own mix, 0 makes every
    # shape equally common, between the two rare shapes (no technology, include_* flags, three
    # capacities ...) are seen more often without repeating them endlessly (the smoothing of
    # multilingual pre-training, Conneau et al. 2020). Rows whose answer is not a JSON object
    # form one shape.
    mix_alpha: float = 1.0
    # How the mix draws an epoch's rows: `random`, each row drawn independently with replacement
    # by its shape's share; `stratified`, each shape given its share as a quota spread evenly
    # through the epoch (any run of steps holds every shape's share to within one row), its
    # rows drawn without replacement. At batch 1 a run sees a third of an epoch, and random
    # draws leave a rare shape's count (and which of its rows) to chance.
    mix_draw: str = "random"

    def check(self) -> None:
        if self.fine_tune_type != "lora":
            raise ConfigError(f"fine_tune_type '{self.fine_tune_type}': only 'lora' is supported")
        if self.hf_dataset:
            raise ConfigError("hf_dataset: datasets come from local folders (mondrian dataset)")
        if self.resume_adapter_file:
            raise ConfigError("resume_adapter_file: use `mondrian train --resume`, which restores "
                              "the optimizer state and data position too, or init_adapter to start "
                              "a new run from an adapter's weights")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"optimizer '{self.optimizer}' must be adam, adamw or sgd")
        if self.num_layers != -1 and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ConfigError(f"num_layers must be a positive integer or -1 for all layers "
                              f"(got {self.num_layers!r})")
        for key in ("batch_size", "iters", "steps_per_report", "steps_per_eval",
                    "save_every", "max_seq_length", "grad_accumulation_steps", "bucket_batches",
                    "keep_checkpoints"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer (got {getattr(self, key)!r})")
        if self.mix_draw not in ("random", "stratified"):
            raise ConfigError(f"mix_draw must be 'random' or 'stratified' (got {self.mix_draw!r})")
        if self.answer_turns not in ("last", "all"):
            raise ConfigError(f"answer_turns must be 'last' or 'all' (got {self.answer_turns!r})")
        if self.answer_turns == "all" and not self.mask_prompt:
            raise ConfigError("answer_turns: all needs mask_prompt: true (without the mask every token "
                              "carries loss already)")
        if isinstance(self.mix_alpha, bool) or not isinstance(self.mix_alpha, int | float) \
                or not 0 <= self.mix_alpha <= 1:
            raise ConfigError(f"mix_alpha must be a number from 0 to 1 (got {self.mix_alpha!r})")
        unknown = sorted(set(self.lora_parameters) - {"rank", "scale", "dropout", "keys"})
        if unknown:
            raise ConfigError(f"lora_parameters: unknown key(s) {', '.join(unknown)} "
                              "(known: dropout, keys, rank, scale; mlx-lm wants scale, not alpha)")

    def adapter_config(self, base_path: str) -> dict:
        """The text trainer's adapter_config.json: what `mlx_lm.load(..., adapter_path=)` needs
        (fine_tune_type, num_layers, lora_parameters), plus the run's other settings."""
        out = asdict(self) | {"model": base_path, "fine_tune_type": "lora"}
        return {k: v for k, v in out.items() if k not in ("db",)}


def scaled_schedule(schedule: dict | None, iters: int, to_iters: int) -> dict | None:
    """A cosine decay (mlx-lm's `lr_schedule`) planned for `iters` steps, replanned for
    `to_iters`: warmup in proportion, decay over the rest, so a shorter run still ends at the
    schedule's last rate instead of stopping near its peak. Other schedules are returned as
    they are."""
    if not schedule or schedule.get("name") != "cosine_decay" or iters == to_iters:
        return schedule
    warmup = round(schedule.get("warmup", 0) * to_iters / iters)
    args = list(schedule["arguments"])
    args[1] = max(1, to_iters - warmup)
    return schedule | {"arguments": args} | ({"warmup": warmup} if "warmup" in schedule else {})


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """A checked TrainConfig from a YAML file, `overrides` (keys as in the file) applied. An
    `iters` override replans the file's cosine schedule to it (`scaled_schedule`) unless the
    overrides give their own `lr_schedule`."""
    overrides = overrides or {}
    planned = load_yaml(path)
    data = planned | overrides
    if "iters" in overrides and "lr_schedule" not in overrides and isinstance(planned.get("iters"), int):
        data["lr_schedule"] = scaled_schedule(planned.get("lr_schedule"), planned["iters"], data["iters"])
    cfg = from_dict(TrainConfig, data, str(path))
    cfg.check()
    return cfg


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """The configured optimizer, with mlx-lm's learning-rate schedule when one is set."""
    lr = cfg.learning_rate
    if cfg.lr_schedule:
        from mlx_lm.tuner.utils import build_schedule  # noqa: PLC0415 - heavy: mlx_lm import costs ~1 s; CLI --help stays fast

        lr = build_schedule(cfg.lr_schedule)
    kwargs = dict(cfg.optimizer_config.get(cfg.optimizer, {})) if cfg.optimizer_config else {}
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[cfg.optimizer]
    return cls(learning_rate=lr, **kwargs)
