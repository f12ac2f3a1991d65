"""Tests of emailsync.mail.htmltext: HTML mail bodies rendered as plain text."""

from __future__ import annotations

from emailsync.mail.htmltext import html_to_text


def test_plain_text_without_markup_passes_through() -> None:
    """Text with no tags is returned as it was."""
    assert html_to_text("Just words.") == "Just words."


def test_script_and_style_content_is_dropped() -> None:
    """Code and CSS are not text a reader sees."""
    text = html_to_text("<style>p { color: red }</style><p>Hi</p><script>track(1)</script>")
    assert text == "Hi"


def test_head_and_title_are_dropped() -> None:
    """The document title is not part of the message body."""
    assert html_to_text("<html><head><title>Portal</title></head><body>Body</body></html>") == (
        "Body"
    )


def test_paragraphs_and_divs_start_new_lines() -> None:
    """Block elements are separated by line breaks, not run together."""
    assert html_to_text("<p>One</p><p>Two</p><div>Three</div>") == "One\n\nTwo\n\nThree"


def test_br_in_both_spellings_is_a_line_break() -> None:
    """``<br>`` and ``<br/>`` each end a line."""
    assert html_to_text("a<br>b<br/>c") == "a\nb\nc"


def test_list_items_become_dashed_lines() -> None:
    """Each ``<li>`` becomes a line starting with "- "."""
    assert html_to_text("<p>Rooms:</p><ul><li>two beds</li><li>garden</li></ul>") == (
        "Rooms:\n\n- two beds\n- garden"
    )


def test_named_and_numeric_entities_are_decoded() -> None:
    """Character references become the characters they stand for."""
    assert html_to_text("caf&eacute; &amp; b&#228;ckerei &lt;3") == "café & bäckerei <3"


def test_no_break_space_becomes_a_plain_space() -> None:
    """``&nbsp;`` is layout glue; in plain text it is an ordinary space."""
    assert html_to_text("Name:&nbsp;Ruth") == "Name: Ruth"


def test_white_space_runs_collapse_outside_pre() -> None:
    """Source indentation and line breaks are not rendered outside ``<pre>``."""
    assert html_to_text("<p>\n   lots   of\n\t space  </p>") == "lots of space"


def test_pre_keeps_its_white_space() -> None:
    """Preformatted text keeps its line breaks and indentation."""
    assert html_to_text("<pre>  a\n    b</pre>") == "  a\n    b"


def test_runs_of_blank_lines_collapse_to_one() -> None:
    """Empty paragraphs used as spacers leave at most one blank line."""
    assert html_to_text("<p>a</p><p></p><p></p><br><br><br><p>b</p>") == "a\n\nb"


def test_table_cells_are_spaced_and_rows_are_lines() -> None:
    """Layout tables read row by row, cell words kept apart."""
    html = "<table><tr><td>Price</td><td>250,000</td></tr><tr><td>Beds</td><td>3</td></tr></table>"
    assert html_to_text(html) == "Price 250,000\n\nBeds 3"


def test_self_closed_script_does_not_hide_the_rest() -> None:
    """``<script/>`` opens nothing, so the text after it is still shown."""
    assert html_to_text("<script/>visible") == "visible"


def test_malformed_markup_keeps_its_text() -> None:
    """Unclosed tags, stray end tags and Outlook conditionals never raise."""
    html = "<![if !supportLists]>1.<![endif]> <p>unclosed <b>bold</p></i> tail <!-- open"
    text = html_to_text(html)
    assert "unclosed bold" in text
    assert "tail" in text
