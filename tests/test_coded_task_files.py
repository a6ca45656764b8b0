"""Task files with entropy-coded masks and compact heads: round trips, old versions, refusals,
`piggyback convert` and what `piggyback info` reports about them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TinyCNN, randomize_norms
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from piggyback import PiggybackConfig, PiggybackModel, TaskFileError, fileio, taskfile
from piggyback.cli import app
from piggyback.convert import convert_model_dir, convert_task_file
from piggyback.describe import describe_model_dir
from piggyback.fingerprint import fingerprint
from piggyback.mask_codecs import mask_codec_names


class WideCNN(nn.Module):
    """Enough masked weights (75k) for entropy coding to beat packing by far."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.conv = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.bn(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


def learned_model(kind: str = "binary", off: float = 0.03, seed: int = 0) -> PiggybackModel:
    """A task whose masks switch off about `off` of the weights (ternary: half of them -1)."""
    config = PiggybackConfig(mask_kind=kind, task_norms=True)
    model = PiggybackModel(backbone(), config)
    model.add_task("t", 4, seed=seed, class_names=["a", "b", "c", "d"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, scores in model.task("t").scores.items():
            draw = torch.rand(scores.shape, generator=generator)
            scores[draw < off] = 0.0 if kind == "binary" else 1e-3
            scores[draw < off / 2] = -1.0
        for _, norm in model.task("t").norms.items():
            if norm.is_floating_point():
                norm.add_(torch.rand(norm.shape, generator=generator))
    model.set_task("t")
    return model


def backbone() -> nn.Module:
    torch.manual_seed(0)  # as learned_model's: the same fingerprint
    return randomize_norms(WideCNN()).eval()


def fresh(model: PiggybackModel) -> PiggybackModel:
    return PiggybackModel(backbone(), model.config)


def masks_of(model: PiggybackModel, task: str = "t") -> list[torch.Tensor]:
    with torch.no_grad():
        return model.task(task).masks(model.targets, model.config)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_learned_masks_are_entropy_coded_by_default_and_load_bit_identical(tmp_path, kind):
    model = learned_model(kind)
    images = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)
    path = model.save_task(tmp_path / "t.safetensors")
    meta, tensors = taskfile.read_task_file(path)
    assert meta["format_version"] == 3 and meta["codec"] == "zstd"
    packed_bytes = model.num_masked * model.config.kind.code_bits / 8
    assert tensors["masks"].numel() < packed_bytes / 3
    loaded = fresh(model)
    loaded.load_task(path)
    loaded.set_task("t")
    assert all(torch.equal(a, b) for a, b in zip(masks_of(model), masks_of(loaded), strict=True))
    assert torch.equal(
        loaded.task("t").packed_masks, model.task("t").packed(model.targets, model.config)
    )
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)


def test_masks_that_do_not_compress_stay_packed(tmp_path):
    """Half the weights off at random (1 bit of entropy per weight) on a tiny model: coding
    would only add its overhead, so the default writes packed masks."""
    model = PiggybackModel(randomize_norms(TinyCNN()).eval())
    model.add_task("t", 3, seed=0)
    with torch.no_grad():
        for _, scores in model.task("t").scores.items():
            scores.copy_(torch.randn(scores.shape, generator=torch.Generator().manual_seed(0)))
    meta, _ = taskfile.read_task_file(model.save_task(tmp_path / "t.safetensors", "t"))
    assert meta["codec"] == "packed"


@pytest.mark.parametrize("codec", mask_codec_names())
@pytest.mark.parametrize("head_dtype", [None, "float16", "bfloat16"])
def test_every_codec_and_head_dtype_round_trips(tmp_path, codec, head_dtype):
    model = learned_model("ternary")
    path = model.save_task(tmp_path / "t.safetensors", codec=codec, head_dtype=head_dtype)
    meta, tensors = taskfile.read_task_file(path)
    assert meta["codec"] == codec and meta["head_dtype"] == head_dtype
    dtype = taskfile.HEAD_DTYPES[head_dtype or "float32"]
    assert tensors["head/weight"].dtype == dtype and tensors["norm/bn.weight"].dtype == dtype
    assert tensors["norm/bn.num_batches_tracked"].dtype == torch.int64  # only floats shrink
    loaded = fresh(model)
    loaded.load_task(path)
    assert all(torch.equal(a, b) for a, b in zip(masks_of(model), masks_of(loaded), strict=True))
    original, found = model.task("t").head.state_dict(), loaded.task("t").head.state_dict()
    for key, value in original.items():
        assert found[key].dtype == value.dtype  # widened back to the model's dtype
        assert torch.equal(found[key], value.to(dtype).to(value.dtype))
    for key, value in model.task("t").norms.items():
        assert torch.equal(loaded.task("t").norms[key], value.to(dtype).to(value.dtype)
                           if value.is_floating_point() else value)  # fmt: skip


