"""`gptkit tune`: a small Optuna search over a fine-tuning run's learning rate, batch size and
LoRA rank, minimising the validation loss. Each trial is an ordinary `finetune` run in
out_dir/trial-N, so the best one is a usable checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .train_config import FinetuneConfig


@dataclass
class TuneResult:
    best_trial: int
    best_params: dict[str, Any]
    best_val_loss: float
    best_metrics: dict[str, float]
    trials: list[dict[str, Any]]  # number, params, val_loss, metrics of every trial


def trial_config(config: FinetuneConfig, params: dict[str, Any], number: int) -> FinetuneConfig:
    """`config` with a trial's parameters, in its own out_dir."""
    changes: dict[str, Any] = {
        "lr": params["lr"],
        "batch_size": params["batch_size"],
        "min_lr": min(config.min_lr, params["lr"]),
        "out_dir": str(Path(config.out_dir) / f"trial-{number}"),
        "progress": False,
    }
    if "lora_r" in params:
        changes["peft"] = dataclasses.replace(config.peft, r=params["lora_r"])
    return dataclasses.replace(config, **changes)


def tune(
    config: FinetuneConfig,
    trials: int = 8,
    lr_range: tuple[float, float] = (1e-5, 1e-2),
    batch_sizes: tuple[int, ...] = (4, 8, 16),
    lora_ranks: tuple[int, ...] = (4, 8, 16, 32),
    seed: int = 0,
) -> TuneResult:
    import optuna

    from .finetune import finetune

    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    if config.eval_every == 0 and config.max_steps < 1:
        raise ConfigError("each trial needs max_steps >= 1")
    records: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        params: dict[str, Any] = {
            "lr": trial.suggest_float("lr", *lr_range, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(batch_sizes)),
        }
        if config.peft.method == "lora":
            params["lora_r"] = trial.suggest_categorical("lora_r", list(lora_ranks))
        result = finetune(trial_config(config, params, trial.number), overwrite=True)
        val = result.train.val_loss
        loss = val if val is not None and math.isfinite(val) else math.inf
        records.append(
            {"number": trial.number, "params": params, "val_loss": loss, "metrics": result.metrics}
        )
        return loss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    best = next(r for r in records if r["number"] == study.best_trial.number)
    result = TuneResult(best["number"], best["params"], best["val_loss"], best["metrics"], records)
    out = Path(config.out_dir) / "tune.json"
    out.write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return result
