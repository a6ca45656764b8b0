"""Shared fixtures: tiny models that exercise every kind of layer piggyback handles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

# At most 2 threads per process, and the cores shared between pytest-xdist workers: two workers of
# 2 threads each on 2 cores made the model-family tests 5x slower (6.5 min against 70 s).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

#: The real datasets, beside the repository (CI: <root>/main and <root>/shared/data).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_data(name: str) -> Path:
    """The path of a real dataset, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name!r} not found at {path}")
    return path


class TinyCNN(nn.Module):
    """Plain, depthwise and grouped convolutions, batch norm and a Linear head called `fc`."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 16, 1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.grouped(self.depthwise(x))))
        return self.fc(self.pool(x).flatten(1))


class TinyTransformer(nn.Module):
    """Patch embedding, an encoder layer with nn.MultiheadAttention, LayerNorm and a head."""

    def __init__(self, num_classes: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.encoder(tokens)).mean(1))


class TinyConvNd(nn.Module):
    """Conv1d and Conv3d layers (audio / video style) before a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(2, 4, 3)
        self.conv3d = nn.Conv3d(1, 2, 3)
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1d(x[:, :2, :, 0]).mean(-1)
        b = self.conv3d(x[:, None, :, :, :]).mean((-1, -2, -3))
        return self.head(torch.cat([a, b], 1))


def resize_of(transform):
    """The Resize step of a preprocessing pipeline (v2.Compose), wherever it stands."""
    from torchvision.transforms import v2

    return next(step for step in transform.transforms if isinstance(step, v2.Resize))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, so that eval-mode batch norm is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return randomize_norms(TinyCNN()).eval()


@pytest.fixture
def tiny_transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer().eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def write_image_folder(
    root: Path, splits: dict[str, int], classes: int = 3, size: int = 24
) -> Path:
    """An ImageFolder tree of noisy solid-colour JPEGs: learnable, tiny, deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)][:classes]
    for split, count in splits.items():
        for label, colour in enumerate(colours):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                noise = rng.normal(0, 30, (size, size, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes: 8 train, 3 val, 3 test images each."""
    return write_image_folder(tmp_path_factory.mktemp("data"), {"train": 8, "val": 3, "test": 3})


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A local state dict for timm's tiny `test_efficientnet` (what --weights PATH loads)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet")
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
