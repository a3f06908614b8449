"""The chat page at ``/``, assembled from its template and the client library.

The page is built on ``/wshub.js`` (decisions.md 17) by inlining the library into the
page's one module script rather than importing it: the page's CSP then admits exactly
that script, by its hash (:func:`wshub.http.page_headers`), and no URL at all. An
import would need ``script-src 'self'``, which admits every same-origin response as a
script, today's endpoints and every one added later. The cost is that a browser does
not cache the library apart from the page (about 10 KB, once per page load).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["LIBRARY_MARKER", "build_page"]

LIBRARY_MARKER: Final = b"/* wshub.js */"
"""Where the template's module script takes the library: it must appear once."""

# Text that would end the inline script early or change how the HTML parser reads it
# (the "script data escaped" states that <!-- and <script open).
_UNSAFE_IN_SCRIPT: Final = re.compile(rb"</script|<!--|<script", re.IGNORECASE)


def build_page(template: bytes, library: bytes) -> bytes:
    """The served page: *template* with *library* in place of :data:`LIBRARY_MARKER`.

    Raises:
        ValueError: the marker is not in the template exactly once, or the library holds
            text that cannot stand inside an inline ``<script>``.
    """
    if template.count(LIBRARY_MARKER) != 1:
        raise ValueError("the page template must hold the library marker exactly once")
    if _UNSAFE_IN_SCRIPT.search(library):
        raise ValueError("the library cannot be inlined: it holds <script, </script or <!--")
    return template.replace(LIBRARY_MARKER, library.rstrip(b"\n"))
