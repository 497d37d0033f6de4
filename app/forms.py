"""The Train tab's method choices and settings form, read from the method registry: each method's
config dataclass to form rows and back to ``KEY=VALUE`` options, validated into a typed config."""
from __future__ import annotations

from typing import Any, Optional

from .errors import UserError


def trainable_variants() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every variant the engine can train (the registry's list)."""
    from ccad.methods import describe_methods, get_method

    return [(n, d) for n, d in describe_methods() if get_method(n).trainable]


DEFAULT_VARIANT = "ccad-v"
PRESET_CHOICES = ["tiny", "small", "base"]
FORM_HEADERS = ["setting", "type", "default", "value"]
FORM_SKIP = ("preset", "autoencoder")  # these have their own boxes above the form


def method_class(variant: Optional[str]) -> Any:
    """The registry's class for ``variant`` (a :class:`UserError` naming the known ones otherwise)."""
    from ccad.methods import get_method

    try:
        return get_method(variant or DEFAULT_VARIANT)
    except KeyError as exc:  # UnknownVariant
        raise UserError(str(exc)) from None


def method_choices() -> list[tuple[str, str]]:
    """``(title, name)`` of every trainable variant, for the Train tab's method dropdown."""
    from ccad.methods import get_method

    return [(get_method(n).title or n, n) for n, _ in trainable_variants()]


def default_variant() -> str:
    names = [n for n, _ in trainable_variants()]
    return DEFAULT_VARIANT if DEFAULT_VARIANT in names else (names[0] if names else DEFAULT_VARIANT)


def method_info(variant: Optional[str]) -> dict[str, Any]:
    """What the Train tab shows for a method, all read from the registry: its title and one-line
    description, its default preset (None: no presets) and image size, whether it has an
    ``autoencoder`` field (and its default), whether it uses the feature bank, and its options."""
    from ccad.config import option_help

    mcls = method_class(variant)
    cfg = mcls.default_config()
    preset = getattr(cfg, "preset", None)
    presets = list(getattr(mcls, "presets", None) or PRESET_CHOICES)
    if preset is not None and preset not in presets:
        presets.append(preset)
    try:
        options = option_help(mcls.Config)
    except Exception:
        options = []
    return {"name": mcls.name, "title": mcls.title or mcls.name, "description": mcls.description or "",
            "paper": getattr(mcls, "paper", ""), "preset": preset, "presets": presets if preset is not None else [],
            "image_size": int(mcls.default_image_size), "has_autoencoder": hasattr(cfg, "autoencoder"),
            "autoencoder": str(getattr(cfg, "autoencoder", "") or ""), "uses_bank": bool(mcls.uses_bank),
            "trainable": bool(mcls.trainable), "options": options}


def parse_options(text: Optional[str]) -> list[tuple[str, str]]:
    """``KEY=VALUE`` lines (blank lines and ``#`` comments skipped); a line without ``=`` is a UserError."""
    out = []
    for n, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise UserError(f"advanced options, line {n} ({line!r}): write one KEY=VALUE per line, "
                            "e.g. diffusion.start_step=200")
        out.append((key.strip(), value.strip()))
    return out


def method_config(variant: Optional[str], preset: Optional[str] = None, options: Optional[str] = None,
                  autoencoder: Optional[str] = None) -> Any:
    """The typed config section of ``variant``: its defaults, then ``preset`` and ``autoencoder``
    (only where the config has those fields), then the advanced ``KEY=VALUE`` options, validated
    with :func:`ccad.config.set_option` and the method's own check. A bad key or value is a
    :class:`UserError` naming the field."""
    from ccad.config import set_option

    mcls = method_class(variant)
    cfg = mcls.default_config()
    try:
        if preset and hasattr(cfg, "preset"):
            set_option(cfg, "preset", str(preset), "preset")
        if autoencoder is not None and str(autoencoder).strip() and hasattr(cfg, "autoencoder"):
            set_option(cfg, "autoencoder", str(autoencoder).strip(), "autoencoder")
        for key, value in parse_options(options):
            set_option(cfg, key, value, "option")
        mcls.validate_config(cfg)
    except UserError:
        raise
    except Exception as exc:  # ConfigError (names the field), or a parse error
        raise UserError(f"{mcls.title or mcls.name}: {exc}") from None
    return cfg


def _type_name(tp: Any) -> str:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is not None and args:
        inner = [_type_name(a) for a in args if a is not type(None) and a is not Ellipsis]
        kind = "optional " if type(None) in args else ("list of " if origin is tuple else "")
        return kind + " | ".join(dict.fromkeys(inner))
    return getattr(tp, "__name__", str(tp))


def _form_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return "" if v is None else str(v)


def settings_form(variant: Optional[str], preset: Optional[str] = None) -> list[list[str]]:
    """The method's settings form, generated from its config dataclass: one row
    ``[dotted name, type, default, value]`` per (nested) field, defaults for ``preset`` where the
    method has presets; ``preset`` and ``autoencoder`` have their own boxes and are left out."""
    import dataclasses
    import typing

    mcls = method_class(variant)
    cfg = mcls.default_config()
    if preset and hasattr(cfg, "preset"):
        try:
            cfg = mcls.default_config(preset)
        except Exception:
            pass
    rows: list[list[str]] = []

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            name = prefix + f.name
            tp = hints.get(f.name, type(v))
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if dataclasses.is_dataclass(v):
                walk(v, name + ".")
            elif v is None and any(dataclasses.is_dataclass(a) for a in inner):
                continue  # a section derived from the preset (set it with the preset box)
            elif name not in FORM_SKIP:
                rows.append([name, _type_name(tp), _form_value(v), _form_value(v)])

    walk(cfg, "")
    return rows


def form_options(rows: Any) -> str:
    """``KEY=VALUE`` lines for the form rows whose value differs from the default (a table from
    the UI: a list of rows or a DataFrame)."""
    if rows is None:
        return ""
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # pandas
        rows = rows.values.tolist()
    out = []
    for r in rows:
        if len(r) < 4 or not str(r[0] or "").strip():
            continue
        name, default, value = str(r[0]).strip(), _form_value(r[2]), _form_value(r[3])
        if value.strip() != default.strip():
            out.append(f"{name}={value.strip()}")
    return "\n".join(out)

