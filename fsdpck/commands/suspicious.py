"""What looks wrong in a checkpoint's values: the rules of ``inspect --stats``, from key names and stats.

Pure functions over plain facts (no torch): each key's kind, dtype, shape, :class:`ValueStats`
and, for a scalar or an object, its value. The optimizer is recognised from DCP's flattened
key names, as ``torch.optim`` state dicts flatten: a key component that names an optimizer
(it contains ``optim``: ``optim``, ``optimizer``, ``optim_state``...) followed by

- ``state.<parameter FQN>.<state name>``: per-parameter state (``optim.state.net1.0.weight.exp_avg``);
- ``param_groups.<i>.<field>``: a param group's hyper-parameters (``optim.param_groups.0.lr``).

The rules (:data:`RULES`):

- ``non-finite``: a tensor holding NaN or ±Inf, or an object that is (or directly holds) a
  non-finite float;
- ``zero-moment``: a per-parameter optimizer state tensor of one or more dims (``exp_avg``,
  ``exp_avg_sq``, ``momentum_buffer``, ``sum``, ``square_avg``...) whose every element is zero:
  state that was never loaded, or a parameter that never had a gradient;
- ``step``: the ``step`` values of the parameters disagree (each key with a minority value is
  named);
- ``lr``: a param group's ``lr`` that is zero or not finite;
- ``state-missing``: a parameter a param group lists (its ``params``: FQNs, or indices in a plain
  ``optimizer.state_dict()``) that has no per-parameter state; and, where the state is keyed by
  FQN, a parameter without state while others have it. A parameter is
  a floating-point tensor that is not optimizer state, under the same top-level name as the
  parameters that do have state (``model.``), whose name does not end like a module buffer
  (``running_mean``, ``running_var``); it has state when a key
  ``<optimizer>.state.<F>.<name>`` exists for an ``F`` its key ends with. With param groups
  but no per-parameter state at all, the finding names the param groups (saved before the first
  step?). A parameter frozen on purpose has no state either: it is named, for a person to judge.

A checkpoint whose keys name no optimizer gets only ``non-finite``, and a note says so.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fsdpck.commands.stats import ValueStats, scalar_value

R_NONFINITE = "non-finite"
R_ZERO_MOMENT = "zero-moment"
R_STEP = "step"
R_LR = "lr"
R_STATE_MISSING = "state-missing"
RULES = (R_NONFINITE, R_ZERO_MOMENT, R_STEP, R_LR, R_STATE_MISSING)
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """What the rules know of one key: from metadata, and from reading it (stats, or an object's value)."""

    key: str
    kind: str  # "tensor" or "bytes"
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    stats: ValueStats | None = None
    value: Any = None  # a byte item's decoded value (only plain values are kept)
    decoded: bool = False  # whether ``value`` is the byte item's value


@dataclass(frozen=True, slots=True)
class Finding:
    """One suspicious thing: the rule, the key it is about (or the first of them), a one-line message."""

    rule: str
    key: str
    message: str
    keys: tuple[str, ...] = ()


@dataclass(slots=True)
class Verdict:
    """All findings, and what was recognised (so that a clean result says what it is clean of)."""

    findings: list[Finding] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)  # the key prefixes recognised as optimizers
    parameters_with_state: int = 0
    param_groups: int = 0
    notes: list[str] = field(default_factory=list)

    def by_key(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for f in self.findings:
            for key in f.keys or (f.key,):
                out.setdefault(key, []).append(f)
        return out


def optimizer_part(key: str) -> tuple[str, str, str, str] | None:
    """``(prefix, "state" or "param_groups", parameter FQN or group index, name)``, or None for other keys."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-3]):
        if "optim" not in part.lower():
            continue
        prefix, section, rest = ".".join(parts[: i + 1]), parts[i + 1], parts[i + 2:]
        if section == "state" and len(rest) >= 2:
            return prefix, section, ".".join(rest[:-1]), rest[-1]
        if section == "param_groups" and len(rest) >= 2 and rest[0].isdigit():
            return prefix, section, rest[0], ".".join(rest[1:])
    return None


def _value_of(facts: KeyFacts) -> Any:
    """A scalar's value: a byte item's decoded value, or a one-element tensor's from its stats."""
    if facts.kind == "tensor":
        return scalar_value(facts.stats) if facts.stats is not None else None
    return facts.value if facts.decoded else None


def _nonfinite_object(value: Any) -> bool:
    items = value if isinstance(value, (list, tuple)) else (value,)
    return any(isinstance(v, float) and not math.isfinite(v) for v in items)


def _counts(stats: ValueStats) -> str:
    parts = [f"{n:,} {name}" for n, name in ((stats.nan, "NaN"), (stats.posinf, "+Inf"), (stats.neginf, "-Inf")) if n]
    return ", ".join(parts)


def _names(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def judge(facts: dict[str, KeyFacts], all_keys: list[str]) -> Verdict:
    """Apply every rule to the keys read (``facts``); ``all_keys`` (every key of the checkpoint) tells
    which parameters have optimizer state, whatever ``--key`` chose."""
    verdict = Verdict()
    findings = verdict.findings
    for key, f in facts.items():
        if f.kind == "tensor" and f.stats is not None and f.stats.nonfinite:
            findings.append(Finding(R_NONFINITE, key, f"{_counts(f.stats)} in {f.stats.numel:,} values"))
        elif f.kind == "bytes" and f.decoded and _nonfinite_object(f.value):
            findings.append(Finding(R_NONFINITE, key, f"non-finite value {f.value!r}"[:120]))

    parsed_all = {k: optimizer_part(k) for k in all_keys}
    state_fqns = {p[2] for p in parsed_all.values() if p is not None and p[1] == "state"}
    verdict.optimizers = sorted({p[0] for p in parsed_all.values() if p is not None})
    verdict.parameters_with_state = len(state_fqns)
    verdict.param_groups = len({(p[0], p[2]) for p in parsed_all.values() if p is not None and p[1] == "param_groups"})
    if not verdict.optimizers:
        verdict.notes.append("no optimizer recognised in the key names (looked for <optim...>.state.<param>.<name> "
                             "and <optim...>.param_groups.<i>.<field>): only the non-finite rule applied")
        return verdict

    steps: dict[str, Any] = {}
    for key, f in facts.items():
        part = parsed_all.get(key) or optimizer_part(key)
        if part is None:
            continue
        _, section, owner, name = part
        if section == "state" and name == "step":
            value = _value_of(f)
            if value is not None:
                steps[key] = value
        elif section == "state" and f.kind == "tensor" and f.stats is not None and len(f.shape or ()) >= 1 \
                and f.stats.numel and f.stats.zeros == f.stats.numel:
            findings.append(Finding(R_ZERO_MOMENT, key, f"all {f.stats.numel:,} values are zero: optimizer state "
                                    "never loaded, or a parameter that never had a gradient?"))
        elif section == "param_groups" and name == "lr":
            value = _value_of(f)
            number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            if number is not None and (number == 0 or not math.isfinite(number)):
                findings.append(Finding(R_LR, key, f"param group {owner}: lr is {number!r}"))
    findings.extend(_step_findings(steps))
    findings.extend(_missing_state(facts, parsed_all, state_fqns))
    return verdict


def _step_findings(steps: dict[str, Any]) -> list[Finding]:
    """The step values of the parameters must agree: each key with a minority value is named."""
    def norm(v: Any) -> Any:
        return "nan" if isinstance(v, float) and math.isnan(v) else float(v) if isinstance(v, (int, float)) else repr(v)

    def text(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    counts = Counter(norm(v) for v in steps.values())
    if len(counts) <= 1:
        return []
    common, n_common = counts.most_common(1)[0]
    odd = sorted(k for k, v in steps.items() if norm(v) != common)
    others = ", ".join(f"{text(value)} on {n}" for value, n in counts.most_common()[1:])
    return [Finding(R_STEP, odd[0], f"steps disagree: {others} of {len(steps)} parameters ({_names(odd)}), "
                    f"{text(common)} on the other {n_common}", keys=tuple(odd))]


def _missing_state(facts: dict[str, KeyFacts], parsed_all: dict[str, Any], state_fqns: set[str]) -> list[Finding]:
    """Parameters without optimizer state: those a param group lists, then (names being FQNs) the model's."""
    findings: list[Finding] = []
    reported: set[str] = set()
    for key, f in sorted(facts.items()):
        part = parsed_all.get(key)
        if part is None or part[1] != "param_groups" or part[3] != "params" or not isinstance(f.value, (list, tuple)):
            continue
        listed = [str(p) for p in f.value]
        missing = [p for p in listed if p not in state_fqns]
        if missing and state_fqns:
            findings.append(Finding(R_STATE_MISSING, key, f"param group {part[2]}: {len(missing)} of {len(listed)} "
                                    f"parameters have no optimizer state: {_names(missing)}"))
        elif missing:
            findings.append(Finding(R_STATE_MISSING, key, f"param group {part[2]} lists {len(listed)} parameters but "
                                    "the optimizer has no per-parameter state (saved before its first step?)"))
        reported.update(missing)
    if state_fqns and all(f.isdigit() for f in state_fqns):
        return findings  # state keyed by parameter index (a plain optimizer.state_dict()): no names to match
    params = [k for k, f in facts.items() if parsed_all.get(k) is None and f.kind == "tensor"
              and f.dtype in FLOAT_DTYPES and not k.endswith(BUFFER_SUFFIXES)]

    def suffixes(key: str) -> list[str]:
        parts = key.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))]

    if not state_fqns:
        groups = sorted(k for k, p in parsed_all.items() if p is not None and p[1] == "param_groups")
        if groups and params and not findings:
            findings.append(Finding(R_STATE_MISSING, groups[0], "the optimizer has param groups but no per-parameter "
                                    f"state for any of {len(params)} parameters (saved before its first step?)"))
        return findings
    stateful_tops = {k.split(".")[0] for k in params if any(s in state_fqns for s in suffixes(k))}
    for key in sorted(params):
        names = suffixes(key)
        if key.split(".")[0] in stateful_tops and not any(s in state_fqns or s in reported for s in names):
            findings.append(Finding(R_STATE_MISSING, key, "no optimizer state for this parameter, while "
                                    f"{len(state_fqns)} other(s) have it (frozen on purpose, or state lost?)"))
    return findings
