"""Tests of emailsync.mail.htmltext: HTML mail bodies rendered as plain text."""

from __future__ import annotations

import pytest

from emailsync.mail.htmltext import html_to_text


@pytest.mark.parametrize(
    ("html", "text"),
    [
        # Text with no tags is returned as it was.
        pytest.param("Just words.", "Just words.", id="plain-text-passes-through"),
        # Code and CSS are not text a reader sees.
        pytest.param(
            "<style>p { color: red }</style><p>Hi</p><script>track(1)</script>",
            "Hi",
            id="script-and-style-dropped",
        ),
        # The document title is not part of the message body.
        pytest.param(
            "<html><head><title>Portal</title></head><body>Body</body></html>",
            "Body",
            id="head-and-title-dropped",
        ),
        # Block elements are separated by line breaks, not run together.
        pytest.param(
            "<p>One</p><p>Two</p><div>Three</div>", "One\n\nTwo\n\nThree", id="blocks-start-lines"
        ),
        # ``<br>`` and ``<br/>`` each end a line.
        pytest.param("a<br>b<br/>c", "a\nb\nc", id="br-in-both-spellings"),
        # Each ``<li>`` becomes a line starting with "- ".
        pytest.param(
            "<p>Rooms:</p><ul><li>two beds</li><li>garden</li></ul>",
            "Rooms:\n\n- two beds\n- garden",
            id="list-items-dashed",
        ),
        # Character references become the characters they stand for.
        pytest.param("caf&eacute; &amp; b&#228;ckerei &lt;3", "café & bäckerei <3", id="entities"),
        # ``&nbsp;`` is layout glue; in plain text it is an ordinary space.
        pytest.param("Name:&nbsp;Ruth", "Name: Ruth", id="nbsp-is-a-space"),
        # Source indentation and line breaks are not rendered outside ``<pre>``.
        pytest.param(
            "<p>\n   lots   of\n\t space  </p>", "lots of space", id="white-space-collapses"
        ),
        # Preformatted text keeps its line breaks and indentation.
        pytest.param("<pre>  a\n    b</pre>", "  a\n    b", id="pre-keeps-white-space"),
        # Empty paragraphs used as spacers leave at most one blank line.
        pytest.param(
            "<p>a</p><p></p><p></p><br><br><br><p>b</p>", "a\n\nb", id="blank-lines-collapse"
        ),
        # Layout tables read row by row, cell words kept apart.
        pytest.param(
            "<table><tr><td>Price</td><td>250,000</td></tr><tr><td>Beds</td><td>3</td></tr></table>",
            "Price 250,000\n\nBeds 3",
            id="table-rows-are-lines",
        ),
        # ``<script/>`` opens nothing, so the text after it is still shown.
        pytest.param("<script/>visible", "visible", id="self-closed-script"),
    ],
)
def test_html_renders_as_the_text_a_reader_sees(html: str, text: str) -> None:
    """Each case: the HTML body, and the plain text it renders as."""
    assert html_to_text(html) == text


def test_malformed_markup_keeps_its_text() -> None:
    """Unclosed tags, stray end tags and Outlook conditionals never raise."""
    html = "<![if !supportLists]>1.<![endif]> <p>unclosed <b>bold</p></i> tail <!-- open"
    text = html_to_text(html)
    assert "unclosed bold" in text
    assert "tail" in text
