"""``inspect --stats``: the statistics of values read a piece at a time, the suspicious rules (each shown
to fire and not to fire), ``--strict``, and the progress a long read shows in a log and on a terminal.

One process, no process group: the checkpoints are ``ckpt_factory.resume_ckpt`` (DCP's state-dict API
names, saved with ``no_dist``), clean and with the faults of ``ckpt_factory.PLANTED``.
"""

from __future__ import annotations

import io
import json
import math
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import ckpt_factory as cf
from fsdpck.checkpoint.piece import Piece
from fsdpck.cli import cli
from fsdpck.commands import stats as stats_mod
from fsdpck.commands.inspect import inspect_checkpoint
from fsdpck.commands.stats import ValueStats, piece_stats
from fsdpck.commands.suspicious import RULES, KeyFacts, judge, optimizer_part
from fsdpck.errors import UsageError
from fsdpck.fingerprint import ckernel
from fsdpck.report.progress import BarView, LogView
from fsdpck.runtime.progress import AFTER_ENV, EVERY_ENV, Progress, after_from_env

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def truth(t: torch.Tensor) -> dict:
    """What piece_stats must say, computed the slow obvious way."""
    x = torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    f = x.double()
    fin = f[torch.isfinite(f)]
    return {"numel": x.numel(), "zeros": int((f == 0).sum()), "nan": int(torch.isnan(f).sum()),
            "posinf": int((f == math.inf).sum()), "neginf": int((f == -math.inf).sum()),
            "min": float(fin.min()) if fin.numel() else None, "max": float(fin.max()) if fin.numel() else None,
            "mean": float(fin.mean()) if fin.numel() else None,
            "std": float(fin.std(correction=0)) if fin.numel() else None}


def assert_stats(got: ValueStats, t: torch.Tensor, rel: float = 1e-6) -> None:
    want = truth(t)
    d = got.as_dict()
    for k in ("numel", "zeros", "nan", "posinf", "neginf", "min", "max"):
        assert d[k] == want[k], (k, d[k], want[k])
    for k in ("mean", "std"):
        assert (d[k] is None) == (want[k] is None), k
        if want[k] is not None:
            assert d[k] == pytest.approx(want[k], rel=rel, abs=1e-9), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                   torch.int8, torch.bool, torch.complex64])
def test_piece_stats_match_the_obvious_computation(dtype, monkeypatch):
    monkeypatch.setattr(stats_mod, "BLOCK", 1000)  # several blocks, the last one short
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4321, generator=g) * 3 + 2
    t = base > 2 if dtype == torch.bool else (base * 10).to(dtype) if not dtype.is_floating_point and not \
        dtype.is_complex else base.to(dtype)
    if dtype.is_floating_point:
        t[17], t[1500], t[4000], t[5] = math.nan, math.inf, -math.inf, 0.0
    assert_stats(piece_stats(t), t, rel=1e-3 if dtype in (torch.bfloat16, torch.float16) else 1e-6)


def test_pieces_merge_to_the_whole_and_a_large_mean_keeps_its_spread(monkeypatch):
    monkeypatch.setattr(stats_mod, "BLOCK", 4096)
    g = torch.Generator().manual_seed(2)
    t = torch.randn(100_003, generator=g) * 1e-3 + 1000.0  # std/mean = 1e-6: float32 sum of squares would lose it
    t[7] = math.nan
    merged = ValueStats()
    for piece in torch.split(t, 7777):
        merged.merge(piece_stats(piece))
    assert_stats(merged, t, rel=1e-4)
    assert merged.std == pytest.approx(1e-3, rel=0.02)
    assert_stats(piece_stats(t), t, rel=1e-4)


def test_edge_values():
    assert piece_stats(torch.empty(0, 3)).as_dict() == {**ValueStats().as_dict(), "numel": 0}
    nan_only = piece_stats(torch.full((3,), math.nan))
    assert (nan_only.nan, nan_only.finite, nan_only.min, nan_only.std) == (3, 0, None, None)
    assert piece_stats(torch.tensor(5.0)).as_dict()["min"] == 5.0
    big = torch.full((10,), 3e38)  # finite values whose float32 sum overflows: still no non-finite counted
    s = piece_stats(big)
    assert (s.nonfinite, s.min, s.mean) == (0, pytest.approx(3e38), pytest.approx(3e38))
    assert piece_stats(torch.tensor([-0.0, 0.0, 1.0])).zeros == 2


