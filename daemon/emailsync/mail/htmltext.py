"""Render an HTML mail body as readable plain text for the timeline."""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Elements whose content is never shown to a reader of the mail.
_HIDDEN_TAGS = frozenset({"script", "style", "head", "title", "template", "noscript"})

# Elements that start and end on their own line (HTML Living Standard "block" content, plus
# table rows, which mail layouts use as paragraphs).
_BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "center",
        "dd",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "tr",
        "ul",
    }
)

# Table cells sit side by side; a space keeps their words apart.
_CELL_TAGS = frozenset({"td", "th"})

_SPACE_RUN = re.compile(r"[ \t\r\n\f\v]+")
_BLANK_LINE_RUN = re.compile(r"\n{3,}")


class _TextCollector(HTMLParser):
    """Collects the visible text of a document, turning layout tags into line breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._hidden_depth = 0
        self._pre_depth = 0
        self._at_line_start = True

    def _emit(self, text: str) -> None:
        if text:
            self.chunks.append(text)
            self._at_line_start = text.endswith("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden_depth += 1
        elif tag == "br":
            self._emit("\n")
        elif tag == "li":
            self._emit("\n- ")
        elif tag in _BLOCK_TAGS:
            self._emit("\n")
            if tag == "pre":
                self._pre_depth += 1
        elif tag in _CELL_TAGS and not self._at_line_start:
            self._emit(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <hr/>: a self-closed element opens nothing, so it must not count as hidden.
        if tag not in _HIDDEN_TAGS:
            self.handle_starttag(tag, attrs)
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in _BLOCK_TAGS:
            self._emit("\n")
            if tag == "pre":
                self._pre_depth = max(0, self._pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self._hidden_depth:
            return
        if self._pre_depth:
            self._emit(data)
            return
        # Outside <pre>, any run of white space is one space, and none starts a line
        # (HTML rendering rules); source indentation must not leak into the text.
        text = _SPACE_RUN.sub(" ", data)
        if self._at_line_start:
            text = text.lstrip(" ")
        self._emit(text)


def html_to_text(html: str) -> str:
    """Return the visible text of ``html``: no scripts or styles, blocks on their own lines.

    Never raises on malformed markup; whatever text was read before a parser failure is kept.
    """
    collector = _TextCollector()
    try:
        collector.feed(html)
        collector.close()
    except (AssertionError, ValueError):
        # html.parser has raised on some malformed declarations (``<![if …]>`` and similar);
        # a mail body is shown best-effort, so keep what was collected.
        pass
    # A no-break space (&nbsp;) is layout glue in mail HTML; in plain text it is a space.
    text = "".join(collector.chunks).replace("\xa0", " ")
    text = "\n".join(line.rstrip(" ") for line in text.split("\n"))
    return _BLANK_LINE_RUN.sub("\n\n", text).strip("\n")
