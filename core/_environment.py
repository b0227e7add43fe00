"""What a manifest records about where it was written: Python, platform, package versions, time."""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any

from . import _registry
from .errors import PersistError, VersionMismatchError

_ENV_CACHE: dict[str, dict[str, Any]] = {}


def environment(names: list[str]) -> dict[str, Any]:
    """Python, platform and the versions of the frameworks (and their dependencies) of these adapters."""
    packages: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name not in _ENV_CACHE:
            spec = _registry.get_spec(name)
            assert spec is not None
            deps = getattr(_registry.get_adapter(name), "dependencies", ())
            found = {d: v for d in deps if (v := version(d)) is not None}
            for dist in (spec.package, *spec.alt_packages):  # under the name pip installed it (xgboost-cpu)
                if (v := version(dist)) is not None:
                    found[dist] = v
                    break
            _ENV_CACHE[name] = found
        packages.update(_ENV_CACHE[name])
    if "" not in _ENV_CACHE:  # platform.platform() reads files: once per process
        import platform

        _ENV_CACHE[""] = {"python": platform.python_version(), "implementation": sys.implementation.name,
                          "platform": platform.platform(), "machine": platform.machine()}
    return {**_ENV_CACHE[""], "packages": packages}


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


def mlpersist_version() -> str:
    """The installed mlpersist version."""
    return version("mlpersist") or "unknown"


@functools.cache
def version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None.

    Looked up once per process, like `environment`: importlib.metadata scans sys.path and parses
    METADATA, a millisecond or more per call, on every save and load otherwise.
    """
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v(dist)
    except PackageNotFoundError:
        return None


def created_at() -> str:
    """The current UTC time as a manifest records it (`created_at`)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
