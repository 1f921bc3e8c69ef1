"""Settings saved in a run folder, rebuilt on resume, and checked against options given again.

A resumed run or evaluation reads everything from its folder, so ``--run-dir DIR --resume``
is the whole command. An option given again must equal the saved value, except the few a
caller declares changeable; a difference is one error naming the option and both values.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Mapping

from agents.errors import SelfImproveError


class SettingsError(SelfImproveError):
    """Saved settings are unreadable, or an option given on resume differs from them."""


def from_dict(cls, data: Mapping[str, Any]):
    """A dataclass from its ``asdict``/JSON form: nested dataclasses and tuples rebuilt, missing keys defaulted."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = from_dict(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def read_saved(path: Path) -> dict | None:
    """The JSON object saved at path, or None when there is none."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SettingsError(f"{path}: cannot read the saved settings: {err}") from err
    if not isinstance(saved, dict):
        raise SettingsError(f"{path}: the saved settings are not a JSON object")
    return saved


def _get(data: Mapping, dotted: str):
    for key in dotted.split("."):
        data = data[key]
    return data


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def settings_with_options(
    cls,
    saved: dict | None,
    options: Mapping[str, Any],
    *,
    flags: Mapping[str, str],
    changeable: tuple[str, ...] = (),
    where: Path | None = None,
):
    """Build ``cls`` from saved settings (or its defaults) and the options given; None means not given.

    ``options`` maps dotted setting paths ('loop.cycles') to values; ``flags`` maps the same
    paths to the option names a user typed ('--cycles'), for the error messages. A value the
    class refuses is a SettingsError naming the option that brought it, so the range checks
    live in the settings classes alone. With saved settings, a given option that changes a
    saved value raises SettingsError unless its path is in ``changeable``.
    """
    given = {path: value for path, value in options.items() if value is not None}
    try:
        base = {} if saved is None else from_dict(cls, saved).to_dict()
    except (TypeError, ValueError) as err:
        raise SettingsError(f"{where or 'saved settings'}: the saved settings are not valid ({err})") from None
    data = copy.deepcopy(base)
    for path, value in given.items():
        wanted = _get(_checked(cls, base, path, value, flags).to_dict(), path)  # normalised as the class does it
        if saved is not None and wanted != _get(base, path) and path not in changeable:
            raise SettingsError(
                f"{flags.get(path, path)} {_shown(value)} differs from the saved {_shown(_get(base, path))}"
                f"{f' in {where}' if where else ''}; resume without it, or choose another --run-dir"
            )
        _set(data, path, value)
    return from_dict(cls, data)


def _checked(cls, base: Mapping, path: str, value, flags: Mapping[str, str]):
    """``cls`` from base with one option set; a value it refuses is a SettingsError naming the option."""
    data = copy.deepcopy(dict(base))
    _set(data, path, value)
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError) as err:
        raise SettingsError(f"{flags.get(path, path)} {_shown(value)}: {err}") from None


def leaf_differences(saved: Mapping, wanted: Mapping, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, saved value, wanted value) for every leaf setting that differs, in key order."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += leaf_differences(a, b, f"{path}.")
        elif a != b:
            out.append((path, a, b))
    return out
