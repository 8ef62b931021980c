"""An untested megatron-core stops at start-up with one line naming the tested range, unless
STEM_ALLOW_UNTESTED_MEGATRON=1 (then one warning). The installed version is mocked: 0.18.2 (a real
release between the two tested lines) and 0.20.0 (past them)."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from packaging.version import Version

from stem_megatron import megatron_version as mv


@pytest.fixture
def unchecked(monkeypatch):
    """A process that has not checked its megatron-core yet, without the override."""
    monkeypatch.setattr(mv, "_CHECKED", None)
    monkeypatch.delenv(mv.OVERRIDE_ENV, raising=False)
    return monkeypatch


@pytest.mark.parametrize("version", ["0.16.1", "0.19.2", "0.19.4"])
def test_tested_lines_pass(unchecked, version):
    unchecked.setattr(mv, "installed_version", lambda: Version(version))
    assert mv.require_tested() == Version(version)


@pytest.mark.parametrize("version", ["0.16.0", "0.17.1", "0.18.2", "0.19.0", "0.19.3rc1", "0.20.0"])
def test_untested_version_is_one_line_naming_the_range(unchecked, version):
    unchecked.setattr(mv, "installed_version", lambda: Version(version))
    with pytest.raises(mv.UntestedMegatronError) as info:
        mv.require_tested()
    msg = str(info.value)
    assert "\n" not in msg and info.value.code == 2
    assert f"megatron-core {version} is not a tested version" in msg
    assert ">=0.16.1,<0.17 or >=0.19.2,<0.20" in msg and "STEM_ALLOW_UNTESTED_MEGATRON=1" in msg


def test_override_warns_once_and_lets_it_run(unchecked):
    unchecked.setattr(mv, "installed_version", lambda: Version("0.18.2"))
    unchecked.setenv(mv.OVERRIDE_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mv.require_tested() == Version("0.18.2")
        assert mv.require_tested() == Version("0.18.2")  # checked once per process: no second warning
    untested = [w for w in caught if issubclass(w.category, mv.UntestedMegatronWarning)]
    assert len(untested) == 1 and "0.18.2 is untested" in str(untested[0].message)


def test_override_must_be_exactly_1(unchecked):
    unchecked.setattr(mv, "installed_version", lambda: Version("0.18.2"))
    unchecked.setenv(mv.OVERRIDE_ENV, "yes")
    with pytest.raises(mv.UntestedMegatronError):
        mv.require_tested()


def test_installed_version_is_what_megatron_core_reports():
    import megatron.core

    # megatron's __version__ may carry a git hash (+abc1234) when its directory sits inside a checkout.
    assert mv.installed_version() == Version(Version(megatron.core.__version__).public)


MOCK = """
    import sys
    from packaging.version import Version
    from stem_megatron import megatron_version
    megatron_version.installed_version = lambda: Version("0.18.2")
"""
REPO = Path(__file__).resolve().parents[1]


def _run(code: str, override: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != mv.OVERRIDE_ENV}
    if override:
        env[mv.OVERRIDE_ENV] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(MOCK) + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_stem_train_stops_with_one_line_and_exit_2():
    # The model import (the first thing a run does after reading its config) stops it.
    proc = _run("""
        from stem_megatron.cli.train import main
        sys.exit(main(["--config", "configs/tiny_stem.yaml"]))
    """, override=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"stem-train: megatron-core 0.18.2 is not a tested version (tested: {mv.TESTED_RANGE}); install "
        "'megatron-core==0.16.1' (Python 3.11) or 'megatron-core>=0.19.2,<0.20' (Python 3.12), or set "
        "STEM_ALLOW_UNTESTED_MEGATRON=1 to run it untested"]


def test_override_lets_the_model_and_compat_load_with_one_warning():
    proc = _run("""
        import warnings
        import stem_megatron.model
        from stem_megatron import compat
        assert compat.apply(force=True)
        print("loaded")
    """, override=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "loaded", proc.stderr[-2000:]
    assert proc.stderr.count("megatron-core 0.18.2 is untested") == 1, proc.stderr[-2000:]


def test_tools_hide_gpt_model_deprecation_log_only(caplog, monkeypatch):
    # megatron-core 0.19 logs "GPTModel IS DEPRECATED ..." for every model built (docs/megatron_versions.md).
    import logging

    from stem_megatron import cli

    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    monkeypatch.setattr(logger, "filters", [])
    cli.quiet_known_warnings()
    cli.quiet_known_warnings()  # idempotent: one filter
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        logger.warning("something else from gpt_model")
    assert [r.getMessage() for r in caplog.records] == ["something else from gpt_model"]
