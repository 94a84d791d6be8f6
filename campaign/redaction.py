"""Keeping secrets out of what campaign prints: what a secret looks like, and values quoted safely.

The API key, the unsubscribe and webhook secrets and a database's password live in environment
variables. A user may still paste one where another value belongs: a manifest key, a list's path, a
database's URL. `looks_like_secret` decides whether a value may be one: it holds a Nylas API key
(`nyk_…`), the value of a secret variable, or a long random-looking token (a base32 TOTP seed's
too). `quote_value` is how an error message repeats a value: its repr, or `HIDDEN` in its place.
`scrub_secrets` masks the known secret values (and Nylas keys) in any text, the CLI's last check
before it prints an error.
`secret_values` reads those values from the environment; everything else here is pure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_SECRET_ENVS",
    "HIDDEN",
    "MASK",
    "SECRET_ANYWHERE",
    "holds_secret",
    "looks_like_secret",
    "quote_value",
    "scrub_secrets",
    "secret_values",
]

# The variables that hold secrets unless a manifest or an option names others: the API key
# (api.key_env), the unsubscribe secret(s) (unsubscribe.secret_env, --secret-env), the webhook
# secret(s) (--webhook-secret-env) and libpq's database password.
DEFAULT_SECRET_ENVS = ("NYLAS_API_KEY", "CAMPAIGN_UNSUBSCRIBE_SECRET", "NYLAS_WEBHOOK_SECRET", "PGPASSWORD")
# What an error message says in place of a value that looks like a secret.
HIDDEN = "(a value that looks like a secret, not shown)"
# What a known secret becomes in a message the CLI prints.
MASK = "***"

# A known secret this long is recognised inside any text (a path, a URL, a message); a shorter one (a
# database password such as "postgres" is also a user's name) only as a whole value. Unsubscribe
# secrets are at least this long, API keys and webhook secrets longer.
SECRET_ANYWHERE = 16
# Secrets are separated by commas or whitespace in a variable that holds several (during a rotation).
_SEVERAL = re.compile(r"[\s,]+")
_NYLAS_KEY = re.compile(r"nyk_[A-Za-z0-9_-]{4,}")
# A long run of token characters; a UUID (a grant id) is an identifier, not a secret, and is taken out.
_RUN = re.compile(r"[A-Za-z0-9_-]{32,}")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_HEX = re.compile(r"[0-9a-f]{32,}|[0-9A-F]{32,}")
# The pieces people read a name in: a capitalised or lower-case word, an upper-case word, a number.
_PIECE = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
# Random letters and digits break into pieces of 1.8 characters on average, words and numbers into
# pieces of 3 and more; names cut by '_' or '-' more often than one character in eight are
# people's (a slug, a date), not a token's.
_MOST_PIECE_LENGTH = 2.5
_MOST_SEPARATORS = 1 / 8
# A base32 secret (a TOTP seed as an authenticator's setup shows it, JBSWY3DPEHPK3PXP…): 16 or more
# capitals and digits 2-7, as an environment variable's name may be written. A seed's digits fall
# anywhere, one character in six; a name holds one or two at most (KEYV2, AWSS3), so three mark a seed.
# With fewer, its letters tell: a seed's are a fifth vowels and a quarter rare ones (J, K, Q, V, W, X,
# Z), a word's two fifths vowels and hardly any rare ones; the vowels less the rare letters come to
# under a tenth of the letters in nearly every seed. A short name with one digit may read so too
# (LINKSIGNINGKEYV2): the letters are asked only of a run with two digits, or of a long one (24 or
# more). A variable's name taken for a secret is refused, so this errs towards names: a seed with no
# digit, or a short one with one, is not recognised.
_BASE32 = re.compile(r"(?<![A-Za-z0-9])[A-Z2-7]{16,}(?![A-Za-z0-9])")
_SEED_DIGITS = 3
_VOWELS = frozenset("AEIOU")
_RARE = frozenset("JKQVWXZ")
_MOST_WORDLIKE = 0.1
_LONG_SEED = 24


def secret_values(names: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The secrets in the variables `DEFAULT_SECRET_ENVS` and `names` name, those that are set: each
    value whole and each of the secrets it lists, longest first. Never shown: only to look for."""
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    for name in (*DEFAULT_SECRET_ENVS, *names):
        value = environ.get(name, "").strip()
        found.update(part for part in (value, *_SEVERAL.split(value)) if part)
    return tuple(sorted(found, key=lambda secret: (-len(secret), secret)))


