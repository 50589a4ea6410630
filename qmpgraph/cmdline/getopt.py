"""GNU ``getopt_long`` as qemu-storage-daemon calls it, with glibc's messages.

qsd's short-option string starts with ``-``, so non-options are returned in
place (QEMU then rejects them as "Unexpected argument") instead of being
permuted to the end; ``--`` ends the scan and what follows is ignored.
Long options may be abbreviated to any unique prefix and take their argument
either as ``--opt=arg`` or as the next word.

What does not live here: what each option means (``qmpgraph.cmdline.qsd``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from qmpgraph.cmdline.errors import CmdlineError

__all__ = ["NONOPTION", "Opt", "OptSpec", "getopt_long"]

#: ``Opt.name`` of a word that is not an option.
NONOPTION = ""


@dataclass(frozen=True, slots=True)
class OptSpec:
    """One option: its long name, its short letter (if any), whether it takes an argument.

    ``exact`` options match only when spelled in full: qmpgraph's own
    options use it so that they never make an abbreviation qsd accepts
    ambiguous (``--tr`` stays ``--trace``).
    """

    name: str
    short: str | None
    has_arg: bool
    exact: bool = False


@dataclass(frozen=True, slots=True)
class Opt:
    """One parsed option: the spec's long name (or NONOPTION), its argument,
    and the words of argv it came from (QEMU's error location)."""

    name: str
    arg: str | None
    words: tuple[str, ...]

    @property
    def location(self) -> str:
        """The prefix QEMU's ``error_report`` puts before messages about it."""
        return " ".join(self.words)


def _long(specs: Sequence[OptSpec], argv: Sequence[str], i: int) -> tuple[Opt | CmdlineError, int]:
    word = argv[i]
    body = word[2:]
    name, eq, value = body.partition("=")
    exact = [s for s in specs if s.name == name]
    found = exact or [s for s in specs if s.name.startswith(name) and not s.exact]
    if not found:
        return CmdlineError(f"unrecognized option '{word}'"), i + 1
    if len(found) > 1:
        names = " ".join(f"'--{s.name}'" for s in found)
        return CmdlineError(f"option '--{name}' is ambiguous; possibilities: {names}"), i + 1
    spec = found[0]
    if not spec.has_arg:
        if eq:
            return CmdlineError(f"option '--{spec.name}' doesn't allow an argument"), i + 1
        return Opt(spec.name, None, (word,)), i + 1
    if eq:
        return Opt(spec.name, value, (word,)), i + 1
    if i + 1 >= len(argv):
        return CmdlineError(f"option '--{spec.name}' requires an argument"), i + 1
    return Opt(spec.name, argv[i + 1], (word, argv[i + 1])), i + 2


def getopt_long(specs: Sequence[OptSpec], argv: Sequence[str]) -> Iterator[Opt | CmdlineError]:
    """Scan ``argv`` (without the program name) in order.

    Yields each option, each non-option (``NONOPTION``), and a
    ``CmdlineError`` (glibc's text) for each malformed one, as getopt would
    return ``?`` and carry on.
    """
    by_letter = {s.short: s for s in specs if s.short}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return
        if word.startswith("--"):
            result, i = _long(specs, argv, i)
            yield result
            continue
        if not word.startswith("-") or word == "-":
            yield Opt(NONOPTION, word, (word,))
            i += 1
            continue
        # A cluster of short options: "-hV", "-Tpattern".
        pos = 1
        i += 1
        while pos < len(word):
            letter = word[pos]
            pos += 1
            spec = by_letter.get(letter)
            if spec is None:
                yield CmdlineError(f"invalid option -- '{letter}'")
                continue
            if not spec.has_arg:
                yield Opt(spec.name, None, (word,))
                continue
            if pos < len(word):
                yield Opt(spec.name, word[pos:], (word,))
            elif i < len(argv):
                yield Opt(spec.name, argv[i], (word, argv[i]))
                i += 1
            else:
                yield CmdlineError(f"option requires an argument -- '{letter}'")
            break
