"""What a process needs to run clients or the server: data and model, built once per process.

Ray keeps simulated-client workers alive across rounds, so each worker reads and partitions the
data once and builds the model once, then reloads weights in place. The one per-process object
is rebuilt when the run config changes (a new run in the same process).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedctx.config import SimConfig, parse_norm_options
from fedctx.data import FederatedDataset
from fedctx.federated.params import StateSplit, split_state
from fedctx.federated.run_config import from_run_config
from fedctx.federated.startup import mark, mark_process
from fedctx.models import MODELS, make_model
from fedctx.scenarios import get_scenario


@dataclass
class Runtime:
    config: SimConfig
    data: FederatedDataset
    model: nn.Module
    split: StateSplit
    device: torch.device


_CURRENT: tuple[tuple, Runtime] | None = None


def load_data(config: SimConfig) -> FederatedDataset:
    """The scenario's federated data for ``config``."""
    return get_scenario(config.scenario).build(config)


def build_model(config: SimConfig, data: FederatedDataset) -> nn.Module:
    """The run's model, initialised from ``config.seed`` (identical in every process)."""
    name = get_scenario(config.scenario).check_model(config.model)
    kwargs: dict[str, object] = {"norm": config.norm, "num_contexts": data.num_contexts,
                                 "num_classes": data.num_classes,
                                 **parse_norm_options(config.norm_options)}
    if name in MODELS and "width" in inspect.signature(MODELS[name]).parameters:
        kwargs["width"] = config.width
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return make_model(name, **kwargs)


def pick_device(config: SimConfig) -> torch.device:
    if config.gpus_per_client > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES per actor
    return torch.device("cpu")


def get_runtime(run_config: dict[str, Any]) -> Runtime:
    """This process's runtime for ``run_config`` (Flower's ``context.run_config``)."""
    global _CURRENT
    key = tuple(sorted(run_config.items()))
    if _CURRENT is None or _CURRENT[0] != key:
        _CURRENT = None  # free the previous run's data first
        mark_process()
        mark("runtime-build")
        config = from_run_config(run_config)
        data = load_data(config)
        device = pick_device(config)
        model = build_model(config, data).to(device)
        _CURRENT = (key, Runtime(config, data, model, split_state(model), device))
        mark("runtime-built")
    return _CURRENT[1]


mark("runtime-imported")  # start-up trace: this process has imported torch and fedctx's runtime