def holds_secret(value: str, known: Iterable[str] = ()) -> bool:
    """Whether `value` surely holds a secret: one of the `known` secret values (one of 16 characters or
    more anywhere in it, a shorter one as the whole value) or a Nylas API key (`nyk_…`). Unlike
    `looks_like_secret`, never a guess: a value that holds one is refused, not merely hidden."""
    return any(_holds(value, secret) for secret in known) or _NYLAS_KEY.search(value) is not None


def looks_like_secret(value: str, known: Iterable[str] = ()) -> bool:
    """Whether `value` holds what may be a secret: what `holds_secret` finds, a long random-looking
    token (32 or more letters, digits, '_' and '-', with letters and digits, that reads as no words:
    hex, base64url, an API token), or a base32 one (16 or more capitals and digits 2-7 that read as no
    name: a TOTP seed). Ordinary values (addresses, URLs, paths, names, upper-case variable names,
    dates, UUIDs) are not."""
    text = str(value)
    if holds_secret(text, known):
        return True
    text = _UUID.sub(" ", text)
    return any(_looks_random(run) for run in _RUN.findall(text)) or any(
        _looks_base32(run) for run in _BASE32.findall(text)
    )


def quote_value(value: object, known: Iterable[str] = (), *, bare: bool = False) -> str:
    """`value` as an error message repeats it: its repr (or, `bare`, its text, e.g. a path), or
    `HIDDEN` when it looks like a secret (`looks_like_secret`, with the `known` secret values)."""
    if looks_like_secret(str(value), known):
        return HIDDEN
    return str(value) if bare else repr(value)


def scrub_secrets(text: str, known: Iterable[str]) -> str:
    """`text` with every `known` secret value of 16 characters or more, and anything like a Nylas API
    key, replaced by `MASK` (a shorter secret may be an everyday word: `quote_value` hides it whole)."""
    for secret in sorted(known, key=len, reverse=True):
        if len(secret) >= SECRET_ANYWHERE:
            text = text.replace(secret, MASK)
    return _NYLAS_KEY.sub(MASK, text)


def _holds(text: str, secret: str) -> bool:
    if len(secret) >= SECRET_ANYWHERE:
        return secret in text
    return bool(secret) and text.strip() == secret


def _looks_random(run: str) -> bool:
    if not _has_letters_and_digits(run):
        return False
    if any(_has_letters_and_digits(found) for found in _HEX.findall(run)):
        return True  # 32 hex digits and more: a digest or a key
    separators = sum(char in "_-" for char in run)
    if separators > len(run) * _MOST_SEPARATORS:
        return False
    pieces = _PIECE.findall(run)
    return sum(map(len, pieces)) / len(pieces) <= _MOST_PIECE_LENGTH


def _looks_base32(run: str) -> bool:
    digits = sum(char.isdigit() for char in run)
    if digits >= _SEED_DIGITS:
        return True
    if digits == 0 or (digits == 1 and len(run) < _LONG_SEED):
        return False
    letters = [char for char in run if char.isalpha()]
    wordlike = sum(char in _VOWELS for char in letters) - sum(char in _RARE for char in letters)
    return wordlike <= len(letters) * _MOST_WORDLIKE


def _has_letters_and_digits(text: str) -> bool:
    return any(char.isalpha() for char in text) and any(char.isdigit() for char in text)
