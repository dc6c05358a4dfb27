"""Hub export: an original checkpoint -> a verified folder of flat remote code and canonical weights -> the Hub.

`export_folder(source, output_dir)` loads SOURCE with its tower's `from_pretrained` (every format that accepts),
writes into a temporary folder next to `output_dir`:

- the tower's code, copied FLAT: the model file, the config file and every module they reach through relative
  imports (plus the tower's image processor and its helpers), each relative import rewritten to the single-dot
  `from .x import y`, the only form transformers' remote-code loader follows;
- `config.json` with `auto_map` (AutoConfig, AutoModel) and `preprocessor_config.json` with
  `auto_map` (AutoImageProcessor);
- the weights under their canonical names, `model.safetensors` (sharded with an index when large);
- `README.md`, the model card: source, revision, usage, and the figure of the verification below;

then proves the folder in a fresh Python process in which `packed_vit` cannot be imported (`verify_folder`:
`AutoModel.from_pretrained(folder, trust_remote_code=True)` must give the source model's outputs on random packed
input), and only then renames it into place. A failed or interrupted export leaves no folder behind.
`upload_folder` sends a folder to the Hub; `push_to_hub.py` at the repository root is the command line.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .modeling import Aimv2PackingVisionModel, Siglip2PackingVisionModel
from .processing import Aimv2PackingImageProcessor, Siglip2PackingImageProcessor

FP32_REL_TOL = 1e-5  # DESIGN §7: the exported folder must reproduce the source model to fp32 rounding
PACKAGE = __name__.partition(".")[0]  # "packed_vit": what the exported code must never import

# --------------------------------------------------------------------------------------------------------------
# Which tower a checkpoint is
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tower:
    name: str
    model_class: type
    source_model_types: tuple[str, ...]  # config.json `model_type`s of the checkpoints this tower loads
    processor_class: type
    processor_settings: Callable  # model config -> the processor settings its geometry dictates


def siglip2_processor_settings(config) -> dict:
    return {"patch_size": config.patch_size}


def aimv2_processor_settings(config) -> dict:
    """Native checkpoints keep each image's aspect; fixed-size ones resize and crop to their trained size."""
    settings = {"patch_size": config.patch_size, "is_native": config.is_native}
    if not config.is_native:
        settings.update(size={"shortest_edge": config.image_size}, crop_size=config.image_size)
    return settings


TOWERS = (
    Tower(
        "Siglip2",
        Siglip2PackingVisionModel,
        ("siglip2", "siglip2_vision_model", "siglip2_packing_vision"),
        Siglip2PackingImageProcessor,
        siglip2_processor_settings,
    ),
    Tower(
        "AIMv2",
        Aimv2PackingVisionModel,
        ("aimv2", "aimv2_vision_model", "aimv2_packing_vision"),
        Aimv2PackingImageProcessor,
        aimv2_processor_settings,
    ),
)


def tower_for_model_type(model_type: str | None) -> Tower:
    for tower in TOWERS:
        if model_type in tower.source_model_types:
            return tower
    known = ", ".join(t for tower in TOWERS for t in tower.source_model_types)
    raise ValueError(f"Unknown checkpoint model_type {model_type!r}: packed-vit exports only {known}")


def source_has_file(source: str, filename: str, revision: str | None) -> bool:
    if Path(source).exists():
        return (Path(source) / filename).is_file()
    return huggingface_hub.file_exists(source, filename, revision=revision)


def read_source_config(source: str, revision: str | None) -> tuple[dict, str | None]:
    """(config.json of a local folder or Hub repo, the commit it was read at: None for a local folder)."""
    if Path(source).exists():
        path = Path(source) / "config.json"
        if not path.is_file():
            raise ValueError(f"{source} has no config.json: not a checkpoint folder")
        return json.loads(path.read_text()), None
    path = Path(huggingface_hub.hf_hub_download(source, "config.json", revision=revision))
    # The Hub cache keeps every file under snapshots/<commit sha>/: the exact revision the export is built from.
    commit = path.parent.name if re.fullmatch(r"[0-9a-f]{40}", path.parent.name) else revision
    return json.loads(path.read_text()), commit


# --------------------------------------------------------------------------------------------------------------
# Flat remote code
# --------------------------------------------------------------------------------------------------------------

_FROM_CLAUSE = re.compile(r"from\s+\.+[\w.]*(?=\s+import\b)")


