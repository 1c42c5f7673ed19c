"""Typed config fields: the machinery of the frozen config sections (``train.settings``,
``train.sections``). :func:`_f` declares a field with its default, meaning and bounds;
:func:`read` validates ``config.<section>`` into its dataclass, naming the first bad field;
:func:`config_section` gives the ml_collections section of the defaults (what
``configs/base.py`` holds). Field types: ``bool``, ``str`` (optionally one of ``choices``),
``int``, ``float``, ``Optional[int]`` / ``Optional[float]`` (None allowed) and ``Tuple[int, ...]``
(a tuple or list of ints, each within the bounds, of ``length`` when given).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Type, TypeVar

import ml_collections
import numpy as np

T = TypeVar("T")


def _f(default: Any, doc: str, lo: Optional[float] = None, hi: Optional[float] = None,
       hi_ok: bool = True, lo_ok: bool = True, choices: Optional[Sequence[str]] = None,
       length: Optional[int] = None,
       rule: Optional[Tuple[Callable[[Any], bool], str]] = None):
  """A dataclass field with its meaning and bounds (``lo``/``hi`` None: unbounded; ``choices``:
  the strings allowed; ``length``: of a tuple; ``rule``: (predicate, what it requires) checked
  on a tuple after its elements)."""
  return dataclasses.field(default=default, metadata={
      "doc": doc, "lo": lo, "hi": hi, "hi_ok": hi_ok, "lo_ok": lo_ok,
      "choices": None if choices is None else tuple(choices), "length": length, "rule": rule})


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _kind(field_type) -> Tuple[str, bool]:
  """(base type name, None allowed) of a field's annotation (a string under
  ``from __future__ import annotations``)."""
  t = field_type if isinstance(field_type, str) else getattr(field_type, "__name__",
                                                              str(field_type))
  t = t.replace("typing.", "").replace(" ", "")
  if t.startswith("Optional[") and t.endswith("]"):
    return t[len("Optional["):-1], True
  return t, False


def _span(m) -> str:
  lo, hi = m.get("lo"), m.get("hi")
  low = "" if lo is None else f"{'>=' if m.get('lo_ok', True) else '>'} {lo}"
  if hi is None:
    return low
  return (f"in {'[' if m.get('lo_ok', True) else '('}{lo}, {hi}"
          f"{']' if m.get('hi_ok', True) else ')'}")


def _in_bounds(m, value) -> bool:
  lo, hi = m.get("lo"), m.get("hi")
  ok = math.isfinite(value)
  ok = ok and (lo is None or value > lo or (m.get("lo_ok", True) and value == lo))
  return ok and (hi is None or value < hi or (m.get("hi_ok", True) and value == hi))


def _number(name: str, m, value: Any, is_int: bool, optional: bool):
  number = _is_int(value) if is_int else (isinstance(value, (int, float, np.number))
                                          and not isinstance(value, bool))
  if not (number and _in_bounds(m, value)):
    what = f"{'an int' if is_int else 'a finite number'} {_span(m)}".rstrip()
    raise ValueError(f"{name} must be {'None or ' if optional else ''}{what}, got {value!r}")
  return int(value) if is_int else float(value)


def _ints(name: str, m, value: Any) -> tuple:
  n, rule = m.get("length"), m.get("rule")
  ok = (isinstance(value, (tuple, list)) and (n is None or len(value) == n)
        and all(_is_int(v) and _in_bounds(m, v) for v in value))
  ok = ok and (rule is None or rule[0](tuple(value)))
  if not ok:
    count = "" if n is None else f"{n} "
    extra = "" if rule is None else f", {rule[1]}"
    raise ValueError(f"{name} must be a tuple of {count}ints {_span(m)}{extra}, got {value!r}")
  return tuple(int(v) for v in value)


def _check(section: str, field: dataclasses.Field, value: Any) -> Any:
  """``value`` of ``config.<section>.<field>`` checked against the field's type and bounds."""
  m, name = field.metadata, f"config.{section}.{field.name}"
  kind, optional = _kind(field.type)
  if optional and value is None:
    return None
  if kind == "bool":
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)
  if kind == "str":
    if not isinstance(value, str):
      raise ValueError(f"{name} must be a string, got {value!r}")
    if m.get("choices") is not None and value not in m["choices"]:
      raise ValueError(f"{name} must be one of {m['choices']}, got {value!r}")
    return value
  if kind.startswith("Tuple["):
    return _ints(name, m, value)
  return _number(name, m, value, kind == "int", optional)


def read(config, section: str, cls: Type[T]) -> T:
  """``config.<section>`` as the frozen dataclass ``cls`` (absent fields take their default).

  Raises:
    ValueError: naming the first bad field.
  """
  values = config.get(section, None) or {}
  return cls(**{f.name: _check(section, f, values.get(f.name, f.default))
                for f in dataclasses.fields(cls)})


def config_section(cls) -> ml_collections.ConfigDict:
  """A ``ConfigDict`` of ``cls``'s defaults (what ``configs/base.py`` holds for the section)."""
  return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(cls)})


def describe(cls) -> str:
  """One line per field: ``name = default: meaning``."""
  return "\n".join(f"{f.name} = {f.default!r}: {f.metadata.get('doc', '')}"
                   for f in dataclasses.fields(cls))
