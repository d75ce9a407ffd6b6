"""inspect, diff and the manifest as separate processes: what a fresh interpreter imports, ``python -m fsdpck``.

A fresh interpreter is the only place where "does not import torch" can be seen; ``python -m
fsdpck inspect`` is how users run it in a log (stdout not a terminal: no colour, the log width).
"""

from __future__ import annotations

import subprocess
import sys

import ckpt_factory as cf
from conftest import REPO, fsdpck, worker_env


def python_c(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def test_help_shows_examples_and_does_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from fsdpck.cli import cli\n"
        "for cmd in ('inspect', 'diff'):\n"
        "    r = CliRunner().invoke(cli, [cmd, '--help'])\n"
        "    assert r.exit_code == 0, r.output\n"
        "    assert 'Examples:' in r.output and '--json' in r.output, r.output\n"
        "    print(r.output)\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
    )
    out = python_c(code)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fsdpck inspect ./ck-4 --verify-data" in out.stdout
    assert "fsdpck diff ./ck-4 ./ck-4 --values --key 'optim.state.*'" in out.stdout
    assert "--values" in out.stdout and "--chunks" in out.stdout and "--key GLOB" in out.stdout


def test_manifest_module_imports_without_torch():
    code = ("import sys; import fsdpck.checkpoint.manifest as m; "
            "assert 'torch' not in sys.modules, 'fsdpck.checkpoint.manifest imported torch'; print(m.FORMAT_VERSION)")
    out = python_c(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_bad_path_is_refused_before_torch_is_imported():
    """A usage error should not cost the seconds of importing torch (commands/inspect.py says it does not)."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from fsdpck.cli import cli\n"
        "for argv in (['inspect', '/nonexistent/ckpt'], ['diff', '/nonexistent/a', '/nonexistent/b']):\n"
        "    r = CliRunner().invoke(cli, argv)\n"
        "    assert r.exit_code == 2 and 'does not exist' in r.output, r.output\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    out = python_c(code)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "torch not imported"


def test_python_m_fsdpck_inspect_and_diff(tmp_path):
    r = fsdpck("inspect", str(cf.plain_ckpt()), "--verify-data")
    n = len(cf.flat_state(cf.plain_state()))
    assert r.code == 0, r.tail()
    assert last_line(r.out).startswith(f"fsdpck inspect: OK (exit 0) — {n} keys"), r.tail()
    assert "\x1b[" not in r.out  # no colour when stdout is not a terminal
    assert "torch.distributed is disabled" not in r.text  # PyTorch's warnings are counted, not shown
    d = fsdpck("diff", str(cf.plain_ckpt()), str(cf.plain_ckpt()), "--json", "-")
    assert d.code == 0, d.tail()
    assert '"schema": "fsdpck.diff/1"' in d.out and last_line(d.err).startswith("fsdpck diff: IDENTICAL (exit 0)")
    # A bad path: the exact code and one line, no traceback.
    bad = fsdpck("inspect", str(tmp_path / "nope"))
    assert bad.code == 2 and "Traceback" not in bad.err, bad.tail()
    assert bad.err.strip() == f"fsdpck: error: DIR {str(tmp_path / 'nope')!r} does not exist"
