"""push_to_hub.py / packed_vit.hub_export: checkpoint -> flat remote-code folder, proved in a fresh process, uploaded.

Every export below runs the fresh-process verification (`python -I`, `packed_vit` hidden,
`AutoModel.from_pretrained(folder, trust_remote_code=True)` vs the source model, fp32 rel err <= 1e-5).
No Hub is reachable here: the upload is checked at the huggingface_hub API boundary with mocks.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from reference import FP32_REL_TOL, SMALL_AIMV2, SMALL_SIGLIP2, perturb_
from safetensors.torch import load_file, save_file

from packed_vit import Aimv2PackingVisionConfig, Aimv2PackingVisionModel, Siglip2PackingVisionConfig
from packed_vit import Siglip2PackingVisionModel, hub_export
from packed_vit.hub_export import (
    VerificationError,
    export_folder,
    flat_code_files,
    flatten_relative_imports,
    module_source_file,
    verification_grids,
    verify_folder,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TF457_PYTHON = os.environ.get("PACKED_VIT_TF457_PYTHON")
TOWERS = {
    "siglip2": (Siglip2PackingVisionModel, Siglip2PackingVisionConfig(**SMALL_SIGLIP2)),
    "aimv2": (Aimv2PackingVisionModel, Aimv2PackingVisionConfig(**SMALL_AIMV2)),  # learned positions, resized
}


def load_cli():
    spec = importlib.util.spec_from_file_location("push_to_hub", REPO_ROOT / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


push_to_hub = load_cli()


def save_source(model_class, config, folder: Path) -> Path:
    """A checkpoint folder with perturbed random weights (the loaders' own format)."""
    perturb_(model_class(config)).save_pretrained(folder)
    return folder


@pytest.fixture
def hub():
    """huggingface_hub's create_repo / upload_folder, mocked: nothing can reach a Hub from here."""
    with (
        mock.patch("huggingface_hub.create_repo") as create_repo,
        mock.patch("huggingface_hub.upload_folder") as upload_folder,
    ):
        upload_folder.return_value.commit_url = "https://huggingface.co/me/tower/commit/0"
        yield create_repo, upload_folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{tower: (source folder, exported folder)}, both towers exported with `push_to_hub.py --no-push`."""
    root = tmp_path_factory.mktemp("exports")
    folders = {}
    with mock.patch("huggingface_hub.create_repo") as create_repo, mock.patch("huggingface_hub.upload_folder") as up:
        for name, (model_class, config) in TOWERS.items():
            source = save_source(model_class, config, root / f"source_{name}")
            output = root / f"export_{name}"
            assert push_to_hub.main([str(source), "--repo-id", f"me/{name}", "--output-dir", str(output), "--no-push"]) == 0
            folders[name] = (source, output)
    assert not create_repo.called and not up.called
    return folders


# --------------------------------------------------------------------------------------------------------------
# The import rewrite
# --------------------------------------------------------------------------------------------------------------

MODULE = "packed_vit.modeling.modeling_x"


def test_parent_package_import_becomes_single_dot():
    code, imported = flatten_relative_imports(
        "from ..configuration.configuration_x import XConfig\n", MODULE
    )
    assert code == "from .configuration_x import XConfig\n"
    assert imported == ["packed_vit.configuration.configuration_x"]


def test_sibling_import_stays_and_the_rest_of_the_file_is_untouched():
    source = 'import torch\nfrom .packing import (\n    A,\n    B,\n)\nx = "from ..a.b import c"\n'
    code, imported = flatten_relative_imports(source, MODULE)
    assert code == source
    assert imported == ["packed_vit.modeling.packing"]


def test_imports_inside_functions_and_after_semicolons_are_rewritten():
    source = "def f():\n    from ..configuration.cfg import C; from ..processing.proc import P\n    return C, P\n"
    code, imported = flatten_relative_imports(source, MODULE)
    assert code == "def f():\n    from .cfg import C; from .proc import P\n    return C, P\n"
    assert sorted(imported) == ["packed_vit.configuration.cfg", "packed_vit.processing.proc"]


@pytest.mark.parametrize(
    "line, problem",
    [
        ("from . import packing", "cannot be copied flat"),
        ("from .. import configuration", "cannot be copied flat"),
        ("from ....too.far import x", "beyond"),
        ("import packed_vit.modeling", "absolute import of packed_vit"),
        ("from packed_vit.modeling.packing import pack_inputs", "relative imports"),
        ("from \\\n    ..configuration.cfg import C", "one line"),
    ],
)
def test_imports_that_cannot_work_flat_are_errors(line, problem):
    with pytest.raises(ValueError, match=problem):
        flatten_relative_imports(line + "\n", MODULE)


def test_importing_a_package_instead_of_a_module_is_an_error():
    with pytest.raises(ValueError, match="is a package"):
        module_source_file("packed_vit.configuration")


def tower_code_files(tower: str) -> list[str]:
    """The flat code files of a tower: its model and config, the shared modules, and the checkpoint loading."""
    shared = ["packing.py", "attention.py", "position_embeddings.py", "fused_norm.py", "cuda_graphs.py", "packed_model.py"]
    shared.append("plain_modules.py")  # when a fast path may read a module's weights
    shared.append("reference_calls.py")  # the reference towers' padded calls
    return [f"modeling_{tower}_packing.py", f"configuration_{tower}_packing.py", *shared] + [
        "checkpoint_loading.py", f"conversion_{tower}.py"
    ]


@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_code_files_are_the_import_closure_of_the_tower(tower):
    model_class, config = TOWERS[tower]
    files = flat_code_files([model_class.__module__, type(config).__module__])
    assert set(files) == set(tower_code_files(tower))
    for name, code in files.items():
        _, imported = flatten_relative_imports(code, f"flat.{name[:-3]}")
        assert all(f"{module.rpartition('.')[2]}.py" in files for module in imported), name
        assert "from .." not in code


# --------------------------------------------------------------------------------------------------------------
# The exported folder
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_export_writes_auto_map_flat_code_weights_and_card(exported, tower):
    source, folder = exported[tower]
    model_class, config = TOWERS[tower]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
        + tower_code_files(tower)
        + [f"image_processing_{tower}_packing.py", "image_processing_packing.py"]
    )
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"]["AutoImageProcessor"].startswith(f"image_processing_{tower}_packing.")
    assert processor_config["patch_size"] == config.patch_size  # the processor cuts the patches the model takes
    if tower == "aimv2":
        assert processor_config["is_native"] == config.is_native
    saved = json.loads((folder / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": f"configuration_{tower}_packing.{type(config).__name__}",
        "AutoModel": f"modeling_{tower}_packing.{model_class.__name__}",
    }
    assert saved["model_type"] == config.model_type and saved["architectures"] == [model_class.__name__]
    # canonical names, the source's values
    weights, source_weights = load_file(folder / "model.safetensors"), load_file(source / "model.safetensors")
    assert weights.keys() == source_weights.keys()
    assert all(torch.equal(weights[k], source_weights[k]) for k in weights)
    card = (folder / "README.md").read_text()
    assert f"Source checkpoint: `{source}`, revision `local folder`" in card
    assert f'AutoModel.from_pretrained("me/{tower}", trust_remote_code=True)' in card
    figure = re.search(r"Max relative error, fp32, worst frame .*: (\S+) \(tolerance 1e-05\)", card)
    assert figure and float(figure.group(1)) <= FP32_REL_TOL


def test_sharded_weights_are_written_with_an_index_and_load(tmp_path):
    source = save_source(*TOWERS["siglip2"], tmp_path / "source")
    folder, report = export_folder(source, tmp_path / "out", max_shard_size=60_000)  # ~400 kB of weights
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((folder / shard).is_file() for shard in shards)
    assert not (folder / "model.safetensors").exists()
    assert report.max_rel_err <= FP32_REL_TOL  # the fresh process loaded the shards


def test_refuses_a_non_empty_output_directory(tmp_path, hub):
    source = save_source(*TOWERS["siglip2"], tmp_path / "source")
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_folder(source, output)
    assert push_to_hub.main([str(source), "--repo-id", "me/tower", "--output-dir", str(output)]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]  # no temporary folder left
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert not hub[0].called and not hub[1].called


def test_overwrite_replaces_the_output_directory(tmp_path):
    source = save_source(*TOWERS["aimv2"], tmp_path / "source")
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old export")
    folder, _ = export_folder(source, output, overwrite=True)
    assert folder == output.resolve() and not (output / "stale.txt").exists()
    assert (output / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]


def test_unknown_checkpoint_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="Unknown checkpoint model_type 'clip_vision_model'"):
        export_folder(str(tmp_path), tmp_path / "out")


def test_learned_positions_without_resize_are_verified_on_their_trained_grid():
    config = Aimv2PackingVisionConfig(**SMALL_AIMV2, is_native=False, position_resize_mode=None)
    side = config.image_size // config.patch_size
    assert {(h, w) for _, h, w in verification_grids(config)} == {(side, side)}


def test_image_processor_is_exported_with_auto_map_and_loads(tmp_path, monkeypatch):
    # A stand-in processor in a package of its own: whatever the processor's module imports relatively is
    # exported flat with it, and the verification loads it with AutoImageProcessor.
    package = tmp_path / "fake_processing"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("DEFAULT_PATCH_SIZE = 4\n")
    (package / "image_processing_fake.py").write_text(
        "from transformers.image_processing_utils import BaseImageProcessor\n"
        "from .helpers import DEFAULT_PATCH_SIZE\n\n\n"
        "class FakePackingImageProcessor(BaseImageProcessor):\n"
        "    def __init__(self, patch_size=DEFAULT_PATCH_SIZE, **kwargs):\n"
        "        super().__init__(**kwargs)\n"
        "        self.patch_size = patch_size\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = importlib.import_module("fake_processing.image_processing_fake").FakePackingImageProcessor
    siglip2 = replace(hub_export.TOWERS[0], processor_class=fake)
    monkeypatch.setattr(hub_export, "TOWERS", (siglip2, hub_export.TOWERS[1]))
    source = save_source(*TOWERS["siglip2"], tmp_path / "source")

    folder, _ = export_folder(source, tmp_path / "out")  # verification loads it with AutoImageProcessor

    settings = json.loads((folder / "preprocessor_config.json").read_text())
    assert settings["auto_map"] == {"AutoImageProcessor": "image_processing_fake.FakePackingImageProcessor"}
    assert settings["patch_size"] == 4
    assert (folder / "helpers.py").is_file()
    assert "from .helpers import DEFAULT_PATCH_SIZE" in (folder / "image_processing_fake.py").read_text()
    assert "AutoImageProcessor" in (folder / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------------
# The fresh-process verification
# --------------------------------------------------------------------------------------------------------------


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "folder_copy"))


def source_model(exported, tower):
    return TOWERS[tower][0].from_pretrained(exported[tower][0])


def test_verification_fails_on_wrong_weights(exported, tmp_path):
    folder = copy_of(exported["siglip2"][1], tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["post_layernorm.weight"] += 1e-3
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="max relative error"):
        verify_folder(folder, source_model(exported, "siglip2"))


def test_verification_process_cannot_import_packed_vit(exported, tmp_path):
    # Installed here (editable, through a .pth finder that `python -I` still runs) ...
    found = "import importlib.util, sys; sys.exit(importlib.util.find_spec('packed_vit') is None)"
    assert subprocess.run([sys.executable, "-I", "-c", found]).returncode == 0
    # ... but code in the folder that needs it fails verification.
    folder = copy_of(exported["aimv2"][1], tmp_path)
    with open(folder / "packing.py", "a") as f:
        f.write("\nimport packed_vit  # a dependency users do not have\n")
    with pytest.raises(VerificationError, match="hidden from the verification process"):
        verify_folder(folder, source_model(exported, "aimv2"))


def test_verification_checks_imports_as_a_hub_load_does(exported, tmp_path):
    # A local load checks only the model file's imports; a Hub load, every file's. An optional package imported
    # in packing.py outside try/except would break Hub users: verification must catch it.
    folder = copy_of(exported["siglip2"][1], tmp_path)
    with open(folder / "packing.py", "a") as f:
        f.write("\n\ndef _optional():\n    import an_optional_package_that_is_not_installed\n")
    with pytest.raises(VerificationError, match="an_optional_package_that_is_not_installed"):
        verify_folder(folder, source_model(exported, "siglip2"))


@pytest.mark.skipif(
    not TF457_PYTHON, reason="PACKED_VIT_TF457_PYTHON (a python with transformers 4.57.x) is not set; .ci/run sets it"
)
@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_export_loads_under_transformers_4_57(exported, tower):
    result = verify_folder(exported[tower][1], source_model(exported, tower), python=TF457_PYTHON)
    assert result["versions"].startswith("transformers 4.57.")
    assert result["max_rel_err"] <= FP32_REL_TOL


# --------------------------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------------------------


def test_upload_runs_after_verification_with_the_folder(tmp_path, hub):
    create_repo, upload_folder = hub
    uploaded_files = []
    upload_folder.side_effect = lambda **kw: uploaded_files.extend(sorted(os.listdir(kw["folder_path"]))) or mock.DEFAULT
    source = save_source(*TOWERS["aimv2"], tmp_path / "source")
    output = tmp_path / "out"

    assert push_to_hub.main([str(source), "--repo-id", "me/aimv2-packed", "--output-dir", str(output), "--private"]) == 0

    create_repo.assert_called_once_with("me/aimv2-packed", private=True, exist_ok=True, repo_type="model")
    upload_folder.assert_called_once()
    assert upload_folder.call_args.kwargs["repo_id"] == "me/aimv2-packed"
    assert Path(upload_folder.call_args.kwargs["folder_path"]) == output.resolve()
    assert "model.safetensors" in uploaded_files and "README.md" in uploaded_files  # the finished folder


def test_nothing_is_uploaded_when_verification_fails(tmp_path, hub, monkeypatch):
    write_weights = hub_export.write_weights

    def write_corrupt_weights(model, folder, max_shard_size):
        write_weights(model, folder, max_shard_size)
        weights = load_file(folder / "model.safetensors")
        weights["embeddings.patch_embedding.weight"] *= 1.01
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(hub_export, "write_weights", write_corrupt_weights)
    source = save_source(*TOWERS["siglip2"], tmp_path / "source")
    exports = tmp_path / "exports"

    assert push_to_hub.main([str(source), "--repo-id", "me/tower", "--output-dir", str(exports / "out")]) == 1

    assert not hub[0].called and not hub[1].called
    assert list(exports.iterdir()) == []  # neither the output nor the temporary folder is left


def test_repo_id_must_be_user_slash_name(capsys):
    with pytest.raises(SystemExit):
        push_to_hub.main(["some/source", "--repo-id", "no-slash"])
    assert "USER/NAME" in capsys.readouterr().err
