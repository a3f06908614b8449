"""wshub.wire frames and wshub.metrics rendering."""

from __future__ import annotations

import pytest

from wshub.metrics import Metrics
from wshub.wire import OP_TEXT, frame, negotiate_deflate, ping_frame, text_frame


def test_frame_lengths() -> None:
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame(b"x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
    assert ping_frame(b"") == b"\x89\x00"


def test_negotiate_deflate() -> None:
    assert negotiate_deflate([]) is None
    assert negotiate_deflate(["x-webkit-deflate-frame"]) is None
    header, extension, deflate = negotiate_deflate(["permessage-deflate; client_max_window_bits"])  # type: ignore[misc]
    assert header.startswith("permessage-deflate")
    assert "server_no_context_takeover" in header and "client_no_context_takeover" in header
    assert deflate.wbits == 15
    _, _, small = negotiate_deflate(["permessage-deflate; server_max_window_bits=10"])  # type: ignore[misc]
    assert small.wbits == 10


def test_metrics_render() -> None:
    m = Metrics()
    c = m.counter("x_total", "Things.", label="kind")
    c.inc_label('a"b')
    m.gauge("g", "Gauge.", lambda: 2.5)
    h = m.histogram("h", "Histo.", [1, 10])
    h.observe(0.5)
    h.observe(5)
    h.observe(50)
    text = m.render()
    assert '# TYPE x_total counter\nx_total{kind="a\\"b"} 1\n' in text
    assert "g 2.5\n" in text
    assert 'h_bucket{le="1"} 1\nh_bucket{le="10"} 2\nh_bucket{le="+Inf"} 3\n' in text
    assert "h_count 3\n" in text


def test_histogram_tally_renders_as_observations() -> None:
    """Values added to the tally inline (the hub's fan-out sizes) render as
    observe() of each would, in both orders of tally and observe."""
    observed, tallied = Metrics(), Metrics()
    a = observed.histogram("h", "Histo.", [1, 10])
    b = tallied.histogram("h", "Histo.", [1, 10])
    values = [0, 1, 1, 5, 10, 11, 50, 5]
    for v in values:
        a.observe(v)
    b.observe(values[0])
    for v in values[1:]:
        b.tally[v] = b.tally.get(v, 0) + 1
    assert tallied.render() == observed.render()
    assert 'h_bucket{le="+Inf"} 8\nh_sum 83\nh_count 8\n' in tallied.render()
    a.observe(3)
    b.tally[3] = 1
    assert tallied.render() == observed.render()  # counted once, not again


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_header_at_each_length_boundary(size: int) -> None:
    """text_frame's shortcuts for the two common header sizes give frame()'s bytes."""
    payload = b"x" * size
    framed = text_frame(payload)
    assert framed == frame(OP_TEXT, payload)
    assert framed[0] == 0x81 and framed.endswith(payload)
    assert len(framed) - size == (2 if size < 126 else 4 if size < 65536 else 10)
