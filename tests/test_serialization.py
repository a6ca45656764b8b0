"""Task files and model directories: round trips, size, and refusal of bad input."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from conftest import TinyCNN, randomize_norms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_model import add_trained_task

from piggyback import (
    FingerprintMismatchError,
    PiggybackConfig,
    PiggybackModel,
    TaskError,
    TaskFileError,
    fileio,
    model_dir,
    taskfile,
)


def make_model(config: PiggybackConfig | None = None, seed: int = 0) -> PiggybackModel:
    torch.manual_seed(seed)
    return PiggybackModel(randomize_norms(TinyCNN()).eval(), config)


def trained(images, config=None, **task_kwargs) -> PiggybackModel:
    return add_trained_task(make_model(config), images, **task_kwargs)


def model_snapshot(model: PiggybackModel):
    return model.tasks, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: PiggybackModel, snapshot) -> None:
    tasks, state = snapshot
    assert model.tasks == tasks
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("task_norms", [False, True])
def test_save_load_gives_bit_identical_outputs(tmp_path, images, kind, task_norms):
    model = trained(images, PiggybackConfig(mask_kind=kind), task_norms=task_norms)
    with torch.no_grad():
        expected = model(images)
    path = model.save_task(tmp_path / "t.safetensors")
    fresh = make_model(PiggybackConfig(mask_kind=kind))
    assert fresh.load_task(path) == "t"
    fresh.set_task("t")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), expected)
    assert fresh.task("t").is_packed  # loaded as packed bits, not float scores
    assert fresh.mask_density("t") == model.mask_density("t")


@pytest.mark.parametrize("method", ["classifier", "finetune"])
def test_baseline_tasks_round_trip(tmp_path, images, method):
    model = trained(images, method=method)
    with torch.no_grad():
        expected = model(images)
    fresh = make_model()
    fresh.load_task(model.save_task(tmp_path / "t.safetensors"))
    fresh.set_task("t")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), expected)


def safetensors_header_size(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


@pytest.mark.parametrize("kind,bits", [("binary", 1), ("ternary", 2)])
def test_packed_file_holds_ceil_p_bits_over_8_bytes_of_masks(tmp_path, images, kind, bits):
    model = trained(images, PiggybackConfig(mask_kind=kind))
    path = model.save_task(tmp_path / "t.safetensors", codec="packed")
    tensors = load_file(path)
    other_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k != "masks")
    mask_bytes = path.stat().st_size - safetensors_header_size(path) - other_bytes
    assert mask_bytes == math.ceil(model.num_masked * bits / 8)
    assert tensors["masks"].dtype == torch.uint8


def test_metadata_describes_the_task(tmp_path, images):
    model = trained(images)
    model.task("t").class_names = ["cat", "dog", "émeu"]
    model.task("t").metadata.preprocess = {"image_size": 128}
    path = model.save_task(tmp_path / "t.safetensors")
    meta, _ = taskfile.read_task_file(path)
    fresh = make_model()
    fresh.load_task(path)
    assert fresh.task("t").metadata.preprocess == {"image_size": 128}
    assert meta["format_version"] == taskfile.TASK_FORMAT_VERSION
    assert meta["mask_kind"] == "binary" and meta["threshold"] == 5e-3
    assert meta["layers"] == [[t.name, list(t.shape)] for t in model.targets]
    assert meta["num_classes"] == 3 and meta["class_names"] == ["cat", "dog", "émeu"]
    assert meta["backbone_fingerprint"] == model.fingerprint
    assert meta["backbone_fingerprint"].startswith("sha256:")


def test_save_and_from_pretrained_directory(tmp_path, images):
    model = trained(images)
    model.add_task("other", 5, seed=1)
    model.save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / model_dir.CONFIG_NAME).read_text())
    assert set(config["tasks"]) == {"t", "other"}
    assert config["backbone"]["fingerprint"] == model.fingerprint
    loaded = PiggybackModel.from_pretrained(tmp_path / "run", make_model().unload())
    assert loaded.tasks == ["t", "other"]
    for name in loaded.tasks:
        model.set_task(name)
        loaded.set_task(name)
        loaded.eval()
        model.eval()
        with torch.no_grad():
            assert torch.equal(loaded(images), model(images))


def test_adding_a_task_to_an_existing_directory_keeps_the_others(tmp_path, images):
    first = trained(images)
    first.save_pretrained(tmp_path / "run")
    second = make_model()
    second.add_task("new", 4, seed=3)
    second.save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / model_dir.CONFIG_NAME).read_text())
    assert set(config["tasks"]) == {"t", "new"}


# -- refusals: each leaves the model unchanged ---------------------------------------------------


@pytest.fixture
def saved(tmp_path, images) -> Path:
    return trained(images).save_task(tmp_path / "t.safetensors")


def refuse(path: Path, error=TaskFileError, match: str = "", model: PiggybackModel | None = None):
    model = model or make_model()
    model.add_task("existing", 2, seed=0)
    snapshot = model_snapshot(model)
    with pytest.raises(error, match=match):
        model.load_task(path)
    assert_unchanged(model, snapshot)


def test_refuses_other_backbone_weights(saved):
    refuse(
        saved, FingerprintMismatchError, r"made for backbone weights sha256:", make_model(seed=7)
    )


def test_refuses_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (4, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        refuse(broken, match="truncated or corrupted")


def test_refuses_corrupted_data_bytes(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor data: the container cannot see this
    broken = tmp_path / "flipped.safetensors"
    broken.write_bytes(bytes(data))
    refuse(broken, match="is corrupted: its contents do not match the checksum")


def test_refuses_garbage_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    refuse(garbage, match="not a readable safetensors file")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    refuse(foreign, match="it is not a piggyback task file")
    refuse(tmp_path / "missing.safetensors", match="no task file at")


def rewrite_metadata(path: Path, out: Path, change) -> Path:
    meta, tensors = taskfile.read_task_file(path)
    change(meta)
    meta["checksum"] = fileio.content_checksum(meta, tensors)  # consistent, but different
    save_file(tensors, str(out), metadata={"piggyback": json.dumps(meta)})
    return out


def test_refuses_newer_format_version(saved, tmp_path):
    newer = rewrite_metadata(
        saved, tmp_path / "v99.safetensors", lambda m: m.update(format_version=99)
    )
    latest = taskfile.TASK_FORMAT_VERSION
    refuse(newer, match=rf"format version 99 is not supported.*reads versions 1 to {latest}")


def test_refuses_a_file_without_backbone_fingerprint(saved, tmp_path):
    unmarked = rewrite_metadata(
        saved, tmp_path / "nofp.safetensors", lambda m: m.pop("backbone_fingerprint")
    )
    refuse(unmarked, FingerprintMismatchError, match="records no backbone fingerprint")


def test_refuses_mismatched_layer_names_and_shapes(saved, tmp_path):
    def rename(meta):
        meta["layers"][1][0] = "renamed.weight"

    def reshape(meta):
        meta["layers"][0][1] = [4, 3, 3, 3]

    def extend(meta):
        meta["layers"].append(["extra.weight", [2, 2]])

    refuse(rewrite_metadata(saved, tmp_path / "n.safetensors", rename), match="'renamed.weight'")
    refuse(rewrite_metadata(saved, tmp_path / "e.safetensors", extend), match="'extra.weight'")
    refuse(
        rewrite_metadata(saved, tmp_path / "s.safetensors", reshape), match=r"shape \[4, 3, 3, 3\]"
    )


def test_refuses_a_file_made_with_other_mask_settings(saved, tmp_path, images):
    excluded = make_model(PiggybackConfig(exclude=("stem",)))
    refuse(saved, match="this model masks 2 tensors, the file has 3", model=excluded)
    ternary = make_model(PiggybackConfig(mask_kind="ternary"))
    refuse(saved, match="holds binary masks at threshold", model=ternary)


def test_refuses_wrong_mask_size_and_head_shapes(saved, tmp_path):
    meta, tensors = taskfile.read_task_file(saved)
    tensors["masks"] = tensors["masks"][:-1].clone()
    meta["checksum"] = fileio.content_checksum(meta, tensors)
    short = tmp_path / "short.safetensors"
    save_file(tensors, str(short), metadata={"piggyback": json.dumps(meta)})
    refuse(short, match=r"take \d+ bytes, found \d+")
    wrong_head = rewrite_metadata(
        saved, tmp_path / "h.safetensors", lambda m: m.update(num_classes=9)
    )
    refuse(wrong_head, match=r"'num_classes' is 9, but its head tensors have \[3\] outputs")


def test_refuses_loading_over_an_existing_task(saved):
    model = make_model()
    model.load_task(saved)
    snapshot = model_snapshot(model)
    with pytest.raises(TaskError, match="already exists"):
        model.load_task(saved)
    assert_unchanged(model, snapshot)
    assert model.load_task(saved, name="copy") == "copy"


def test_fingerprint_check_can_be_waived_on_purpose(saved):
    model = make_model(seed=7)
    assert model.load_task(saved, check_fingerprint=False) == "t"


def test_writes_are_atomic(tmp_path, images, monkeypatch):
    model = trained(images)
    path = model.save_task(tmp_path / "t.safetensors")
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(taskfile, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_task(path)
    assert path.read_bytes() == good  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no temporary left
    mode = path.stat().st_mode & 0o777
    assert mode == 0o666 & ~fileio._umask()  # not mkstemp's private 0600


def test_directory_refuses_other_backbone(tmp_path, images):
    trained(images).save_pretrained(tmp_path / "run")
    with pytest.raises(FingerprintMismatchError):
        make_model(seed=9).save_pretrained(tmp_path / "run")
    with pytest.raises(FingerprintMismatchError):
        PiggybackModel.from_pretrained(tmp_path / "run", make_model(seed=9).unload())
    with pytest.raises(TaskFileError, match="not a piggyback model directory"):
        PiggybackModel.from_pretrained(tmp_path, make_model().unload())


# -- property tests of the file format -----------------------------------------------------------


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["binary", "ternary"]),
    seed=st.integers(0, 2**31 - 1),
    names=st.lists(st.text(min_size=1, max_size=12), min_size=3, max_size=3),
)
def test_file_round_trip_preserves_any_mask(tmp_path, kind, seed, names):
    model = make_model(PiggybackConfig(mask_kind=kind))
    model.add_task("t", 3, class_names=names, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, scores in model.task("t").scores.items():
            scores.copy_(torch.randn(scores.shape, generator=generator) * 1e-2)
    path = model.save_task(tmp_path / f"{kind}-{seed}.safetensors", "t")
    fresh = make_model(PiggybackConfig(mask_kind=kind))
    fresh.load_task(path)
    with torch.no_grad():
        expected = model.task("t").masks(model.targets, model.config)
        found = fresh.task("t").masks(fresh.targets, fresh.config)
    assert all(torch.equal(a, b) for a, b in zip(expected, found, strict=True))
    assert fresh.task("t").class_names == names


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux /proc/self/maps")
@pytest.mark.parametrize("codec", ["packed", "zstd"])
def test_a_loaded_task_keeps_no_part_of_its_file_mapped(tmp_path, images, codec):
    """A tensor kept from the file's memory map would keep the whole file resident (its head
    twice: once mapped, once copied): every tensor a loaded task holds is its own memory."""
    path = trained(images).save_task(tmp_path / "t.safetensors", codec=codec)
    fresh = make_model()
    fresh.load_task(path)
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            mapped.append(range(start, end))
    state = fresh.task("t")
    for name, tensor in [*state.named_parameters(), *state.named_buffers()]:
        pointer = tensor.untyped_storage().data_ptr()
        assert not any(pointer in region for region in mapped), name
