"""MkDocs hook: pellucid's docstrings cross-reference in Sphinx roles (``:func:`pellucid.explain```),
which mkdocstrings renders as text. Each role becomes the name in code, linked by mkdocs-autorefs
when the name is documented on the site (an ``optional`` reference: an undocumented name stays
plain code, never a broken link)."""

from __future__ import annotations

import html
import re

# after Markdown: ":func:" followed by the inline code of the name; "~" shows the last part only
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):<code>(~?)([^<]+)</code>")


def _reference(match: re.Match) -> str:
    short, name = match.group(1), html.unescape(match.group(2)).strip()
    shown = name.rsplit(".", 1)[-1] if short else name
    return (f'<autoref identifier="{html.escape(name)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>")


def on_page_content(text: str, **_: object) -> str:
    """Replace every rendered Sphinx role of the page by an optional cross-reference."""
    return ROLE.sub(_reference, text)
