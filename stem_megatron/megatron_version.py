"""The megatron-core releases this project is tested with, and the start-up check against them.

Two lines are tested, each by its own CI lane (README "Supported megatron-core",
docs/megatron_versions.md):

- 0.16.1 on Python 3.11: `make setup && make test` (the full suite);
- 0.19.x (0.19.2 or newer) on Python 3.12: `make setup-py312 && make test-py312` (a focused suite).

`require_tested()` runs when the model, the trainer or the CPU compat layer is imported/applied. A
megatron-core outside both lines stops there with one line naming the tested range (exit code 2
through `cli.run`), because the CPU routes in `compat.py` and the APIs the model uses are only
known to hold for these versions. Setting STEM_ALLOW_UNTESTED_MEGATRON=1 turns the stop into one
warning (then `compat.apply()` installs every route whose site it can find).

Only the installed distribution's metadata is read: megatron itself is not imported, so an
untested release that would break at import is still reported by this one line.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from stem_megatron.errors import EXIT_INPUT, UserError

# line name -> the releases of that line the tests ran on (pre-releases are never in a line).
TESTED_LINES: dict[str, str] = {
    "0.16": ">=0.16.1,<0.17",  # Python 3.11 (also installs on 3.12)
    "0.19": ">=0.19.2,<0.20",  # Python >= 3.12 only (cp312 wheels)
}
TESTED_RANGE = " or ".join(TESTED_LINES.values())
OVERRIDE_ENV = "STEM_ALLOW_UNTESTED_MEGATRON"


class UntestedMegatronError(UserError):
    """The installed megatron-core is outside TESTED_LINES and no override is set."""


class UntestedMegatronWarning(UserWarning):
    """The installed megatron-core is untested and STEM_ALLOW_UNTESTED_MEGATRON=1 lets it run."""


def installed_version() -> Version | None:
    """The version of the megatron-core that `import megatron.core` would load; None if there is none.

    Read from that package's `package_info.py` (a source checkout on PYTHONPATH counts, not just
    the pip distribution), falling back to the distribution metadata. megatron.core is not imported.
    """
    text = None
    try:
        spec = importlib.util.find_spec("megatron.core")  # imports the `megatron` namespace only
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        info = os.path.join(list(spec.submodule_search_locations)[0], "package_info.py")
        try:
            with open(info) as f:
                fields = dict(re.findall(r"^(MAJOR|MINOR|PATCH|PRE_RELEASE) = ['\"]?([^'\"\n]*)['\"]?$",
                                         f.read(), re.M))
            text = f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}{fields.get('PRE_RELEASE', '')}"
        except (OSError, KeyError):
            text = None
    if text is None:
        try:
            text = metadata.version("megatron-core")
        except metadata.PackageNotFoundError:
            return None
    try:
        return Version(text)
    except InvalidVersion:
        return Version("0")  # a free-form local version: compared as untested, not silently accepted


def tested_line(version: Version | None) -> str | None:
    """The TESTED_LINES name `version` belongs to, or None."""
    if version is None:
        return None
    for name, spec in TESTED_LINES.items():
        if SpecifierSet(spec).contains(version, prereleases=False):
            return name
    return None


_CHECKED: Version | None = None  # the installed version once it passed (or was let through)


def override_set() -> bool:
    return os.environ.get(OVERRIDE_ENV, "") == "1"


def require_tested(version: Version | None = None) -> Version | None:
    """Stop with one line if megatron-core is untested (unless overridden); return its version.

    `version`: what to check (default: the installed one, checked once per process so that the
    override's warning shows once). Returns None when megatron-core is not installed at all (the
    import that follows then says so itself).
    """
    global _CHECKED
    if version is None:
        if _CHECKED is not None:
            return _CHECKED
        version = installed_version()
        if version is None:
            return None
        _CHECKED = require_tested(version)
        return _CHECKED
    if tested_line(version) is not None:
        return version
    if override_set():
        warnings.warn(f"megatron-core {version} is untested (tested: {TESTED_RANGE}); running anyway because "
                      f"{OVERRIDE_ENV}=1", UntestedMegatronWarning, stacklevel=2)
        return version
    raise UntestedMegatronError(
        f"megatron-core {version} is not a tested version (tested: {TESTED_RANGE}); install "
        "'megatron-core==0.16.1' (Python 3.11) or 'megatron-core>=0.19.2,<0.20' (Python 3.12), "
        f"or set {OVERRIDE_ENV}=1 to run it untested", EXIT_INPUT)
