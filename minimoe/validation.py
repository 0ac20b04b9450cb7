"""Settings are checked before any work starts: every field has a type and a range, and a bad value is refused
with one message that names the section, each bad field, its value and what was expected.

    check = Checks("PretrainConfig", config)
    check.integer("batch_size", minimum=1)     # True is not an integer, nor is "64" or 64.0
    check.real("lr", above=0)                  # an int is a fine real; NaN and ±inf are not
    check.real("min_lr", minimum=0)
    if check.ok("lr", "min_lr") and config.min_lr > config.lr:  # consistency, once both fields are valid
        check.fail("min_lr", f"min_lr={config.min_lr} must be ≤ lr={config.lr}")
    check.done()                               # ConfigError listing every problem found

The configuration dataclasses (ModelConfig, PretrainConfig, GRPOConfig) derive from `Config`: they validate
themselves on construction and `from_dict` refuses unknown keys, listing the known ones.
"""

import dataclasses
import math
import numbers
from collections.abc import Mapping

__all__ = ["ConfigError", "Checks", "Config", "is_integer", "is_real"]


class ConfigError(ValueError):
    """A setting has the wrong type, lies outside its range, or disagrees with another setting."""


def is_integer(value):
    """An int (or NumPy integer) that is not a bool: `True` is not the number of layers."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    """A finite int or float (NumPy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _interval(minimum, above, maximum, below):
    """The allowed range in words: '≥ 1', '> 0', 'in [0, 1)'."""
    low = f"[{minimum}" if minimum is not None else f"({above}" if above is not None else None
    high = f"{maximum}]" if maximum is not None else f"{below})" if below is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"≥ {minimum}" if minimum is not None else f"> {above}"
    return f"≤ {maximum}" if maximum is not None else f"< {below}"


class Checks:
    """Collects the problems of one section (`values`: an object with attributes, or a dict) and raises them all
    together in `done()`. Each check returns whether the field is valid."""

    def __init__(self, section, values):
        self.section, self.values = section, values
        self.problems, self.bad = [], set()

    def __getitem__(self, name):
        return self.values[name] if isinstance(self.values, Mapping) else getattr(self.values, name)

    def fail(self, name, message):
        """Record a problem with field `name` (message: "name=value must be …")."""
        self.bad.add(name)
        self.problems.append(message)
        return False

    def ok(self, *names):
        """True when none of these fields has failed a check (so a consistency check can use them)."""
        return not self.bad.intersection(names)

    def _number(self, name, kind, test, optional, minimum, above, maximum, below):
        value = self[name]
        if value is None and optional:
            return True
        if not test(value):
            finite = " finite" if kind == "number" else ""
            noun = "an integer" if kind == "integer" else f"a{finite} {kind}"
            return self.fail(name, f"{name}={value!r} must be {noun}{' or None' if optional else ''} "
                                   f"(got {type(value).__name__})")
        if ((minimum is not None and value < minimum) or (above is not None and value <= above)
                or (maximum is not None and value > maximum) or (below is not None and value >= below)):
            return self.fail(name, f"{name}={value!r} must be {_interval(minimum, above, maximum, below)}")
        return True

    def integer(self, name, minimum=None, maximum=None, optional=False):
        return self._number(name, "integer", is_integer, optional, minimum, None, maximum, None)

    def real(self, name, minimum=None, above=None, maximum=None, below=None, optional=False):
        return self._number(name, "number", is_real, optional, minimum, above, maximum, below)

    def flag(self, name):
        value = self[name]
        return isinstance(value, bool) or self.fail(name, f"{name}={value!r} must be true or false "
                                                          f"(got {type(value).__name__})")

    def choice(self, name, options):
        value = self[name]
        return (isinstance(value, str) and value in options) or \
            self.fail(name, f"{name}={value!r} must be one of {', '.join(map(repr, options))}")

    def optimizer_schedule(self, warmup_within_steps=True):
        """AdamW with warm-up and cosine decay (minimoe.optim), as every training loop here runs it: lr > 0 decaying
        towards 0 ≤ min_lr ≤ lr, weight_decay ≥ 0, grad_clip > 0; and warmup_steps ≤ steps, unless the caller
        checks the warm-up against its own count of optimizer steps."""
        self.real("lr", above=0)
        self.real("min_lr", minimum=0)
        self.real("weight_decay", minimum=0)
        self.real("grad_clip", above=0)
        if self.ok("lr", "min_lr") and self["min_lr"] > self["lr"]:
            self.fail("min_lr", f"min_lr={self['min_lr']} must be ≤ lr={self['lr']} (the schedule decays towards it)")
        if warmup_within_steps and self.ok("steps", "warmup_steps") and self["warmup_steps"] > self["steps"]:
            self.fail("warmup_steps", f"warmup_steps={self['warmup_steps']} must be ≤ steps={self['steps']}")

    def done(self):
        if self.problems:
            raise ConfigError(f"{self.section}: " + "; ".join(self.problems))


class Config:
    """Base of the configuration dataclasses: each one validates itself on construction (`validate`, which
    raises ConfigError naming every bad field) and converts to and from plain dicts (a JSON section, a checkpoint).
    Validation runs on construction and on `validate()`: call it again after changing a field by hand."""

    def __post_init__(self):
        self.validate()

    def validate(self):
        raise NotImplementedError

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build from a dict of fields, refusing unknown keys; a missing key takes its default (so a config
        saved before a field existed still loads)."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{cls.__name__}: expected a dict of fields, got {type(values).__name__} {values!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, values)) - set(known))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)
