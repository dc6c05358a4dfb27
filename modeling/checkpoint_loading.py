"""`from_pretrained` for the packed towers: any checkpoint of DESIGN §4, converted, loaded strictly.

A local folder or a Hub id (through the HF cache, honouring `revision`, `cache_dir`, `token`, `local_files_only` and
`HF_HUB_OFFLINE`) -> `config.json` + weights (safetensors first, sharded or not; a pickle only with
`weights_only=True`) -> the tower's own conversion (`convert_checkpoint_config`, `convert_checkpoint_state_dict`,
declared on each tower class next to its key table) -> a model built on the meta device whose every parameter is
assigned from the checkpoint. A tower weight the checkpoint lacks, a shape that differs, or a checkpoint key that is
neither used nor on the tower's drop-list is an error naming the keys: nothing is ever left randomly initialized.

This deliberately does not go through transformers' loading machinery, which changes between 4.57 and 5.x and only
warns about missing weights. Only relative imports within modeling/ (the file ships flat as Hub remote code).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from transformers import PretrainedConfig

CONFIG_NAME = "config.json"
# Weight files in the order they are looked for: safetensors first, a pickle only as the last resort.
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ALL_WEIGHTS = SAFETENSORS_WEIGHTS + PICKLE_WEIGHTS

# What transformers' AutoModel, pipelines and older callers pass to every `from_pretrained` as plumbing of their
# own loading: nothing in it changes what we load, so it is accepted and ignored.
LOADING_INTERNALS = frozenset({
    "trust_remote_code", "code_revision", "_from_auto", "_from_pipeline", "_commit_hash", "adapter_name",
    "low_cpu_mem_usage", "_fast_init", "mirror", "resume_download", "offload_state_dict", "disable_mmap",
})  # fmt: skip
# Loading features we do not implement, accepted only at the value that asks for nothing: any other value would
# change what gets loaded or returned, so it is refused rather than silently ignored.
UNSUPPORTED_UNLESS = {
    "variant": None, "gguf_file": None, "quantization_config": None, "key_mapping": None, "state_dict": None,
    "from_tf": False, "from_flax": False, "ignore_mismatched_sizes": False, "output_loading_info": False,
    "weights_only": True, "proxies": None, "max_memory": None, "offload_folder": None, "offload_buffers": False,
    "tp_plan": None, "tp_size": None, "device_mesh": None, "distributed_config": None, "use_kernels": False,
    "kernel_config": None, "generation_config": None, "fusion_config": None,
}  # fmt: skip
MAX_KEYS_NAMED = 30  # per kind of problem, so a wholly wrong checkpoint still gives a readable error


# --------------------------------------------------------------------------------------------------------------
# Checkpoint formats: helpers for the per-tower conversions (conversion_*.py)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointFormat:
    """One layout a tower's weights come in: the tower's keys all start with `prefix`, and `marker` (a key every
    checkpoint of this layout has, after the prefix) tells it apart from the others."""

    name: str
    prefix: str
    marker: str
    position_key: str = ""  # after the prefix: the learned position table, where the layout has one


def detect_format(formats: Iterable[CheckpointFormat], keys: Iterable[str], tower: str) -> CheckpointFormat:
    """The first of `formats` whose marker key the checkpoint has; an unknown layout is an error."""
    keys = set(keys)
    for checkpoint_format in formats:
        if checkpoint_format.prefix + checkpoint_format.marker in keys:
            return checkpoint_format
    expected = ", ".join(f"{f.prefix}{f.marker} ({f.name})" for f in formats)
    raise ValueError(
        f"Unknown checkpoint format: not a {tower} checkpoint this loader knows. It has none of the keys {expected}; "
        f"its first keys: {', '.join(sorted(keys)[:8]) or '(none)'}"
    )


def tower_tensors(state_dict: Mapping[str, torch.Tensor], prefix: str, dropped: re.Pattern) -> dict:
    """The tower's tensors with `prefix` removed; keys that `dropped` fully matches (other towers, logit scales,
    index buffers) left out on purpose. Any other key is kept under its own name, so that the strict check names
    it as unexpected."""
    tensors, source_keys = {}, {}
    for key, tensor in state_dict.items():
        if dropped.fullmatch(key):
            continue
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name in tensors:
            raise ValueError(f"Checkpoint keys {source_keys[name]!r} and {key!r} are both the tower's {name!r}")
        tensors[name], source_keys[name] = tensor, key
    return tensors


def config_fields(source: Mapping, fields: Iterable[str]) -> dict:
    """The entries of a source config dict that our config takes under the same name."""
    return {name: source[name] for name in fields if name in source}


def check_model_type(config: Mapping, model_types: Iterable[str], tower: str) -> str:
    model_type = config.get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"Unknown checkpoint format: config.json has model_type {model_type!r}, which is not a {tower} "
            f"checkpoint this loader knows ({', '.join(model_types)})"
        )
    return model_type


# --------------------------------------------------------------------------------------------------------------
# Files: a local folder or a Hub repo through the HF cache
# --------------------------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`, read at call time (the hub's constant is read at import)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return hub_constants.HF_HUB_OFFLINE or any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


@dataclass
class CheckpointSource:
    """Where a checkpoint's files are: a local folder, or a Hub repo (downloaded into / read from the HF cache)."""

    name_or_path: str
    subfolder: str = ""
    hub_kwargs: dict = field(default_factory=dict)  # revision, cache_dir, token, local_files_only, force_download

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.name_or_path)

    def __str__(self) -> str:
        where = os.path.join(self.name_or_path, self.subfolder) if self.subfolder else self.name_or_path
        if self.is_local:
            return where
        revision = self.hub_kwargs.get("revision")
        return f"Hub repo {where!r}" + (f" at revision {revision!r}" if revision else "")

    def fetch(self, filename: str) -> str | None:
        """Local path of `filename`, or None when the checkpoint has no such file (or, offline, the cache lacks it)."""
        if self.is_local:
            path = os.path.join(self.name_or_path, self.subfolder, filename)
            return path if os.path.isfile(path) else None
        try:
            return hf_hub_download(self.name_or_path, filename, subfolder=self.subfolder or None, **self.hub_kwargs)
        except EntryNotFoundError:  # not in the repo, or (offline) not in the cache
            return None
        except HFValidationError as error:
            raise ValueError(f"{self.name_or_path!r} is neither a local folder nor a valid Hub repo id") from error

    def not_found(self, what: str) -> FileNotFoundError:
        offline = self.hub_kwargs.get("local_files_only") and not self.is_local
        hint = " (offline: only the local HF cache was searched)" if offline else ""
        return FileNotFoundError(f"{str(self)} has no {what}{hint}")

    def read_config(self) -> dict:
        path = self.fetch(CONFIG_NAME)
        if path is None:
            raise self.not_found(CONFIG_NAME)
        with open(path, encoding="utf-8") as file:
            return json.load(file)

    def read_state_dict(self, use_safetensors: bool | None, device: torch.device) -> dict[str, torch.Tensor]:
        """All tensors of the checkpoint, on `device`: safetensors (single or sharded) first, then a pickle."""
        names = {True: SAFETENSORS_WEIGHTS, False: PICKLE_WEIGHTS}.get(use_safetensors, ALL_WEIGHTS)
        for name in names:
            path = self.fetch(name)
            if path is None:
                continue
            if name.endswith(".index.json"):
                return self.read_shards(path, device)
            return read_weights_file(path, device)
        raise self.not_found(f"weights ({' / '.join(names)})")

    def read_tensor_names(self) -> list[str] | None:
        """The checkpoint's tensor names without its weights (safetensors headers, a shard index); None for a
        pickle, whose names come only with its tensors."""
        for name in SAFETENSORS_WEIGHTS:
            path = self.fetch(name)
            if path is None:
                continue
            if name.endswith(".index.json"):
                with open(path, encoding="utf-8") as file:
                    return list(json.load(file)["weight_map"])
            with safe_open(path, framework="pt") as weights:
                return list(weights.keys())
        return None

    def read_shards(self, index_path: str, device: torch.device) -> dict[str, torch.Tensor]:
        with open(index_path, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            path = self.fetch(shard)
            if path is None:
                raise self.not_found(f"shard {shard} listed in {os.path.basename(index_path)}")
            state_dict.update(read_weights_file(path, device))
        return state_dict


def read_weights_file(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_safetensors(path, device=str(device))
    # A pickle can run code when unpickled: only ever with weights_only=True, which refuses anything but tensors.
    state_dict = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state_dict, Mapping) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise ValueError(f"{path} is not a flat state dict (name -> tensor)")
    return dict(state_dict)


# --------------------------------------------------------------------------------------------------------------
# Strict check
# --------------------------------------------------------------------------------------------------------------


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_NAMED])
    return shown + (f", ... ({len(keys) - MAX_KEYS_NAMED} more)" if len(keys) > MAX_KEYS_NAMED else "")


