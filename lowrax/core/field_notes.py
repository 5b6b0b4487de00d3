"""What each field of a config dataclass means, read from the comments beside it in the source.

The comment on a field's line (or the comment lines just above it) is its documentation; keeping
it there, next to the default, is what keeps `lowrax train --help-config` from drifting.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing

from lowrax.core.checked import describe


@functools.cache
def field_notes(cls: type) -> dict[str, str]:
    """{field name: its comment} for a dataclass, its base classes' fields included (where the
    source is available)."""
    notes = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            notes.update(_own_notes(klass))
    return notes


def _own_notes(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    notes, above, line_of_name = {}, [], {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            name = line_of_name.get(token.start[0])
            if name is not None:
                notes[name] = " ".join([*above, text]).strip()
                above = []
            else:
                above.append(text)
        elif token.type == tokenize.NAME and token.start[1] == 4 and token.start[0] not in line_of_name:
            line_of_name[token.start[0]] = token.string  # a class-level statement: `name: type = value`
            if above:
                notes[token.string] = " ".join(above)
                above = []
        elif token.type == tokenize.NL and token.start[1] == 0:
            above = []  # a blank line ends a comment block
    fields = {f.name for f in dataclasses.fields(cls)}
    return {name: note for name, note in notes.items() if name in fields}


def field_rows(config) -> list[tuple[str, object, str, str]]:
    """(name, value, expected form, note) of each field of the dataclass instance `config`."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    notes = field_notes(type(config))
    return [(f.name, getattr(config, f.name), describe(hints[f.name]) if f.name in hints else "",
             notes.get(f.name, "")) for f in dataclasses.fields(config)]