def as_piece(t: torch.Tensor) -> Piece:
    """A tensor's memory as the offline read hands it over: by address, with no tensor view."""
    return Piece(t.data_ptr(), str(t.dtype).removeprefix("torch."), t.element_size(), tuple(t.shape),
                 tuple(t.stride()), t)


C_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int16,
            torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128, torch.complex32]


@pytest.mark.parametrize("dtype", C_DTYPES)
def test_pieces_in_memory_take_the_c_kernel_and_match_the_obvious_computation(dtype):
    if ckernel.c_kernel()[0] is None or not ckernel._c_values:
        pytest.skip("no C kernel here")
    g = torch.Generator().manual_seed(4)
    base = torch.randn(9001, generator=g) * 3 + 2  # several of the kernel's blocks, the last one short
    if dtype == torch.bool:
        t = base > 2
    elif dtype.is_complex:
        t = torch.complex(base, -base).to(dtype)
    elif dtype.is_floating_point:
        t = base.to(dtype)
        t[17], t[1500], t[4000], t[8999], t[5], t[6] = math.nan, math.inf, -math.inf, math.nan, 0.0, -0.0
        tiny = torch.finfo(dtype).smallest_normal
        t[7], t[8], t[9] = tiny / 4, -tiny / 64, -tiny  # subnormals (float16's are converted bit by bit)
    else:
        t = (base * 10).clamp(0 if dtype == torch.uint8 else -128, 127).to(dtype)
    with mock.patch.object(Piece, "tensor", side_effect=AssertionError("took the torch path")):
        got = piece_stats(as_piece(t))
    assert_stats(got, t, rel=1e-12 if dtype in (torch.float64, torch.complex128) else 1e-9)
    if not dtype.is_floating_point and not dtype.is_complex:
        assert type(got.min) is int and type(got.max) is int


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_is_classified_and_converted_exactly(dtype):
    if ckernel.c_kernel()[0] is None or not ckernel._c_values:
        pytest.skip("no C kernel here")
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)  # subnormals, NaNs, ±inf, ±0
    with mock.patch.object(Piece, "tensor", side_effect=AssertionError("took the torch path")):
        got = piece_stats(as_piece(every))
    assert_stats(got, every, rel=1e-12)


