"""MkDocs hook: check the README's relative links while the site builds.

The README lives outside ``docs/``, so MkDocs does not check it. This hook checks every
relative link in it (``docs/PAGE.md`` and ``docs/PAGE.md#anchor``, other repository files)
against the files and the headings' anchors of the built pages, and logs a warning for a
broken one, which ``mkdocs build --strict`` (``make lint``) turns into a failure.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.readme_links")

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_anchors: dict[str, set[str]] = {}


def on_page_content(html, page, config, files):
    _anchors[page.file.src_uri] = {a.id for a in _walk(page.toc)}
    return html


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.children)


def on_post_build(config):
    docs = Path(config["docs_dir"])
    root = docs.parent
    readme = root / "README.md"
    for target in _LINK.findall(readme.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        if path and not (root / path).exists():
            log.warning("README.md links to %s, which does not exist", target)
            continue
        if anchor and path.startswith("docs/"):
            page = Path(path).relative_to("docs").as_posix()
            if anchor not in _anchors.get(page, set()):
                log.warning("README.md links to %s: no heading with that anchor", target)
