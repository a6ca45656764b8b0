"""Mask codecs: bytes against the order-0 entropy bound, and decoding time against a task load.

For every mask set and every codec, measured side by side in one run:
- bytes, against the order-0 entropy bound B = sum over masked tensors of numel * H(p) / 8 (p: the
  tensor's code frequencies); the goal is bytes <= 1.02 B + 8 bytes per masked tensor;
- encode and decode CPU time (one thread; median of interleaved repeats), and the time of
  loading the task (`load_task`: read, checksum, decode, checks, head; ternary masks: also the
  check of every code) from a file with these masks coded by the default codec, against loading
  it from today's packed file; the goal is at most 2x;
- structure the order-0 bound ignores: the order-1 entropy (each code given the one before it in
  memory order) and the entropy with one density per output channel (its parameters not counted).

Mask sets: every task of the model directories given with --real (real learned masks); the same
per-layer density profile on every other --models backbone (i.i.d. codes at each layer's density,
e.g. ResNet-50-sized masks with learned densities); i.i.d. synthetic masks at --densities, binary
and ternary (the rare codes split evenly between 0 and -1); and "channels": 2% of the output
channels switched off whole plus 1% of the remaining weights (structured, as pruning would be).
References that are not codecs of piggyback: "ans", the same gap transform with each level coded
exactly by constriction's ANS coder and a fitted geometric model (`ans_reference.py`: the
order-0-exact alternative, timed like a codec), and zstd (level 19) on the packed bytes (bytes,
and its decompression time alone).

    python benchmarks/mask_codecs.py --real ../bench-work/lite0-binary ../bench-work/lite0-ternary
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ans_reference
from environment import environment, save_report

from piggyback import PiggybackConfig, PiggybackModel
from piggyback.backbones import create_backbone
from piggyback.fileio import content_checksum
from piggyback.mask_codecs import DEFAULT_MASK_CODEC, get_mask_codec, mask_codec_names
from piggyback.mask_kinds import get_mask_kind
from piggyback.packing import pack_codes, unpack_codes
from piggyback.taskfile import TASK_FORMAT_VERSION, read_task_file, write_task_file

NUM_CLASSES = 100
LOADED = ("packed", DEFAULT_MASK_CODEC)  # the task files whose loading is timed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", nargs="*", type=Path, default=[], help="model directories")
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "timm:resnet50"])
    parser.add_argument("--densities", nargs="*", type=float, default=[0.9, 0.97, 0.99, 0.996])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codec-cpu"))
    return parser.parse_args(argv)


@dataclass
class MaskSet:
    name: str
    model: str  # whose packed task load the decoding is compared with
    kind: str
    sizes: list[int]
    shapes: list[tuple[int, ...]]
    codes: torch.Tensor  # flat uint8

    @property
    def bits(self) -> int:
        return get_mask_kind(self.kind).code_bits


# -- entropy ------------------------------------------------------------------------------------


def entropy_bits(counts: np.ndarray) -> float:
    """numel * H(p) of codes with these counts (order 0), in bits."""
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def tensors(mask_set: MaskSet) -> list[np.ndarray]:
    codes = mask_set.codes.numpy()
    bounds = np.cumsum([0, *mask_set.sizes])
    return [codes[a:b] for a, b in itertools.pairwise(bounds)]


def order0_bits(mask_set: MaskSet) -> float:
    return sum(entropy_bits(np.bincount(t, minlength=2**mask_set.bits)) for t in tensors(mask_set))


def order1_bits(mask_set: MaskSet) -> float:
    """Sum over tensors of the empirical entropy of each code given the previous one."""
    total = 0.0
    for t in tensors(mask_set):
        if t.size < 2:
            continue
        alphabet = 2**mask_set.bits
        pairs = np.bincount(t[:-1].astype(np.int64) * alphabet + t[1:], minlength=alphabet**2)
        pairs = pairs.reshape(alphabet, alphabet)
        total += sum(entropy_bits(row) for row in pairs)
    return total


def per_channel_bits(mask_set: MaskSet) -> float:
    """Entropy with one code distribution per output channel (parameters not counted)."""
    total = 0.0
    for t, shape in zip(tensors(mask_set), mask_set.shapes, strict=True):
        rows = t.reshape(shape[0], -1) if t.size else t.reshape(0, 1)
        for row in rows:
            total += entropy_bits(np.bincount(row, minlength=2**mask_set.bits))
    return total


# -- references (not piggyback codecs) ----------------------------------------------------------


def references(mask_set: MaskSet) -> dict[str, tuple[int, Callable[[], Any]]]:
    """(bytes, decoding function) of each reference; the ANS reference is checked to
    round-trip, zstd(packed) is timed on its decompression alone (a lower bound)."""
    codes, sizes, bits = mask_set.codes, mask_set.sizes, mask_set.bits
    expected = pack_codes(codes, bits)
    ans = ans_reference.encode(codes.numpy(), sizes, bits)
    assert torch.equal(ans_reference.decode(ans, sizes, bits), expected), "ans round trip"
    packed = zstandard.ZstdCompressor(level=19).compress(expected.numpy().tobytes())
    decompressor = zstandard.ZstdDecompressor()
    return {
        "ans": (len(ans), lambda: ans_reference.decode(ans, sizes, bits)),
        "zstd(packed)": (len(packed), lambda: decompressor.decompress(packed)),
    }


# -- timing -------------------------------------------------------------------------------------


def median_seconds(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median over repeats of each function's CPU time (this process), run in turn; a function
    may return an `Undo` to run untimed afterwards.

    CPU time rather than wall time: on a shared machine, wall time mostly measures how long the
    process waited for a core; every function timed here is single-threaded CPU work (file reads
    come from the page cache), and interleaving makes drift hit all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for repeat in range(repeats + 1):  # the first round warms up and is not counted
        for key, fn in fns.items():
            start = time.process_time()
            result = fn()
            elapsed = time.process_time() - start
            if isinstance(result, Undo):
                result()
            if repeat:
                samples[key].append(elapsed)
    return {k: statistics.median(v) for k, v in samples.items()}


class Undo:
    def __init__(self, action: Callable[[], Any]) -> None:
        self.action = action

    def __call__(self) -> None:
        self.action()


def loader(model: PiggybackModel, path: Path) -> Callable[[], Undo]:
    """Loading a task file into `model` (removing it again is not timed)."""

    def load() -> Undo:
        name = model.load_task(path, name="timed")
        return Undo(lambda: model.delete_task(name))

    return load


def file_with_masks(template: Path, mask_set: MaskSet, codec: str, out: Path) -> Path:
    """`template` (a task file of the same model) with the set's masks, coded by `codec`."""
    meta, tensors = read_task_file(template)
    data, params = get_mask_codec(codec).encode(mask_set.codes, mask_set.sizes, mask_set.bits)
    tensors["masks"] = data
    meta.update(format_version=TASK_FORMAT_VERSION, codec=codec, codec_params=params)
    meta["checksum"] = content_checksum(meta, tensors)
    return write_task_file(out, tensors, meta)


