"""Turn the coverage sweep's log into docs/model-coverage.md (every figure comes from the log).

    PIGGYBACK_COVERAGE_LOG=/tmp/coverage.jsonl pytest tests/test_model_coverage.py
    python tests/coverage_report.py /tmp/coverage.jsonl > docs/model-coverage.md

The totals (M) are the models timm and torchvision list in this environment; a model counts as
passing (N) only if its test logged it after every check passed, so a failing model lowers N.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import timm
import torch
import torchvision

#: Below this share of its backbone's parameters masked, a model is listed by name.
LOW_MASKED_SHARE = 0.9


VERSIONS = {
    "torch": torch.__version__,
    "timm": timm.__version__,
    "torchvision": torchvision.__version__,
}


def _read(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    stale = [r["model"] for r in records if r["versions"] != VERSIONS]
    if stale:
        sys.exit(f"{len(stale)} records come from other library versions than {VERSIONS}: rerun")
    return records


def _family(reason: str) -> str:
    """What a refusal says before its details: the same for every model of a family."""
    return re.sub(r"\s*\([^)]*\)", "", reason.split(":")[0])


def _main_reported_class(record: dict) -> str:
    """The module class whose reported parameters are the largest share of the backbone's."""
    by_class: Counter[str] = Counter()
    for kind, numel in record["reported"].items():
        by_class[kind.rpartition(".")[0]] += numel
    module_class, numel = by_class.most_common(1)[0]
    return f"{module_class} ({numel / record['backbone']:.0%} of its parameters)"


def _totals(records: list[dict]) -> list[str]:
    listed = {
        "timm": timm.list_models(),
        "torchvision": torchvision.models.list_models(module=torchvision.models),
    }
    lines = []
    for library, names in listed.items():
        known = set(names)
        mine = [r for r in records if r["library"] == library and r["model"] in known]
        passed = [r for r in mine if r["outcome"] == "pass"]
        refused = [r for r in mine if r["outcome"] == "refused"]
        unbuildable = [r for r in mine if r["outcome"] == "unbuildable"]
        built = sum(1 for r in passed if r["note"])
        line = f"- **{library} {VERSIONS[library]}: {len(passed)} of {len(names)}** "
        line += "classification models pass"
        line += f", {len(refused)} refused with a message" if refused else ""
        line += f", {len(unbuildable)} not buildable on the meta device" if unbuildable else ""
        line += f", {len(names) - len(mine)} failed or not run" if len(mine) < len(names) else ""
        if built:
            line += (
                f" ({built} of the passing ones are feature extractors by default, "
                "`num_classes=0`: refused with the fix, then wrapped with `num_classes=1000`)"
            )
        lines.append(line + ".")
    return lines


def report(records: list[dict]) -> str:
    passed = [r for r in records if r["outcome"] == "pass"]
    shares = [r["masked"] / r["backbone"] for r in passed]
    low = sorted(
        (r for r in passed if r["masked"] / r["backbone"] < LOW_MASKED_SHARE),
        key=lambda r: r["masked"] / r["backbone"],
    )
    refused: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r["outcome"] != "pass":
            refused[r["outcome"], _family(r["reason"])].append(r)
    kinds = Counter(kind for r in passed for kind in r["reported"])
    out = [
        "# Model coverage",
        "",
        "Measured by `tests/test_model_coverage.py` (every timm and torchvision classification "
        f"model, built on the meta device; torch {torch.__version__}) and written by "
        "`tests/coverage_report.py` from its log; see that file for the two commands. A model "
        "passes when the heads found are the ones it declares (every one replaced per task), no "
        "head weight is masked, nothing that is not a norm is taken for one, every other "
        "parameter is masked, a norm tensor, the bias of a masked layer or reported, and every "
        "swapped tensor's slot resolves. Computation (training, task isolation, merge, save/load) "
        "is checked on representative models of each family in `tests/test_model_families.py`.",
        "",
        *_totals(records),
        f"- Models with several heads (distillation / auxiliary): "
        f"{sum(1 for r in passed if len(r['heads']) > 1)}, every head replaced.",
        f"- Share of the backbone's parameters (heads excluded) that is masked: median "
        f"{statistics.median(shares):.1%}; {len(low)} models below {LOW_MASKED_SHARE:.0%}.",
        "",
        "## Refused, or not buildable on the meta device",
        "",
    ]
    out += [
        f"- {', '.join(sorted(r['model'] for r in family))} ({outcome}): {family[0]['reason']}"
        for (outcome, _), family in refused.items()
    ]
    out += ["- None otherwise." if refused else "- None."]
    out += [
        "",
        "Refusals that no model of either library triggers, tested in `tests/test_targets.py`: "
        "weights computed by a parametrization (weight norm, spectral norm: bake them in first, "
        "the message gives the call) and raw attention weight matrices that no layer family "
        "covers (the message says what to exclude).",
        "",
        f"## Masked least (below {LOW_MASKED_SHARE:.0%} of the backbone's parameters)",
        "",
    ]
    out += [
        f"- {r['model']}: {r['masked'] / r['backbone']:.1%} masked; most reported: "
        f"{_main_reported_class(r)}"
        for r in low
    ]
    out += [
        "",
        "Recurrent layers (`nn.LSTM`, `nn.GRU`) stay reported, not masked: they read their "
        "weights from a flat list (`_flat_weights`) rather than the parameter slots that a "
        "task's masked weights are swapped into.",
        "",
        "## Parameters reported (not masked, frozen and shared by all tasks), most common kinds",
        "",
        "Module class and parameter name, and in how many passing models they occur:",
        "",
    ]
    out += [f"- `{kind}`: {count}" for kind, count in kinds.most_common(15)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(report(_read(Path(sys.argv[1]))))
