"""Exported files (ONNX, TorchScript, torch.export) compute what the model computes."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyCNN, randomize_norms
from test_model import train_steps

from piggyback import PiggybackConfig, PiggybackModel, TaskError
from piggyback import export as export_module
from piggyback.errors import DataError
from piggyback.export import FORMATS, OnnxFallbackWarning, export_task

CLASSES = ["cat", "dog", "bird"]
PREPROCESS = {
    "image_size": 16,
    "resize_size": 18,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
}


def trained_model(
    config: PiggybackConfig | None = None, method: str = "piggyback", **task_kwargs
) -> PiggybackModel:
    """TinyCNN with one trained task "pets" that records its preprocessing, as training does."""
    torch.manual_seed(0)
    model = PiggybackModel(randomize_norms(TinyCNN()).eval(), config)
    model.add_task("pets", 3, method=method, class_names=CLASSES, seed=0, **task_kwargs)
    model.set_task("pets")
    train_steps(model, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    model.task("pets").metadata.preprocess = dict(PREPROCESS)
    model.task("pets").metadata.results = {"test_top1": 0.5}
    if method == "piggyback":
        assert model.overall_density("pets") < 1.0  # the masks really changed
    return model


def reference(model: PiggybackModel, batch: int) -> tuple[np.ndarray, np.ndarray]:
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        return x.numpy(), model(x).numpy()


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def assert_no_piggyback_inside(path: Path) -> None:
    """TorchScript and .pt2 files are zip archives of code and module metadata: no piggyback
    module may appear in them (debug pickles hold source text, which may mention the word).
    Stack traces name source files: the library's own (src/ or site-packages/) must not appear;
    the test's may, in a checkout whose folder is called piggyback."""
    ours = (
        b"piggyback.",
        b"src/piggyback/",
        b"site-packages/piggyback/",
        b"TaskHeads",
        b"TaskState",
        b"PiggybackModel",
    )
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            assert "piggyback" not in name
            if not name.endswith(".debug_pkl"):
                data = archive.read(name)
                assert not any(word in data for word in ours), name


def test_onnx_matches_pytorch_at_batch_sizes_1_and_3(tmp_path):
    model = trained_model()
    written = export_task(model, "pets", tmp_path)
    assert set(written) == {"onnx", "json"}
    assert written["onnx"] == tmp_path / "pets.onnx"
    for batch in (1, 3):
        x, expected = reference(model, batch)
        np.testing.assert_allclose(run_onnx(written["onnx"], x), expected, atol=1e-5, rtol=0)
    sidecar = json.loads(written["json"].read_text())
    assert sidecar["files"]["onnx"]["exporter"] == "dynamo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets.json", "pets.onnx"]  # no temps