# -- mask sets ----------------------------------------------------------------------------------


def model_sizes(model: PiggybackModel) -> tuple[list[int], list[tuple[int, ...]]]:
    return [t.numel for t in model.targets], [tuple(t.shape) for t in model.targets]


def real_sets(directory: Path) -> tuple[PiggybackModel, dict[str, Path], list[MaskSet]]:
    model = PiggybackModel.from_pretrained(directory)
    sizes, shapes = model_sizes(model)
    kind = model.config.mask_kind
    sets, files = [], {}
    spec = model.backbone_spec or {}
    model_name = spec.get("name", str(directory))
    for task in model.tasks:
        packed = model.task(task).packed_masks
        codes = unpack_codes(packed.cpu(), model.num_masked, get_mask_kind(kind).code_bits)
        label = f"{directory.name}/{task}"
        sets.append(MaskSet(label, model_name, kind, sizes, shapes, codes))
        files[label] = directory / "tasks" / f"{task}.safetensors"
    return model, files, sets


def iid_codes(
    densities: list[float], sizes: list[int], kind: str, rng: np.random.Generator
) -> torch.Tensor:
    """Codes with the given per-tensor density (fraction of weights kept, code 1); for ternary
    the others split evenly between 0 and -1 (code 2)."""
    parts = []
    for density, size in zip(densities, sizes, strict=True):
        kept = rng.random(size) < density
        codes = kept.astype(np.uint8)
        if kind == "ternary":
            codes[~kept & (rng.random(size) < 0.5)] = 2
        parts.append(codes)
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8))