def check_state_dict_matches(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source) -> None:
    """Every model tensor in the checkpoint with its shape, and nothing else; otherwise an error naming the keys."""
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{name} (checkpoint {tuple(state_dict[name].shape)}, model {tuple(expected[name])})"
        for name in sorted(expected.keys() & state_dict.keys())
        if state_dict[name].shape != expected[name]
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint (would be left randomly initialized): {_named(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but neither used nor on the known drop-list: {_named(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_named(mismatched)}")
    if problems:
        raise ValueError(
            f"Cannot load {source} into {type(model).__name__} strictly (names after conversion to the canonical "
            "layout):\n  " + "\n  ".join(problems)
        )


# --------------------------------------------------------------------------------------------------------------
# from_pretrained
# --------------------------------------------------------------------------------------------------------------


def check_loading_kwargs(kwargs: dict) -> dict:
    """Drops transformers' loading plumbing, refuses loading features we do not implement; returns the rest (config
    overrides, as transformers' `from_pretrained(..., output_hidden_states=True)`)."""
    kwargs = {name: value for name, value in kwargs.items() if name not in LOADING_INTERNALS}
    refused = []
    for name, no_op in UNSUPPORTED_UNLESS.items():
        value = kwargs.pop(name, no_op)
        if value is not no_op and value != no_op:
            refused.append(f"{name}={value!r}")
    adapter_kwargs = kwargs.pop("adapter_kwargs", None) or {}
    if "_adapter_model_path" in adapter_kwargs:  # AutoModel found a PEFT adapter in the repo
        refused.append(f"a PEFT adapter ({adapter_kwargs['_adapter_model_path']})")
    if refused:
        raise ValueError(
            f"from_pretrained of the packed towers does not support {', '.join(refused)}: it loads a full checkpoint "
            "strictly, on one device (see modeling/checkpoint_loading.py)"
        )
    return kwargs


def single_device(device_map) -> torch.device:
    """`device_map` naming one device (`"cuda"`, `"cuda:1"`, `0`, `{"": "cuda"}`): the towers are not split."""
    if isinstance(device_map, Mapping) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    if isinstance(device_map, torch.device):
        return device_map
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device(device_map)
    raise ValueError(
        f"device_map={device_map!r} is not supported: the packed towers load onto one device; pass it as "
        "device_map='cuda' / 'cuda:1' / 'cpu' (or move the model with .to(device))"
    )


def resolve_dtype(dtype, state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """`dtype=` as transformers 5 reads it: a floating torch.dtype or its name; None / "auto": the checkpoint's."""
    if dtype is None or dtype == "auto":
        floating = (tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point())
        return next(floating, torch.get_default_dtype())
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (or its name, or 'auto'), got {dtype!r}")
    return dtype


def build_config(cls, config, source: CheckpointSource, checkpoint_keys: list[str], hub_kwargs: dict):
    """Our config: the one given (ours, used as is), or converted from the checkpoint's / a given foreign one."""
    if isinstance(config, cls.config_class):
        return copy.deepcopy(config)
    if config is None:
        config_dict = source.read_config()
    elif isinstance(config, PretrainedConfig):
        config_dict = config.to_dict()
    elif isinstance(config, Mapping):
        config_dict = dict(config)
    elif isinstance(config, (str, os.PathLike)):
        config_dict = CheckpointSource(os.fspath(config), hub_kwargs=hub_kwargs).read_config()
    else:
        raise TypeError(f"config must be a PretrainedConfig, a dict or a path, got {type(config).__name__}")
    converted = cls.config_class(**cls.convert_checkpoint_config(config_dict, checkpoint_keys))
    # Not in to_dict(): the backend a given config asks for, e.g. AutoModel's config, which is ours but loaded as a
    # separate copy of the remote code on transformers 5 (another class object).
    converted._attn_implementation = getattr(config, "_attn_implementation", None)
    return converted


def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None, **hub_kwargs):
    """`cls`'s config for a checkpoint, as `from_pretrained` builds it, without reading the weights: what the
    encode job's preprocessing needs while the weights load. None when the checkpoint is a pickle (its tensor
    names, which the conversion reads, come only with the weights)."""
    hub_kwargs = {"revision": revision, "local_files_only": hub_offline(), **hub_kwargs}
    source = CheckpointSource(os.fspath(pretrained_model_name_or_path), hub_kwargs=hub_kwargs)
    names = source.read_tensor_names()
    return None if names is None else build_config(cls, None, source, names, hub_kwargs)


def load_pretrained(
    cls,
    pretrained_model_name_or_path: str | os.PathLike,
    *model_args,
    config=None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: str = "",
    dtype=None,
    torch_dtype=None,
    attn_implementation: str | None = None,
    device_map=None,
    use_safetensors: bool | None = None,
    use_auth_token: str | bool | None = None,
    **kwargs,
):
    """`cls.from_pretrained`: see the module docstring. Returns the model in eval mode."""
    if model_args:
        raise TypeError(f"{cls.__name__}.from_pretrained takes no positional arguments besides the checkpoint")
    config_overrides = check_loading_kwargs(kwargs)
    hub_kwargs = {
        "revision": revision,
        "cache_dir": cache_dir,
        "token": token if token is not None else use_auth_token,  # `use_auth_token`: the transformers 4 name
        "local_files_only": local_files_only or hub_offline(),
        "force_download": force_download,
    }
    source = CheckpointSource(os.fspath(pretrained_model_name_or_path), subfolder or "", hub_kwargs)
    checkpoint = source.read_state_dict(use_safetensors, single_device(device_map))

    config = build_config(cls, config, source, list(checkpoint), hub_kwargs)
    unknown = sorted(name for name in config_overrides if not hasattr(config, name))
    if unknown:
        raise TypeError(f"{cls.__name__}.from_pretrained got unexpected keyword argument(s): {', '.join(unknown)}")
    for name, value in config_overrides.items():
        setattr(config, name, value)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation  # validated when the model is built
    config.name_or_path = os.fspath(pretrained_model_name_or_path)

    state_dict = cls.convert_checkpoint_state_dict(checkpoint)
    dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, state_dict)
    with torch.device("meta"):  # no random init to overwrite: every tensor is assigned from the checkpoint below
        model = cls(config)
    check_state_dict_matches(model, state_dict, source)
    state_dict = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # a non-persistent buffer a tower might add one day: it is not in any checkpoint
        raise RuntimeError(f"{cls.__name__} tensors not restored from the checkpoint: {', '.join(left_on_meta)}")
    return model.eval()
