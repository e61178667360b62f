"""Text that leaves the process: error chains written to logs without secrets, messages shown as plain text.

`masked(text)` hides Hugging Face tokens (and the host's HF_TOKEN, whatever its shape), bearer credentials and
token-like URL parameters; `log_exception` logs an error with its whole chain (causes and contexts) masked so;
`plain_markdown(text)` makes any text show as itself in a Markdown component: no HTML, no image, no link but a bare
http(s) address linked to itself.
"""

from __future__ import annotations

import html
import logging
import os
import re
import traceback

HIDDEN = "***"
SECRET_PATTERNS = (
    (re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{8,}"), r"\1" + HIDDEN),
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2" + HIDDEN),
    (re.compile(r"(?i)\b((?:access_|api_|auth_)?(?:token|password|secret|key)['\"]?\s*[=:]\s*['\"]?)[^\s'\"&,;]{8,}"),
     r"\1" + HIDDEN),
)
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()!#|~{}])")
URL = re.compile(r"https?://[\w.~:/?#@$&+,;=%-]+", re.IGNORECASE)  # no ( ) [ ] ! * ` | { } \\ : nothing Markdown reads


def masked(text: str, *secrets: str | None) -> str:
    """`text` with tokens and credentials replaced by ***: `secrets` given, the host's HF_TOKEN, and anything
    shaped like a Hub token or an Authorization value."""
    known = [s for s in (*secrets, os.environ.get("HF_TOKEN")) if s and len(s.strip()) >= 8]
    for secret in sorted({s.strip() for s in known}, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def log_exception(logger: logging.Logger, message: str, error: BaseException, *secrets: str | None) -> None:
    """Log `error` with its traceback and every exception chained to it, masked."""
    chain = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logger.error("%s\n%s", message, masked(chain, *secrets).rstrip())


def plain_markdown(text: str) -> str:
    """`text` escaped for a Markdown component: its HTML and Markdown show as characters, and nothing in it
    (an <img>, ![](url), a [text](url) link) makes the visitor's browser load anything. A bare http(s) URL stays a
    plain link to itself, its text the address it opens."""
    # A URL becomes an autolink, <URL>: the page links it, ending where it ends (a bare one would take in the
    # escape of a ")" after it). Its characters (URL) are none that Markdown or HTML read.
    text, parts, done = str(text), [], 0
    for found in URL.finditer(text):
        url, (begin, _) = found.group(0).rstrip(".,;:?"), found.span()
        parts += [_escaped(text[done:begin]), f"<{url}>"]
        done = begin + len(url)
    return "".join([*parts, _escaped(text[done:])])


def _escaped(text: str) -> str:
    return MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))