def profile_on(
    source: MaskSet, model_name: str, sizes: list[int], shapes, rng: np.random.Generator
) -> MaskSet:
    """`source`'s per-layer densities mapped onto another model by relative depth."""
    densities = [float((t != 0).mean()) if t.size else 1.0 for t in tensors(source)]
    depth = np.linspace(0, len(densities) - 1, num=len(sizes)).round().astype(int)
    codes = iid_codes([densities[i] for i in depth], sizes, source.kind, rng)
    name = f"{source.name} profile on {model_name}"
    return MaskSet(name, model_name, source.kind, sizes, shapes, codes)


def channel_codes(sizes, shapes, rng: np.random.Generator) -> torch.Tensor:
    parts = []
    for size, shape in zip(sizes, shapes, strict=True):
        codes = (rng.random(size) >= 0.01).astype(np.uint8).reshape(shape[0], -1)
        codes[rng.random(shape[0]) < 0.02] = 0
        parts.append(codes.reshape(-1))
    return torch.from_numpy(np.concatenate(parts))


def synthetic_sets(model_name: str, sizes, shapes, args, rng) -> list[MaskSet]:
    sets = []
    for density in args.densities:
        for kind in ("binary", "ternary"):
            codes = iid_codes([density] * len(sizes), sizes, kind, rng)
            name = f"iid {density:.3f}"
            sets.append(MaskSet(name, model_name, kind, sizes, shapes, codes))
    codes = channel_codes(sizes, shapes, rng)
    sets.append(MaskSet("channels", model_name, "binary", sizes, shapes, codes))
    return sets


# -- measuring ----------------------------------------------------------------------------------


def measure(
    mask_set: MaskSet, model: PiggybackModel, template: Path, tmp: Path, repeats: int
) -> dict[str, Any]:
    bound = order0_bits(mask_set) / 8
    result: dict[str, Any] = {
        "set": mask_set.name,
        "model": mask_set.model,
        "kind": mask_set.kind,
        "weights": int(mask_set.codes.numel()),
        "tensors": len(mask_set.sizes),
        "density": float((mask_set.codes != 0).float().mean()),
        "bound_bytes": bound,
        "allowed_bytes": 1.02 * bound + 8 * len(mask_set.sizes),
        "order1_bytes": order1_bits(mask_set) / 8,
        "per_channel_bytes": per_channel_bits(mask_set) / 8,
        "codecs": {},
    }
    expected = pack_codes(mask_set.codes, mask_set.bits)
    files = {c: file_with_masks(template, mask_set, c, tmp / f"{c}.safetensors") for c in LOADED}
    timed: dict[str, Callable[[], Any]] = {
        f"{c} load": loader(model, path) for c, path in files.items()
    }
    sizes, bits = mask_set.sizes, mask_set.bits
    for name in mask_codec_names():
        codec = get_mask_codec(name)
        start = time.process_time()
        data, params = codec.encode(mask_set.codes, mask_set.sizes, mask_set.bits)
        encode_seconds = time.process_time() - start
        decoded = codec.decode(data, params, mask_set.sizes, mask_set.bits)
        assert torch.equal(decoded, expected), f"{name} does not round-trip {mask_set.name}"
        result["codecs"][name] = {"bytes": int(data.numel()), "encode_seconds": encode_seconds}
        timed[name] = lambda c=codec, d=data, p=params: c.decode(d, p, sizes, bits)
    for name, (size, decode) in references(mask_set).items():
        result["codecs"][name] = {"bytes": size}
        timed[name] = decode
    seconds = median_seconds(timed, repeats)
    result["load_seconds"] = {c: seconds.pop(f"{c} load") for c in LOADED}
    result["file_bytes"] = {c: path.stat().st_size for c, path in files.items()}
    packed_load = result["load_seconds"]["packed"]
    result["coded_load_ratio"] = result["load_seconds"][DEFAULT_MASK_CODEC] / packed_load
    for name, value in seconds.items():
        entry = result["codecs"][name]
        entry["decode_seconds"] = value
        entry["ratio_to_bound"] = entry["bytes"] / bound if bound else None
        entry["bits_per_weight"] = 8 * entry["bytes"] / max(1, result["weights"])
        entry["meets_goal"] = entry["bytes"] <= result["allowed_bytes"]
        entry["decode_over_packed_load"] = value / packed_load
    return result