def test_compact_heads_halve_the_head_bytes(tmp_path):
    model = learned_model()
    full = load_file(model.save_task(tmp_path / "a.safetensors"))
    half = load_file(model.save_task(tmp_path / "b.safetensors", head_dtype="float16"))
    assert half["head/weight"].nbytes * 2 == full["head/weight"].nbytes


def write_old_version(path: Path, out: Path, version: int) -> Path:
    """The file as a version-1 or -2 writer wrote it (packed masks, no codec params)."""
    meta, tensors = taskfile.read_task_file(path)
    meta = {k: v for k, v in meta.items() if k not in ("codec_params", "head_dtype")}
    meta["format_version"] = version
    if version == 1:
        meta.pop("codec")
        meta["checksum"] = fingerprint(tensors)  # version 1: over the tensors only
    else:
        meta["checksum"] = fileio.content_checksum(meta, tensors)
    save_file(tensors, str(out), metadata={"piggyback": json.dumps(meta)})
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_files_of_older_versions_load_unchanged(tmp_path, version):
    model = learned_model()
    packed = model.save_task(tmp_path / "t.safetensors", codec="packed")
    old = write_old_version(packed, tmp_path / f"v{version}.safetensors", version)
    loaded = fresh(model)
    loaded.load_task(old)
    assert all(torch.equal(a, b) for a, b in zip(masks_of(model), masks_of(loaded), strict=True))


def rewrite(path: Path, out: Path, change_meta=None, change_tensors=None) -> Path:
    meta, tensors = taskfile.read_task_file(path)
    (change_meta or (lambda m: None))(meta)
    (change_tensors or (lambda t: None))(tensors)
    meta["checksum"] = fileio.content_checksum(meta, tensors)  # consistent: only our checks see it
    save_file(tensors, str(out), metadata={"piggyback": json.dumps(meta)})
    return out


def refused(path: Path, model: PiggybackModel, match: str) -> None:
    target = fresh(model)
    with pytest.raises(TaskFileError, match=match):
        target.load_task(path)
    assert target.tasks == []  # nothing changed


def test_unknown_codecs_and_head_dtypes_are_refused_with_upgrade_advice(tmp_path):
    model = learned_model()
    path = model.save_task(tmp_path / "t.safetensors")
    brotli = rewrite(path, tmp_path / "b.safetensors", lambda m: m.update(codec="brotli"))
    refused(brotli, model, r"masks coded with 'brotli', which this piggyback .* upgrade piggyback")
    fp8 = rewrite(path, tmp_path / "f.safetensors", lambda m: m.update(head_dtype="float8"))
    refused(fp8, model, r"head stored as 'float8'.*upgrade piggyback")
    v2 = rewrite(path, tmp_path / "v2.safetensors", lambda m: m.update(format_version=2))
    refused(v2, model, r"version 2 files hold packed masks")


def test_corrupted_coded_masks_are_refused_before_the_model_changes(tmp_path):
    model = learned_model()
    path = model.save_task(tmp_path / "t.safetensors")

    def flip(tensors):
        tensors["masks"] = tensors["masks"].clone()
        tensors["masks"][len(tensors["masks"]) // 2] ^= 0x10

    def cut(tensors):
        tensors["masks"] = tensors["masks"][:-5].clone()

    refused(rewrite(path, tmp_path / "f.safetensors", None, flip), model, "coded masks are")
    refused(rewrite(path, tmp_path / "c.safetensors", None, cut), model, "coded masks are")
    raw = bytearray(path.read_bytes())  # and without a consistent checksum: the file's own
    raw[-40] ^= 0x01
    (tmp_path / "raw.safetensors").write_bytes(bytes(raw))
    refused(tmp_path / "raw.safetensors", model, "corrupted")


def test_a_head_stored_in_another_dtype_than_the_file_says_is_refused(tmp_path):
    model = learned_model()
    path = model.save_task(tmp_path / "t.safetensors")
    liar = rewrite(path, tmp_path / "l.safetensors", lambda m: m.update(head_dtype="float16"))
    refused(liar, model, r"tensor '(weight|bias)' is torch.float32, the file says float16")


# -- piggyback convert and piggyback info ----------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path) -> tuple[Path, PiggybackModel]:
    model = learned_model("ternary")
    model.add_task("head_only", 3, method="classifier", seed=1)
    directory = tmp_path / "model"
    model.save_pretrained(directory, codec="packed")
    return directory, model


def task_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((directory / "tasks").iterdir())}


def test_convert_rewrites_every_task_file_and_the_tasks_load_the_same(model_dir):
    directory, model = model_dir
    before = task_files(directory)
    done = convert_model_dir(directory, "zstd", "float16")
    assert done["t"]["codec_before"] == "packed" and done["t"]["codec_after"] == "zstd"
    assert done["t"]["bytes_after"] < done["t"]["bytes_before"] / 2
    assert done["head_only"]["head_dtype_after"] == "float16"
    loaded = PiggybackModel.from_pretrained(directory, backbone())
    assert all(torch.equal(a, b) for a, b in zip(masks_of(model), masks_of(loaded), strict=True))
    back = convert_model_dir(directory, "packed", "float32")  # masks back exactly, head widened
    assert back["t"]["codec_after"] == "packed"
    after = task_files(directory)
    assert after.keys() == before.keys() and after["t.safetensors"] != before["t.safetensors"]
    meta, tensors = taskfile.read_task_file(directory / "tasks" / "t.safetensors")
    assert meta["head_dtype"] is None and tensors["head/weight"].dtype == torch.float32
    assert not list((directory / "tasks").glob(".*.tmp"))  # no temporary files left


