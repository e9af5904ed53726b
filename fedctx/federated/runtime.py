"""What a process needs to run clients or the server: data and model, built once per process.

Ray keeps simulated-client workers alive across rounds, so caching here means each worker reads
and partitions the data once and builds the model once, then reloads weights in place.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

import torch
from torch import nn

from fedctx.config import SimConfig
from fedctx.data import FederatedDataset
from fedctx.federated.params import StateSplit, split_state
from fedctx.models import MODELS, make_model
from simulations import get_scenario

_DATA_KEYS = ("scenario", "clients", "seed", "data_dir", "download", "allow_missing_domains")
_MODEL_KEYS = ("model", "norm", "width", "seed")


@dataclass
class Runtime:
    data: FederatedDataset
    model: nn.Module
    split: StateSplit
    device: torch.device


_DATA: dict[str, FederatedDataset] = {}
_RUNTIMES: dict[str, Runtime] = {}


def _key(config: SimConfig, names: tuple[str, ...]) -> str:
    d = config.to_dict()
    return json.dumps({k: d.get(k) for k in names}, sort_keys=True)


def load_data(config: SimConfig) -> FederatedDataset:
    """The scenario's federated data for ``config`` (cached per process)."""
    key = _key(config, _DATA_KEYS)
    if key not in _DATA:
        _DATA[key] = get_scenario(config.scenario).build(config)
    return _DATA[key]


def build_model(config: SimConfig, data: FederatedDataset) -> nn.Module:
    """The run's model, initialised from ``config.seed`` (identical in every process)."""
    name = config.model or get_scenario(config.scenario).model
    kwargs: dict[str, object] = {"norm": config.norm, "num_contexts": data.num_contexts,
                                 "num_classes": data.num_classes}
    if name in MODELS and "width" in inspect.signature(MODELS[name]).parameters:
        kwargs["width"] = config.width
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return make_model(name, **kwargs)


def pick_device(config: SimConfig) -> torch.device:
    if config.gpus_per_client > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES per actor
    return torch.device("cpu")


def get_runtime(config: SimConfig) -> Runtime:
    """Data, model and state split for ``config``, built once per process."""
    key = _key(config, _DATA_KEYS + _MODEL_KEYS + ("gpus_per_client",))
    if key not in _RUNTIMES:
        data = load_data(config)
        device = pick_device(config)
        model = build_model(config, data).to(device)
        _RUNTIMES[key] = Runtime(data, model, split_state(model), device)
    return _RUNTIMES[key]
