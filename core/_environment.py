"""What a manifest records about where it was written: Python, platform, package versions, time."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from . import _registry
from .errors import PersistError, VersionMismatchError

# adapter (its name, target and distributions: `register_adapter(..., replace=True)` may change them) -> the
# versions it records; "" -> Python and the platform
_ENV_CACHE: dict[object, dict[str, Any]] = {}


def environment(names: list[str]) -> dict[str, Any]:
    """Python, platform and the versions of the frameworks (and their dependencies) of these adapters."""
    packages: dict[str, str] = {}
    for name in dict.fromkeys(names):
        spec = _registry.get_spec(name)
        assert spec is not None
        key = (name, spec.target, spec.package, spec.alt_packages)
        if key not in _ENV_CACHE:
            deps = getattr(_registry.get_adapter(name), "dependencies", ())
            found = {d: v for d in deps if (v := version(d)) is not None}
            for dist in (spec.package, *spec.alt_packages):  # under the name pip installed it (xgboost-cpu)
                if (v := version(dist)) is not None:
                    found[dist] = v
                    break
            _ENV_CACHE[key] = found
        packages.update(_ENV_CACHE[key])
    if "" not in _ENV_CACHE:  # once per process
        import platform

        _ENV_CACHE[""] = {"python": platform.python_version(), "implementation": sys.implementation.name,
                          "platform": _platform(), "machine": platform.machine()}
    return {**_ENV_CACHE[""], "packages": packages}


def _platform() -> str:
    """`platform.platform()` (`Linux-6.18.44-x86_64-with-glibc2.36`), on Linux without running `uname -p`.

    On Linux `platform.platform()` runs `uname -p` for the processor (a process: ~2 ms, and 7-8 ms for the
    call in a fresh process here), then drops what it says when it is `unknown` or the machine, as it is
    on most Linux systems (Gentoo's names the CPU model, which this string leaves out). Elsewhere, or
    without glibc, it is called as it is.
    """
    try:
        uname, libc = os.uname(), os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        uname, libc = None, ""
    name, _, number = libc.partition(" ")
    if uname is None or uname.sysname != "Linux" or not name or not number:
        import platform

        return platform.platform()
    text = "-".join(p.strip() for p in (uname.sysname, uname.release, uname.machine, "with", name + number) if p)
    for c in ' /\\:;"()':  # platform.platform()'s own clean-up
        text = text.replace(c, "_" if c == " " else "-")
    text = text.replace("unknown", "")
    while "--" in text:
        text = text.replace("--", "-")
    return text.rstrip("-")


def unreadable_here(exc: PersistError, recorded: Mapping[str, Any]) -> VersionMismatchError | None:
    """`exc`, a file of the artifact that could not be read, as a VersionMismatchError when the versions differ.

    Its digests matched, so the file is as it was saved: when a package that wrote it (the manifest's
    `environment.packages`) is installed here at another version, that is the likely cause (numpy 1
    cannot read numpy 2's random generators, a scikit-learn class may be newer than the one installed).
    With the same versions, None: `exc` stands.
    """
    packages = recorded.get("packages") if isinstance(recorded, Mapping) else None
    if not isinstance(packages, Mapping):
        return None
    # a package not installed here was not needed to get this far (the Keras adapter records torch for its
    # torch backend): a missing framework is a MissingFrameworkError before any file is read
    differ = {name: (str(saved), now) for name, saved in packages.items()
              if isinstance(name, str) and (now := version(name)) is not None and now != saved}
    if not differ:
        return None
    here = ", ".join(f"{name} {now} (saved with {saved})" for name, (saved, now) in differ.items())
    pins = " ".join(f"'{name}=={saved}'" for name, (saved, _) in differ.items())
    return VersionMismatchError(f"{exc}. This environment has {here}, and a file that cannot be read by other "
                                f"versions than its own is the likely cause: install the versions it was saved "
                                f"with (pip install {pins}; `mlpersist requirements PATH` lists them all)")


def framework_version(spec: _registry.AdapterSpec) -> str | None:
    """The installed version of the adapter's framework, under any of its distribution names."""
    for dist in (spec.package, *spec.alt_packages):
        if (v := version(dist)) is not None:
            return v
    return None


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string, as adapters compare a framework's: '3.15.1' -> (3, 15).

    The leading digits of the first two dot-separated parts, 0 where there are none, and nothing after a
    local label: '2.13.0+cpu' -> (2, 13), '3.16.0.dev2026' -> (3, 16), '3.10rc1' -> (3, 10), '4' -> (4, 0).
    """
    parts = [*version.partition("+")[0].split(".")[:2], "0"][:2]
    major, minor = (int(m[0]) if (m := re.match(r"\d+", part)) else 0 for part in parts)
    return major, minor


def mlpersist_version() -> str:
    """The installed mlpersist version."""
    return version("mlpersist") or "unknown"


@functools.cache
def version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None.

    Looked up once per process, like `environment`. importlib.metadata's `version` parses the whole
    METADATA file as an e-mail (its long description too): 2.4 ms for scikit-learn, 2.6 ms for scipy in
    a fresh process here. Its headers are read instead, up to the `Version` one; importlib.metadata's
    parse is the fallback, for a file without one among its headers.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        found = distribution(dist)
    except PackageNotFoundError:
        return None
    for line in (found.read_text("METADATA") or found.read_text("PKG-INFO") or "").splitlines():
        if not line:
            break  # the end of the headers
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == "version" and value.strip():
            return value.strip()
    try:  # `get_all`: a missing key through `[...]` (what `.version` does) warns on Python 3.12+, and will raise
        fallback = found.metadata.get_all("Version") or []
    except (AttributeError, TypeError, ValueError):  # no metadata file at all
        return None
    return str(fallback[0]) if fallback and fallback[0] else None


def created_at() -> str:
    """The current UTC time as a manifest records it (`created_at`)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