def test_a_conversion_that_does_not_verify_keeps_the_old_file(model_dir, monkeypatch):
    directory, _ = model_dir
    before = task_files(directory)

    def broken_save(tensors, path, metadata):  # writes a file that reads back differently
        tensors = {**tensors, "head/bias": tensors["head/bias"] + 1}
        meta = json.loads(metadata["piggyback"])
        meta["checksum"] = fileio.content_checksum(meta, tensors)
        save_file(tensors, path, metadata={"piggyback": json.dumps(meta)})

    monkeypatch.setattr("piggyback.convert.save_file", broken_save)
    with pytest.raises(TaskFileError, match="does not read back as written; kept"):
        convert_task_file(directory / "tasks" / "t.safetensors", "zstd")
    assert task_files(directory) == before
    assert not list((directory / "tasks").glob(".*.tmp"))


def test_info_reports_bits_per_weight_against_the_entropy_bound(model_dir):
    directory, model = model_dir
    convert_model_dir(directory, "zstd", "bfloat16")
    task = describe_model_dir(directory)["tasks"]["t"]
    path = directory / "tasks" / "t.safetensors"
    tensors = load_file(path)
    assert task["file_bytes"] == path.stat().st_size
    assert task["mask_bytes"] == tensors["masks"].numel()
    assert task["head_bytes"] == sum(v.nbytes for k, v in tensors.items() if k.startswith("head/"))
    assert task["mask_bits_per_weight"] == pytest.approx(8 * task["mask_bytes"] / model.num_masked)
    assert 0 < task["entropy_bits_per_weight"] < task["mask_bits_per_weight"] < 0.5
    assert task["mask_bits_per_weight"] < 1.1 * task["entropy_bits_per_weight"] + 0.01
    assert task["codec"] == "zstd" and task["head_dtype"] == "bfloat16"
    assert describe_model_dir(directory)["tasks"]["head_only"]["mask_bits_per_weight"] is None


def test_cli_convert_and_info(model_dir):
    directory, _ = model_dir
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(directory), "--head-dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert "t: " in result.output and "masks packed -> zstd" in result.output
    text = runner.invoke(app, ["info", str(directory)]).output
    assert "bits/weight (bound)" in text and "zstd" in text and "float16" in text
    data = json.loads(runner.invoke(app, ["info", str(directory), "--json"]).output)
    assert {"mask_bits_per_weight", "entropy_bits_per_weight", "file_bytes", "mask_bytes",
            "head_bytes"} <= set(data["tasks"]["t"])  # fmt: skip
    bad = runner.invoke(app, ["convert", str(directory), "--codec", "brotli"])
    assert bad.exit_code == 2 and "unknown mask codec 'brotli'" in bad.output
    bad = runner.invoke(app, ["convert", str(directory), "--head-dtype", "float8"])
    assert bad.exit_code == 2 and "head dtype must be one of" in bad.output


def test_saving_a_loaded_model_again_keeps_each_tasks_codec_and_head_dtype(model_dir):
    """`route-fit` saves a loaded model back: the storage `convert` chose must not be undone."""
    directory, _ = model_dir
    convert_model_dir(directory, "packed", "float16")
    PiggybackModel.from_pretrained(directory, backbone()).save_pretrained(directory)
    for name in ("t", "head_only"):
        meta, tensors = taskfile.read_task_file(directory / "tasks" / f"{name}.safetensors")
        assert (meta["codec"], meta["head_dtype"]) == ("packed", "float16")
        assert tensors["head/weight"].dtype == torch.float16
    again = PiggybackModel.from_pretrained(directory, backbone())
    again.save_pretrained(directory, codec="zstd", head_dtype="float32")  # asked otherwise
    meta, tensors = taskfile.read_task_file(directory / "tasks" / "t.safetensors")
    assert (meta["codec"], meta["head_dtype"]) == ("zstd", "float32")
    assert tensors["head/weight"].dtype == torch.float32


def test_a_task_trained_further_is_saved_as_asked_not_as_its_file_was(model_dir):
    """float16 heads are lossy, so only on request: not again after the task is trained more."""
    directory, _ = model_dir
    convert_model_dir(directory, "packed", "float16")
    model = PiggybackModel.from_pretrained(directory, backbone())
    model.unfreeze_task("t")
    model.save_pretrained(directory)
    meta, tensors = taskfile.read_task_file(directory / "tasks" / "t.safetensors")
    assert meta["head_dtype"] is None and tensors["head/weight"].dtype == torch.float32
