"""MkDocs hook: the figures the benchmark scripts write (``benchmarks/results/*.png``) are
served as ``img/<name>.png``, read from where the scripts put them, so the site never shows
a stale copy of a figure."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files, config):
    for figure in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"img/{figure.name}", abs_src_path=str(figure)))
    return files


ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|exc|obj):(?=<code>)")


def on_page_content(html, page, config, files):
    """The docstrings' Sphinx roles (``:class:`x```) render as ``:class:`` before the code
    span in Markdown; the code span alone is what they mean."""
    return ROLE.sub("", html)