def test_onnx_falls_back_to_the_torchscript_exporter(tmp_path, monkeypatch):
    model = trained_model(PiggybackConfig(mask_kind="ternary", task_norms=True))

    def broken(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("no translation for some operator")
        return real_export(*args, **kwargs)

    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.warns(OnnxFallbackWarning, match="no translation"):
        written = export_task(model, "pets", tmp_path)
    for batch in (1, 3):
        x, expected = reference(model, batch)
        np.testing.assert_allclose(run_onnx(written["onnx"], x), expected, atol=1e-5, rtol=0)
    assert json.loads(written["json"].read_text())["files"]["onnx"]["exporter"] == "torchscript"


@pytest.mark.parametrize("method", ["piggyback", "finetune"])
def test_torchscript_and_torch_export_reload_and_match(tmp_path, method):
    model = trained_model(method=method)
    written = export_task(model, "pets", tmp_path, formats=["torchscript", "exported"])
    assert written["torchscript"].name == "pets.torchscript.pt"
    assert written["exported"].name == "pets.pt2"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
        scripted = torch.jit.load(str(written["torchscript"]))
    program = torch.export.load(written["exported"]).module()
    for batch in (1, 3):
        x, expected = reference(model, batch)
        with torch.no_grad():
            for loaded in (scripted, program):
                found = loaded(torch.from_numpy(x)).numpy()
                np.testing.assert_allclose(found, expected, atol=1e-6, rtol=0)
    assert_no_piggyback_inside(written["torchscript"])
    assert_no_piggyback_inside(written["exported"])


def test_sidecar_says_how_to_feed_the_model(tmp_path):
    model = trained_model()
    written = export_task(model, "pets", tmp_path, formats=("exported", "exported"), image_size=24)
    sidecar = json.loads(written["json"].read_text())
    assert sidecar["class_names"] == CLASSES
    assert sidecar["num_classes"] == 3
    # A new image size keeps the trained resize / crop ratio (16 -> 18).
    assert sidecar["preprocess"] | {"steps": None} == PREPROCESS | {
        "image_size": 24,
        "resize_size": 27,
        "steps": None,
    }
    assert sidecar["input"] == {"name": "input", "shape": ["batch", 3, 24, 24], "dtype": "float32"}
    assert sidecar["output"]["shape"] == ["batch", 3]
    assert sidecar["files"] == {"exported": {"file": "pets.pt2"}}
    assert sidecar["results"] == {"test_top1": 0.5}


def test_fixed_batch_export(tmp_path):
    model = trained_model()
    written = export_task(model, "pets", tmp_path, formats="exported", dynamic_batch=False)
    sidecar = json.loads(written["json"].read_text())
    assert sidecar["input"]["shape"][0] == 1
    x, expected = reference(model, 1)
    found = torch.export.load(written["exported"]).module()(torch.from_numpy(x))
    np.testing.assert_allclose(found.detach().numpy(), expected, atol=1e-6, rtol=0)


def test_refuses_bad_formats_and_tasks_before_writing(tmp_path):
    model = trained_model()
    with pytest.raises(ValueError, match="onnx, torchscript, exported") as error:
        export_task(model, "pets", tmp_path / "out", formats=("onnx", "tflite"))
    assert "tflite" in str(error.value)
    with pytest.raises(ValueError, match="expected one or more"):
        export_task(model, "pets", tmp_path / "out", formats=())
    with pytest.raises(TaskError, match="nope"):
        export_task(model, "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert set(FORMATS) == {"onnx", "torchscript", "exported"}


def test_unnamed_backbone_without_preprocessing_needs_explicit_values(tmp_path):
    model = trained_model()
    model.task("pets").metadata.preprocess = None
    with pytest.raises(DataError, match="image_size, mean, std"):
        export_task(model, "pets", tmp_path, formats="exported")
    written = export_task(
        model, "pets", tmp_path, formats="exported", image_size=16, mean=[0.5] * 3, std=[0.5] * 3
    )
    assert json.loads(written["json"].read_text())["preprocess"]["resize_size"] == 18


def test_a_failed_export_leaves_no_file(tmp_path, monkeypatch):
    model = trained_model()

    def crash(program, handle, **kwargs):
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export_module.torch.export, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        export_task(model, "pets", tmp_path, formats="exported")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_efficientnet_lite0_onnx_matches_pytorch_on_a_real_image(tmp_path):
    import matplotlib.cbook
    from PIL import Image

    from piggyback.backbones import create_backbone
    from piggyback.predict import eval_transform

    backbone = create_backbone("efficientnet_lite0")
    model = PiggybackModel(backbone.model, backbone_spec=backbone.spec)
    model.add_task("imagenet")  # its own ImageNet head, so top-1 means something
    model.set_task("imagenet")
    train_steps(model, torch.randn(2, 3, 128, 128), steps=1)
    assert model.overall_density("imagenet") < 1.0
    # No recorded preprocessing: the backbone's data config is looked up from its spec.
    written = export_task(model, "imagenet", tmp_path, image_size=128)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = Image.open(handle).convert("RGB")
    x = eval_transform(model, "imagenet", 128)(image).unsqueeze(0)
    assert x.shape == (1, 3, 128, 128)
    with torch.no_grad():
        expected = model(x).numpy()
    found = run_onnx(written["onnx"], x.numpy())
    np.testing.assert_allclose(found, expected, atol=1e-4, rtol=0)
    assert found.argmax() == expected.argmax()
    sidecar = json.loads(written["json"].read_text())
    assert sidecar["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # tf_efficientnet_lite0's
    assert sidecar["files"]["onnx"]["exporter"] == "dynamo"