def packed_task_file(model: PiggybackModel, directory: Path) -> Path:
    """A packed task file of `model` with a 100-class head (the template of the timed files)."""
    model.add_task("t", NUM_CLASSES, seed=0)
    path = model.save_task(directory / "t.safetensors", "t", codec="packed")
    model.delete_task("t")
    return path


def run(args, tmp: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    models, templates, real = {}, {}, []
    for name in args.models:
        for kind in ("binary", "ternary"):  # a ternary load also checks every code
            config = PiggybackConfig(mask_kind=kind)
            model = PiggybackModel(create_backbone(name, pretrained=False).model, config)
            models[name, kind] = model
            templates[name, kind] = packed_task_file(model, tmp / name / kind)
    for directory in args.real:
        model, files, sets = real_sets(directory)
        real += [(mask_set, model, files[mask_set.name]) for mask_set in sets]
    jobs = list(real)
    for mask_set, _, _ in real:
        for name in args.models:
            if name.split(":")[-1] != mask_set.model:
                key = (name, mask_set.kind)
                sizes, shapes = model_sizes(models[key])
                profiled = profile_on(mask_set, name, sizes, shapes, rng)
                jobs.append((profiled, models[key], templates[key]))
    for name in args.models:
        sizes, shapes = model_sizes(models[name, "binary"])
        for mask_set in synthetic_sets(name, sizes, shapes, args, rng):
            key = (name, mask_set.kind)
            jobs.append((mask_set, models[key], templates[key]))
    results = []
    for mask_set, model, template in jobs:
        results.append(measure(mask_set, model, template, tmp, args.repeats))
        print(json.dumps(summary_line(results[-1])), flush=True)
    return results


# -- report -------------------------------------------------------------------------------------


def summary_line(r: dict[str, Any]) -> dict[str, Any]:
    coded = r["codecs"][DEFAULT_MASK_CODEC]
    return {
        "set": r["set"],
        "model": r["model"],
        "kind": r["kind"],
        "bytes/bound": round(coded["ratio_to_bound"] or 0, 4),
        "goal": coded["meets_goal"],
        "load ratio": round(r["coded_load_ratio"], 3),
    }


def table(results: list[dict[str, Any]]) -> str:
    names = [*mask_codec_names(), "ans", "zstd(packed)"]
    best = DEFAULT_MASK_CODEC
    header = [
        "set", "model", "kind", "weights", "density", "bound B (bytes)", "allowed",
        *(f"{n} bytes (/B)" for n in names),
        f"{best} bits/weight", f"{best} goal", "order-1 / B", "per-channel / B",
        f"{best} encode / decode (ms)", "ans decode (ms)",
        f"load packed / {best} file (ms)", f"{best} load / packed load",
    ]  # fmt: skip
    rows = [header, ["---"] * len(header)]
    for r in results:
        coded, ans, bound, load = (
            r["codecs"][best],
            r["codecs"]["ans"],
            r["bound_bytes"],
            r["load_seconds"],
        )

        def over_bound(value: float, bound: float = bound) -> str:
            return f"{value / bound:.3f}" if bound else "-"

        rows.append(
            [
                r["set"], r["model"], r["kind"], f"{r['weights']:,}", f"{r['density']:.4f}",
                f"{bound:,.0f}", f"{r['allowed_bytes']:,.0f}",
                *(f"{r['codecs'][n]['bytes']:,} ({over_bound(r['codecs'][n]['bytes'])})"
                  for n in names),
                f"{coded['bits_per_weight']:.4f}", "met" if coded["meets_goal"] else "MISSED",
                over_bound(r["order1_bytes"]), over_bound(r["per_channel_bytes"]),
                f"{1000 * coded['encode_seconds']:.1f} / {1000 * coded['decode_seconds']:.2f}",
                f"{1000 * ans['decode_seconds']:.2f}",
                f"{1000 * load['packed']:.2f} / {1000 * load[best]:.2f}",
                f"{r['coded_load_ratio']:.2f}",
            ]
        )  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # CPU times of single-threaded work, comparable side by side
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    env = environment()
    env["versions"].update({n: metadata.version(n) for n in ("constriction", "zstandard")})
    settings = {k: str(v) for k, v in vars(args).items()}
    return save_report(args.out, settings, results, table(results), env)


if __name__ == "__main__":
    main()