def test_pieces_the_c_kernel_does_not_serve_take_torch_and_agree():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(50, 40, generator=g)
    t[3, 4] = math.inf
    strided = t[:, ::3]  # not contiguous: the kernel reads contiguous runs only
    assert_stats(piece_stats(as_piece(strided)), strided)
    f8 = (torch.randn(300, generator=g)).to(torch.float8_e4m3fn)
    assert_stats(piece_stats(as_piece(f8)), f8, rel=1e-6)
    assert piece_stats(as_piece(torch.empty(0, 4))).as_dict() == {**ValueStats().as_dict(), "numel": 0}


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_integers_have_exact_extremes(dtype):
    # torch has no aminmax for these on the CPU (inspect --stats called them unreadable, show exited 3).
    top = {torch.uint16: 2**16 - 1, torch.uint32: 2**32 - 1, torch.uint64: 2**64 - 1}[dtype]

    def tensor(values):  # built through int64 bits: torch.tensor cannot hold 2**63 and above
        bits = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)
        return bits.view(torch.uint64) if dtype == torch.uint64 else bits.to(dtype)

    values = [0, 7, top, top // 2 + 1, 3, 0]
    got = piece_stats(as_piece(tensor(values)))
    assert (got.numel, got.zeros, got.min, got.max) == (6, 2, 0, top)
    assert got.mean == pytest.approx(sum(values) / 6, rel=1e-12)
    one = piece_stats(as_piece(tensor([top // 2 + 1])))
    assert one.min == one.max == top // 2 + 1


def test_the_c_kernel_keeps_a_small_spread_around_a_large_mean():
    if ckernel.c_kernel()[0] is None or not ckernel._c_values:
        pytest.skip("no C kernel here")
    g = torch.Generator().manual_seed(6)
    t = torch.randn(100_003, generator=g, dtype=torch.float64) * 1e-3 + 1e6  # std/mean = 1e-9
    got = piece_stats(as_piece(t))
    assert got.std == pytest.approx(float(t.std(correction=0)), rel=1e-6)
    assert got.mean == pytest.approx(float(t.mean()), rel=1e-15)
    only_nan = piece_stats(as_piece(torch.full((5,), math.nan)))
    assert (only_nan.nan, only_nan.finite, only_nan.min, only_nan.max, only_nan.std) == (5, 0, None, None, None)


# --- the rules, each shown to fire and not to fire ----------------------------------------------


def facts(*items: KeyFacts) -> dict[str, KeyFacts]:
    return {f.key: f for f in items}


def tensor(key: str, values, dtype: str = "float32") -> KeyFacts:
    t = torch.tensor(values, dtype=getattr(torch, dtype))
    return KeyFacts(key=key, kind="tensor", dtype=dtype, shape=tuple(t.shape), stats=piece_stats(t))


def obj(key: str, value) -> KeyFacts:
    return KeyFacts(key=key, kind="bytes", value=value, decoded=True)


def rules_of(found, key: str | None = None) -> set[str]:
    return {f.rule for f in found.findings if key is None or key in (f.keys or (f.key,))}


CLEAN = [tensor("model.l.weight", [[1.0, 2.0]]), tensor("model.l.bias", [0.5]),
         tensor("optim.state.l.weight.exp_avg", [[0.1, 0.0]]), tensor("optim.state.l.weight.step", 3.0),
         tensor("optim.state.l.bias.exp_avg", [0.2]), tensor("optim.state.l.bias.step", 3.0),
         obj("optim.param_groups.0.lr", 0.01), obj("optim.param_groups.0.params", ["l.weight", "l.bias"])]


def judge_with(*changes: KeyFacts, drop: tuple[str, ...] = ()) -> object:
    f = facts(*[c for c in CLEAN if c.key not in drop], *changes)
    return judge(f, list(f))


def test_clean_state_has_no_findings():
    found = judge_with()
    assert found.findings == [] and found.optimizers == ["optim"] and found.parameters_with_state == 2


def test_rule_non_finite():
    assert rules_of(judge_with(tensor("model.l.weight", [[1.0, math.nan]]))) == {"non-finite"}
    assert rules_of(judge_with(tensor("model.l.weight", [[math.inf, 1.0]]))) == {"non-finite"}
    assert rules_of(judge_with(obj("trainer.loss", math.nan))) == {"non-finite"}
    assert rules_of(judge_with(obj("optim.param_groups.0.betas", (0.9, math.inf)))) == {"non-finite"}
    assert rules_of(judge_with(obj("trainer.loss", 1.5), obj("optim.param_groups.0.betas", (0.9, 0.99)))) == set()


def test_rule_zero_moment():
    found = judge_with(tensor("optim.state.l.weight.exp_avg", [[0.0, -0.0]]))
    assert rules_of(found, "optim.state.l.weight.exp_avg") == {"zero-moment"}
    assert rules_of(judge_with(tensor("optim.state.l.weight.exp_avg", [[0.0, 1e-30]]))) == set()
    assert rules_of(judge_with(tensor("model.l.weight", [[0.0, 0.0]]))) == set()  # a zero weight is not a moment
    assert rules_of(judge_with(tensor("optim.state.l.weight.mu", 0.0))) == set()  # a 0-dim state is no moment


def test_rule_step():
    found = judge_with(tensor("optim.state.l.bias.step", 2.0), tensor("optim.state.m.weight.step", 3.0),
                       tensor("optim.state.m.weight.exp_avg", [1.0]))
    assert rules_of(found) == {"step"}
    (f,) = found.findings
    assert f.keys == ("optim.state.l.bias.step",) and "2 on 1 of 3 parameters (optim.state.l.bias.step), 3 on the other 2" in f.message
    assert rules_of(judge_with(obj("optim.state.l.bias.step", 3))) == set()  # an int step equals the tensor 3.0


def test_rule_lr():
    for bad, also in ((0.0, set()), (0, set()), (math.nan, {"non-finite"}), (math.inf, {"non-finite"})):
        assert rules_of(judge_with(obj("optim.param_groups.0.lr", bad))) == {"lr"} | also
    assert "lr" in rules_of(judge_with(tensor("optim.param_groups.0.lr", 0.0)))  # a tensor lr
    assert rules_of(judge_with(obj("optim.param_groups.0.lr", 1e-6))) == set()


def test_rule_state_missing():
    # Named by the param group's list of parameters ...
    found = judge_with(drop=("optim.state.l.bias.exp_avg", "optim.state.l.bias.step"))
    assert [(f.rule, f.key) for f in found.findings] == [("state-missing", "optim.param_groups.0.params")]
    assert "l.bias" in found.findings[0].message
    # ... and, without that list, by the model's keys (FQN-keyed state); buffers are not parameters.
    found = judge_with(tensor("model.bn.running_mean", [0.0]), drop=("optim.param_groups.0.params",
                                                                      "optim.state.l.bias.exp_avg",
                                                                      "optim.state.l.bias.step"))
    assert [(f.rule, f.key) for f in found.findings] == [("state-missing", "model.l.bias")]
    # No per-parameter state at all, but param groups: saved before the first step?
    found = judge_with(drop=("optim.state.l.weight.exp_avg", "optim.state.l.weight.step", "optim.state.l.bias.exp_avg",
                             "optim.state.l.bias.step"))
    assert rules_of(found) == {"state-missing"} and "no per-parameter state" in found.findings[0].message
    # A plain optimizer.state_dict(): state keyed by index; the params list of indices is what is checked.
    plain = facts(tensor("model.w", [1.0]), tensor("optim.state.0.exp_avg", [1.0]), obj("optim.param_groups.0.params",
                                                                                        [0]))
    assert judge(plain, list(plain)).findings == []
    plain["optim.param_groups.0.params"] = obj("optim.param_groups.0.params", [0, 1])
    assert rules_of(judge(plain, list(plain))) == {"state-missing"}


def test_foreign_names_and_no_optimizer():
    assert optimizer_part("optimizer.state.layers.0.w.exp_avg") == ("optimizer", "state", "layers.0.w", "exp_avg")
    assert optimizer_part("app.optim_state.param_groups.1.lr") == ("app.optim_state", "param_groups", "1", "lr")
    assert optimizer_part("model.layers.0.w") is None and optimizer_part("opt.state.w.exp_avg") is None
    f = facts(tensor("model.w", [1.0]), tensor("optimizer.state.w.exp_avg", [0.0]), obj("optimizer.param_groups.0.lr",
                                                                                          0.0))
    assert rules_of(judge(f, list(f))) == {"zero-moment", "lr"}
    none = facts(tensor("weights.w", [math.nan]), tensor("opt.state.w.exp_avg", [0.0]))
    found = judge(none, list(none))
    assert rules_of(found) == {"non-finite"} and "no optimizer recognised" in found.notes[0]


# --- inspect --stats --strict on planted faults ------------------------------------------------


def test_inspect_stats_names_every_planted_fault_and_strict_exits_1():
    result = inspect_checkpoint(str(cf.resume_ckpt(True)), stats=True, strict=True)
    found = {(f.rule, k) for f in result.suspicious for k in (f.keys or (f.key,))}
    assert found == {(rule, key) for rule, keys in cf.PLANTED.items() for key in keys}
    assert set(cf.PLANTED) == set(RULES) and result.exit_code == 1 and result.problems == []
    rows = {r.key: r for r in result.rows}
    weight = rows["model.0.weight"].stats
    assert (weight.nan, weight.posinf, weight.numel) == (1, 1, 32)
    assert rows["optim.state.2.weight.exp_avg"].suspicious[0].startswith("zero-moment: all 24 values are zero")
    assert inspect_checkpoint(str(cf.resume_ckpt(True)), stats=True).exit_code == 0  # reported, not failed
    clean = inspect_checkpoint(str(cf.resume_ckpt(False)), stats=True, strict=True)
    assert clean.exit_code == 0 and clean.suspicious == [] and clean.verdict_rules.parameters_with_state == 4


def invoke(*args: str, env: dict | None = None):
    r = CliRunner().invoke(cli, list(args), env={"COLUMNS": "120", "NO_COLOR": "1", **(env or {})})
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    return r


def test_cli_stats_strict_report_and_json(tmp_path):
    bad = str(cf.resume_ckpt(True))
    r = invoke("inspect", bad, "--strict", "--json", str(tmp_path / "s.json"))
    assert r.exit_code == 1, r.output
    verdict = r.output.strip().splitlines()[-1]
    assert verdict.startswith("fsdpck inspect: SUSPICIOUS (exit 1) — 6 suspicious: 2 zero-moment, ")
    for rule, keys in cf.PLANTED.items():
        assert all(any(k in ln and rule in ln for ln in r.output.splitlines()) for k in keys), (rule, r.output)
    assert max(len(ln) for ln in r.output.splitlines()[:-1]) <= 120
    doc = json.loads((tmp_path / "s.json").read_text())
    assert list(doc)[:6] == ["schema", "versions", "exit_code", "outcome", "verdict", "error"]
    assert doc["schema"] == "fsdpck.inspect/1" and doc["exit_code"] == 1 and doc["verdict"] == verdict
    assert doc["stats"] is True and doc["strict"] is True and doc["summary"]["suspicious"] == 6
    assert doc["suspicious"]["by_rule"] == {"non-finite": 1, "zero-moment": 2, "step": 1, "lr": 1, "state-missing": 1}
    w = next(k for k in doc["keys"] if k["key"] == "model.0.weight")
    assert w["stats"]["nan"] == 1 and w["stats"]["posinf"] == 1 and w["suspicious"][0].startswith("non-finite")
    lr = next(k for k in doc["keys"] if k["key"] == "optim.param_groups.0.lr")
    assert lr["value"] == "0.0" and lr["stats"] is None
    plain = invoke("inspect", bad, "--stats")
    assert plain.exit_code == 0 and "6 suspicious" in plain.output.splitlines()[-1]
    good = invoke("inspect", str(cf.resume_ckpt(False)), "--stats", "--strict")
    assert good.exit_code == 0 and good.output.strip().splitlines()[-1].endswith("stats: nothing suspicious")


# --- progress ------------------------------------------------------------------------------------


def test_progress_in_a_log_is_a_line_now_and_then(monkeypatch):
    """A read slower than FSDPCK_PROGRESS_AFTER prints a line every FSDPCK_PROGRESS_EVERY on stderr (not a terminal)."""
    import time

    import fsdpck.commands.offline as offline

    def slow(t):  # each stored piece takes 50 ms: the whole read about half a second
        time.sleep(0.05)
        return piece_stats(t)

    monkeypatch.setattr(offline, "piece_stats", slow)
    r = invoke("inspect", str(cf.resume_ckpt(False)), "--stats", env={AFTER_ENV: "0.1", EVERY_ENV: "0"})
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fsdpck: inspect: reading: ")]
    assert len(lines) >= 2 and "%) in " in lines[0] and "B/s" in lines[0], r.stderr
    assert lines[-1].startswith("fsdpck: inspect: reading: read ") and " in " in lines[-1], r.stderr
    at_once = invoke("inspect", str(cf.resume_ckpt(False)), "--stats", env={AFTER_ENV: "0"})
    assert "fsdpck: inspect: reading: 0 bytes of " in at_once.stderr
    quiet = invoke("inspect", str(cf.resume_ckpt(False)), "--stats")  # default: only after 2 seconds
    assert "inspect: reading" not in quiet.stderr


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, label, total):
        self.calls.append(("start", label, total))

    def update(self, done, elapsed):
        self.calls.append(("update", done))

    def finish(self, done, elapsed):
        self.calls.append(("finish", done))


def test_progress_shows_only_reads_that_take_a_while():
    quick = Recorder()
    with Progress(quick, after_s=60.0).reading("x", 10) as advance:
        advance(10)
    assert quick.calls == []
    at_once = Recorder()
    with Progress(at_once, after_s=0.0).reading("x", 10) as advance:
        advance(4)
        advance(6)
    assert at_once.calls[:2] == [("start", "x", 10), ("update", 0)] and at_once.calls[-1] == ("finish", 10)


def test_progress_views():
    out = io.StringIO()
    log = LogView(Console(file=out, width=100, color_system=None), every_s=5.0)
    log.start("diff: reading A", 4_000_000)
    log.update(1_000_000, 0.5)
    log.update(2_000_000, 1.0)  # within 5 s of the last line: not printed
    log.update(3_000_000, 5.5)
    log.finish(4_000_000, 6.0)
    assert out.getvalue().splitlines() == ["fsdpck: diff: reading A: 1.0 MB of 4.0 MB (25%) in 0.5s, 2.0 MB/s",
                                           "fsdpck: diff: reading A: 3.0 MB of 4.0 MB (75%) in 5.5s, 545.5 kB/s",
                                           "fsdpck: diff: reading A: read 4.0 MB in 6.0s, 666.7 kB/s"]
    tty = io.StringIO()
    bar = BarView(Console(file=tty, width=100, force_terminal=True, color_system=None))
    bar.start("inspect: reading", 2_000_000)
    bar.update(1_000_000, 1.0)
    bar.finish(2_000_000, 2.0)
    assert "inspect: reading" in tty.getvalue() and "MB" in tty.getvalue()


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_progress_settings_are_checked(value, monkeypatch):
    monkeypatch.setenv(AFTER_ENV, value)
    with pytest.raises(UsageError, match=AFTER_ENV):
        after_from_env()
    r = invoke("inspect", str(cf.resume_ckpt(False)), env={AFTER_ENV: value})
    assert r.exit_code == 2 and AFTER_ENV in r.output


def test_a_forced_torch_backend_keeps_the_statistics_on_torch(monkeypatch):
    monkeypatch.setenv("FSDPCK_FP_BACKEND", "torch")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with mock.patch.object(ckernel, "_c_values", [lambda *a: (_ for _ in ()).throw(AssertionError("C used"))]):
        assert_stats(piece_stats(as_piece(t)), t)