def flatten_relative_imports(code: str, module: str) -> tuple[str, list[str]]:
    """Rewrites the relative imports of `code`, the source of module `module`, to the flat single-dot form.

    `from ..configuration.configuration_x import Y` in `packed_vit.modeling.modeling_x` becomes
    `from .configuration_x import Y`. Returns the new code and the absolute names of the modules it imports
    relatively, which the flat folder must also hold. What cannot work flat is an error: `from . import x`
    (transformers' loader does not follow it), a relative import past the top package, an absolute import of the
    package itself (not installed where the remote code runs), a `from` clause split over lines.
    """
    package = module.rpartition(".")[0]
    edits, imported = [], []
    for node in ast.walk(ast.parse(code)):
        where = f"{module} line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import) and any(a.name.partition(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{where}: absolute import of {PACKAGE}; remote code can only use relative imports")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if (node.module or "").partition(".")[0] == PACKAGE:
                raise ValueError(f"{where}: `from {node.module} import`; remote code can only use relative imports")
            continue
        if node.module is None:
            raise ValueError(f"{where}: `from {'.' * node.level} import ...` cannot be copied flat; import from the module (from .x import y)")
        try:
            target = importlib.util.resolve_name("." * node.level + node.module, package)
        except (ImportError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        imported.append(target)
        edits.append((node.lineno, node.col_offset, target.rpartition(".")[2]))

    lines = code.splitlines(keepends=True)
    for lineno, col_offset, flat_name in sorted(edits, reverse=True):  # right to left: earlier offsets stay valid
        line = lines[lineno - 1]
        start = len(line.encode()[:col_offset].decode())  # ast offsets count UTF-8 bytes
        match = _FROM_CLAUSE.match(line, start)
        if match is None:
            raise ValueError(f"{module} line {lineno}: write `from .x import` on one line to copy it flat")
        lines[lineno - 1] = f"{line[:start]}from .{flat_name}{line[match.end():]}"
    return "".join(lines), imported


def module_source_file(module: str) -> Path:
    """The .py file of a module of the installed package (not the repository: exports run from installs too)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"Cannot find module {module}")
    if spec.submodule_search_locations is not None:
        raise ValueError(f"{module} is a package; flat remote code imports from module files (from ..{module.rpartition('.')[2]}.x import y)")
    if not spec.origin.endswith(".py"):
        raise ValueError(f"{module} is not a Python source file ({spec.origin})")
    return Path(spec.origin)


def flat_code_files(modules: list[str]) -> dict[str, str]:
    """{flat file name: rewritten code} for `modules` and every module they reach through relative imports."""
    files: dict[str, str] = {}
    origin: dict[str, str] = {}
    pending = list(modules)
    while pending:
        module = pending.pop()
        flat_name = module.rpartition(".")[2] + ".py"
        if flat_name in origin:
            if origin[flat_name] != module:
                raise ValueError(f"{origin[flat_name]} and {module} would both be copied flat as {flat_name}")
            continue
        code, imported = flatten_relative_imports(module_source_file(module).read_text(), module)
        files[flat_name], origin[flat_name] = code, module
        pending.extend(imported)
    return files


def flat_reference(cls: type) -> str:
    """`auto_map` entry of a class: "<flat module>.<class>"."""
    return f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}"


# --------------------------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------------------------


def write_config(model, folder: Path) -> None:
    config = copy.deepcopy(model.config)  # the model's own stays as it is
    config.architectures = [type(model).__name__]
    config.auto_map = {"AutoConfig": flat_reference(type(model.config)), "AutoModel": flat_reference(type(model))}
    config.save_pretrained(folder)


def write_weights(model, folder: Path, max_shard_size: int | str) -> None:
    # The state dict is already under canonical names (the loaders remapped it). `format: pt` is what
    # transformers checks in the safetensors metadata before loading.
    huggingface_hub.save_torch_state_dict(
        model.state_dict(), folder, max_shard_size=max_shard_size, metadata={"format": "pt"}
    )


def make_processor(processor_cls: type, settings: dict, source: str, revision: str | None):
    """The source's processor settings when it has them, else the class defaults, with the geometry (`settings`)
    the model's config dictates."""
    if source_has_file(source, "preprocessor_config.json", revision):
        return processor_cls.from_pretrained(source, revision=revision, **settings)
    return processor_cls(**settings)


def source_processor(tower: Tower, model_config, source: str, revision: str | None = None):
    """The packed image processor for checkpoint `source` of `tower` whose (converted) config is `model_config`."""
    return make_processor(tower.processor_class, tower.processor_settings(model_config), source, revision)


def write_processor(
    processor_cls: type, settings: dict, source: str, revision: str | None, folder: Path
) -> None:
    """preprocessor_config.json (`make_processor`'s settings), with `auto_map` for AutoImageProcessor."""
    make_processor(processor_cls, settings, source, revision).save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    settings = json.loads(path.read_text())
    settings["auto_map"] = {"AutoImageProcessor": flat_reference(processor_cls)}
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


@dataclass
class ExportReport:
    source: str
    revision: str | None  # the source's commit (Hub) or None (local folder)
    tower: str
    model_class: str
    files: list[str]
    max_rel_err: float = float("nan")  # of the fresh-process load vs the source model, fp32, worst frame
    grids: list[list[int]] = field(default_factory=list)  # (t, h, w) of the random packed input checked
    verified_with: str = ""  # "transformers X, torch Y" of the verification process


def write_model_card(folder: Path, report: ExportReport, model, repo_id: str) -> None:
    config = model.config
    patch_dim = config.num_channels * config.patch_size**2
    base_model = f"base_model: {report.source}\n" if report.revision else ""  # a Hub source, not a local folder
    revision = report.revision or "local folder"
    grids = ", ".join(str(tuple(g)) for g in report.grids)
    processor_usage = f"""
With the packed image processor (PIL / numpy / torch images of any size -> `pixel_values` + `grid_thw`):

```python
from transformers import AutoImageProcessor

processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
out = model(**processor(images, return_tensors="pt"))  # images: a list of images of any sizes
```
"""
    (folder / "README.md").write_text(
        f"""---
library_name: transformers
{base_model}tags:
- vision
- packed-vit
---

# Packed {report.tower} vision tower

`{report.model_class}`: the {report.tower} vision tower of `{report.source}` for packed (NaViT-style) inputs:
many images of different sizes in ONE forward pass, no padding, variable-length attention, the source model's
numbers. Exported by packed-vit {__version__}.

## Usage

```python
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
grid_thw = torch.tensor([[1, 16, 24], [1, 7, 3], [4, 10, 10]])  # (t, h, w) in patches; t > 1: video frames
patches = torch.randn(int(grid_thw.prod(1).sum()), {patch_dim})  # [N, patch_size * patch_size * channels]
out = model(patches, grid_thw)
out.last_hidden_state  # [N, {config.hidden_size}]: every patch
out.pooler_output      # [num_frames, {config.hidden_size}]: one vector per frame (None without a head)
```

The patches of all images are concatenated, each image row-major (frame-major for t > 1), each patch laid out
`(patch_row, patch_col, channel)` as transformers' `Siglip2ImageProcessor` makes them. Each frame is its own
attention segment. Attention backends (`attn_implementation=`): `"varlen_attn"` (torch's varlen flash kernel,
CUDA fp16/bf16), `"flash_attention_2"` (the flash-attn package), `"sdpa"` and `"eager"` (pure PyTorch, any device).
{processor_usage}
## Source and verification

- Source checkpoint: `{report.source}`, revision `{revision}`.
- Weights: the source's vision tower, under the state-dict names of transformers' vision model.
- Verified before upload: a fresh Python process without packed-vit ({report.verified_with}) loaded this folder
  with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and ran random packed input, grids
  `(t, h, w)` = {grids}, against the source model.
- Max relative error, fp32, worst frame of `last_hidden_state` and `pooler_output`: {report.max_rel_err:.2e} (tolerance {FP32_REL_TOL:.0e}).
"""
    )


# --------------------------------------------------------------------------------------------------------------
# Verification in a fresh process
# --------------------------------------------------------------------------------------------------------------

# Runs with `python -I` (no PYTHON* variables, no user site, no current directory on sys.path) and a finder in
# front of all others that refuses `packed_vit`: whatever way the package is installed (editable finder from a
# .pth file, site-packages, a path entry), the folder's code cannot reach it, as on a user's machine.
_VERIFY_SCRIPT = r"""
import importlib.abc, json, sys

class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            raise ImportError(f"{name} is hidden from the verification process")

PACKAGE, folder, inputs_path, outputs_path = sys.argv[1:5]
sys.meta_path.insert(0, HidePackage())
try:
    importlib.import_module(PACKAGE)
    sys.exit(f"{PACKAGE} is importable in the verification process")
except ImportError:
    pass

import pathlib, torch, transformers
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import check_imports

# Loading a local folder, transformers checks the imports of the model file only; from the Hub, of every file it
# fetches. Check them all, so that what loads here also loads from the Hub.
for code_file in sorted(pathlib.Path(folder).glob("*.py")):
    check_imports(code_file)
inputs = load_file(inputs_path)
model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).float().eval()
with torch.no_grad():
    out = model(inputs["hidden_states"], inputs["grid_thw"])
outputs = {"last_hidden_state": out.last_hidden_state.contiguous()}
if out.pooler_output is not None:
    outputs["pooler_output"] = out.pooler_output.contiguous()
processor_module = ""
if pathlib.Path(folder, "preprocessor_config.json").exists():
    processor = transformers.AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    processor_module = type(processor).__module__
loaded = sorted(name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + "."))
save_file(outputs, outputs_path, metadata={
    "model_module": type(model).__module__,
    "processor_module": processor_module,
    "versions": f"transformers {transformers.__version__}, torch {torch.__version__}",
    "package_modules_loaded": json.dumps(loaded),
})
"""


VERIFY_TIMEOUT_S = 3600  # loading and running a large tower on the CPU takes minutes, not hours


class VerificationError(RuntimeError):
    """The exported folder does not load, or does not reproduce the source model, in a fresh process."""


def verification_grids(config) -> list[tuple[int, int, int]]:
    """(t, h, w) of the random check: a single patch, elongated grids, a 16x16 one, a larger one, video frames."""
    if getattr(config, "is_native", True) is False and getattr(config, "position_resize_mode", None) is None:
        side = config.image_size // config.patch_size  # a learned AIMv2 table that refuses other grids
        return [(1, side, side), (2, side, side)]
    return [(1, 1, 1), (1, 3, 11), (1, 16, 16), (2, 5, 7), (1, 24, 9)]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ in float64: the error measure of DESIGN §7."""
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def frame_rel_errs(ours: torch.Tensor, ref: torch.Tensor, frame_lengths: list[int]) -> list[float]:
    """`rel_err` per frame (rows grouped by `frame_lengths`)."""
    return [rel_err(a, b) for a, b in zip(ours.split(frame_lengths), ref.split(frame_lengths))]


def verify_folder(folder, reference_model, python: str | None = None, tolerance: float = FP32_REL_TOL) -> dict:
    """Loads `folder` as remote code in a fresh process and compares it with `reference_model` on random input.

    Both sides run in fp32 (`reference_model` is cast in place); the fresh process runs on the CPU, and also loads
    the folder's image processor when it has one. `python`: the interpreter of the fresh process (default: this
    one), e.g. one with another transformers version. Returns {"max_rel_err", "grids", "versions"}; raises
    VerificationError when the load fails, `packed_vit` was reachable, or any frame's relative error of
    `last_hidden_state` or `pooler_output` exceeds `tolerance`.
    """
    folder = Path(folder).resolve()
    model = reference_model.float().eval()
    config = model.config
    seed = int.from_bytes(os.urandom(4), "little")  # fresh random input every run, reproducible from the error
    generator = torch.Generator().manual_seed(seed)
    grids = verification_grids(config)
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    patch_dim = config.num_channels * config.patch_size**2
    hidden_states = torch.randn(int(grid_thw.prod(1).sum()), patch_dim, generator=generator)
    with torch.no_grad():
        expected = model(hidden_states.to(model.device), grid_thw)

    with tempfile.TemporaryDirectory(prefix="packed_vit_verify_") as work:
        work = Path(work)
        save_file({"hidden_states": hidden_states, "grid_thw": grid_thw}, work / "inputs.safetensors")
        env = {
            **os.environ,
            "HF_MODULES_CACHE": str(work / "modules"),  # a clean copy of the remote code, nothing stale
            "HF_HUB_OFFLINE": "1",
        }
        command = [python or sys.executable, "-I", "-c", _VERIFY_SCRIPT, PACKAGE, str(folder)]
        command += [str(work / "inputs.safetensors"), str(work / "outputs.safetensors")]
        try:
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise VerificationError(f"The fresh process did not finish within {VERIFY_TIMEOUT_S} s") from None
        if run.returncode != 0:
            raise VerificationError(f"The fresh process could not load and run {folder}:\n{run.stderr[-4000:]}")
        outputs = load_file(work / "outputs.safetensors")
        with safe_open(work / "outputs.safetensors", "pt") as f:
            meta = f.metadata()

    remote_code = [meta["model_module"]]
    if (folder / "preprocessor_config.json").exists():
        remote_code.append(meta["processor_module"])
    if not all(m.startswith("transformers_modules") for m in remote_code) or json.loads(meta["package_modules_loaded"]):
        raise VerificationError(f"The fresh process did not run the folder's own code: classes from {remote_code}")
    frame_lengths = grid_thw[:, 1:].prod(1).repeat_interleave(grid_thw[:, 0]).tolist()
    errors = frame_rel_errs(outputs["last_hidden_state"], expected.last_hidden_state.cpu(), frame_lengths)
    if expected.pooler_output is not None:
        if "pooler_output" not in outputs:
            raise VerificationError("The exported model returns no pooler_output; the source model does")
        errors += frame_rel_errs(outputs["pooler_output"], expected.pooler_output.cpu(), [1] * len(frame_lengths))
    max_rel_err = max(errors)
    if not max_rel_err <= tolerance:  # `not <=`: a NaN fails too
        raise VerificationError(
            f"The folder loaded as remote code differs from the source model: max relative error {max_rel_err:.2e} "
            f"> {tolerance:.0e} on grids {grids} (input seed {seed})"
        )
    return {"max_rel_err": max_rel_err, "grids": [list(g) for g in grids], "versions": meta["versions"]}


# --------------------------------------------------------------------------------------------------------------
# Export and upload
# --------------------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def move_into_place(built: Path, output_dir: Path) -> None:
    """Renames the finished folder to `output_dir` (same file system: atomic), replacing what was there."""
    if not output_dir.exists():
        built.rename(output_dir)
        return
    old = Path(tempfile.mkdtemp(prefix="packed_vit_replaced_", dir=output_dir.parent))
    output_dir.rename(old / "old")
    built.rename(output_dir)
    shutil.rmtree(old)


def export_folder(
    source: str,
    output_dir,
    revision: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    verify_python: str | None = None,
    repo_id: str = "USER/NAME",
) -> tuple[Path, ExportReport]:
    """Builds the verified remote-code folder of checkpoint `source` (local folder or Hub id) at `output_dir`.

    `repo_id`: the Hub repo the folder is meant for, as the model card's usage names it. `verify_python`: the
    interpreter of the verification process (default: this one).

    Raises FileExistsError before any work if `output_dir` is not empty and not `overwrite`, and
    VerificationError (leaving nothing at `output_dir`) when the folder does not reproduce the source model.
    """
    source, output_dir = str(source), Path(output_dir).resolve()
    check_output_dir(output_dir, overwrite)
    source_config, commit = read_source_config(source, revision)
    tower = tower_for_model_type(source_config.get("model_type"))
    model = tower.model_class.from_pretrained(source, revision=revision).eval()
    processor_cls = tower.processor_class

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Next to the output (same file system, so the final rename is atomic), with a name transformers can turn
    # into a module name while verifying: letters, digits and underscores.
    building = Path(tempfile.mkdtemp(prefix="packed_vit_export_", dir=output_dir.parent))
    try:
        modules = [type(model).__module__, type(model.config).__module__, processor_cls.__module__]
        write_processor(processor_cls, tower.processor_settings(model.config), source, revision, building)
        for name, code in flat_code_files(modules).items():
            (building / name).write_text(code)
        write_config(model, building)
        write_weights(model, building, max_shard_size)
        verified = verify_folder(building, model, python=verify_python)
        report = ExportReport(
            source=source,
            revision=commit,
            tower=tower.name,
            model_class=type(model).__name__,
            files=[],
            max_rel_err=verified["max_rel_err"],
            grids=verified["grids"],
            verified_with=verified["versions"],
        )
        write_model_card(building, report, model, repo_id)
        report.files = sorted(path.name for path in building.iterdir())
        move_into_place(building, output_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already when moved into place
    return output_dir, report


def upload_folder(folder, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Creates `repo_id` if needed and uploads `folder` (an exported, verified folder) to it; returns the commit URL.

    huggingface_hub shows its own progress bars for the file transfers.
    """
    huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message or f"Upload packed vision tower (packed-vit {__version__})",
    )
    return commit.commit_url
