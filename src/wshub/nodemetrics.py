"""What the node counts, and the wiring of every figure into ``/metrics``.

The counters live in :class:`Counters`, shared by every room's hub (no
per-room labels: a label per room would be unbounded, decisions.md 12). The
gauges read the node's figures when ``/metrics`` is rendered, through
:class:`NodeFigures`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .metrics import Counter, Histogram, Metrics
from .protocol import ErrorCode

__all__ = ["OUTCOMES", "Counters", "NodeFigures", "node_metrics"]

OUTCOMES = ("INCOMING", "VALIDATED", "ROUTED", "FAILED")

_FANOUT_BUCKETS = (0, 1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000)

_REFUSAL_REASONS = (
    "bad_request",
    "method",
    "upgrade_required",
    "too_large",
    "http_version",
    "origin",
    "ip_limit",
    "unavailable",
    "handshake_timeout",
    "handshake_limit",
    "fd_limit",
    "rooms",
)
_CLOSE_CODES = ("1000", "1001", "1002", "1006", "1007", "1008", "1009", "1011")


class Counters:
    """The counters the hubs, the gateway and the node update."""

    def __init__(self, m: Metrics) -> None:
        self.accepted = m.counter(
            "wshub_connections_accepted_total", "WebSocket upgrades accepted."
        )
        self.refused = m.counter(
            "wshub_connections_refused_total",
            "Requests refused before or at the upgrade, by reason.",
            label="reason",
        )
        self.messages = m.counter(
            "wshub_messages_total",
            "Client data messages by outcome: INCOMING when received, VALIDATED when they "
            "passed the checks, ROUTED when handled or delivered, FAILED when refused.",
            label="outcome",
        )
        self.errors = m.counter("wshub_errors_total", "error messages sent, by code.", label="code")
        # Known label values start at 0, so dashboards see every series at once.
        for outcome in OUTCOMES:
            self.messages.inc_label(outcome, 0)
        self.outcomes: dict[str, int] = self.messages.values  # updated directly on the hot path
        for code in ErrorCode:
            self.errors.inc_label(code.value, 0)
        for reason in _REFUSAL_REASONS:
            self.refused.inc_label(reason, 0)
        self.closes: Counter = m.counter(
            "wshub_closes_total",
            "Closed WebSocket connections by close code (codes from clients outside the "
            "known ones are counted as 3000-3999, 4000-4999 or other).",
            label="code",
        )
        for close_code in _CLOSE_CODES:
            self.closes.inc_label(close_code, 0)
        # The CLOSED state of decisions.md 6 as a running total: a closed
        # connection is gone, so it is counted, not held (the sum of
        # wshub_closes_total, without summing its labels).
        self.closed = m.counter(
            "wshub_connections_closed_total",
            "WebSocket connections that reached CLOSED (upgraded ones; plain HTTP requests "
            "are not counted).",
        )
        self.slow_closes = m.counter(
            "wshub_slow_consumer_closes_total",
            "Connections closed because their send buffer overflowed.",
        )
        self.rate_refusals = m.counter(
            "wshub_rate_limited_total", "Data frames refused by the per-connection rate limit."
        )
        self.send_failures = m.counter(
            "wshub_send_failures_total", "Writes to a client socket that raised."
        )
        self.fanout_sizes: Histogram = m.histogram(
            "wshub_fanout_recipients", "Local recipients of each routed message.", _FANOUT_BUCKETS
        )


class NodeFigures(Protocol):
    """What the gauges read from the node."""

    def connections_by_state(self) -> dict[str, float]: ...

    def cluster_count(self) -> int: ...

    def room_count(self) -> int: ...

    def loop_lag(self) -> float: ...

    def uptime(self) -> float: ...

    def fanout_figures(self) -> dict[str, float]:
        """deliveries, writes, direct_sends, buffered_total, budget_drops,
        pass_seconds_max, pass_cpu_seconds_max and pass_slices of the fan-out,
        and io_uring: 1 when its direct sends go through io_uring, else 0."""
        ...

    def backplane_figures(self) -> dict[str, float]: ...

    def history_figures(self) -> dict[str, float]:
        """bytes, entries, rooms and evicted of the memory history."""
        ...


def node_metrics(node: NodeFigures) -> tuple[Metrics, Counters]:
    """The registry of a node: its counters, then every gauge."""
    m = Metrics()
    m.gauge(
        "wshub_connections",
        "Connections on this node by state.",
        node.connections_by_state,
        label="state",
    )
    m.gauge(
        "wshub_cluster_connections",
        "Open connections in the cluster, in the rooms this node has members in, "
        "as this node knows them.",
        node.cluster_count,
    )
    m.gauge(
        "wshub_rooms",
        "Rooms with members on this node, the default room included.",
        node.room_count,
    )
    counters = Counters(m)

    def fanout(key: str) -> Callable[[], float]:
        return lambda: node.fanout_figures()[key]

    def backplane(key: str) -> Callable[[], float]:
        return lambda: node.backplane_figures()[key]

    m.gauge(
        "wshub_deliveries_total",
        "Frames written to local recipients.",
        fanout("deliveries"),
        kind="counter",
    )
    m.gauge(
        "wshub_socket_writes_total",
        "Socket writes made by the fan-out (one carries "
        "every frame bound for a client in one loop pass).",
        fanout("writes"),
        kind="counter",
    )
    m.gauge(
        "wshub_direct_sends_total",
        "Of those, the ones sent straight to the socket "
        "from one C call for many clients (--direct-send), not through the transport.",
        fanout("direct_sends"),
        kind="counter",
    )
    m.gauge(
        "wshub_direct_send_io_uring",
        "1 when direct sends go to the kernel through io_uring, a run of clients in one "
        "call (--io-uring auto, where the kernel offers it); 0 when by send(2) one by one.",
        fanout("io_uring"),
    )
    # Floods and storms (decisions.md 18).
    m.gauge(
        "wshub_send_buffered_bytes",
        "Unsent bytes in client buffers, as the fan-out last saw them (an upper "
        "bound; --send-buffer-total caps it).",
        fanout("buffered_total"),
    )
    m.gauge(
        "wshub_send_buffer_total_drops_total",
        "Closing connections whose socket was dropped, unsent bytes and all, to bring "
        "the node under --send-buffer-total.",
        fanout("budget_drops"),
        kind="counter",
    )
    m.gauge(
        "wshub_fanout_pass_seconds_max",
        "The longest fan-out pass since start (one pass holds the event loop).",
        fanout("pass_seconds_max"),
    )
    m.gauge(
        "wshub_fanout_pass_cpu_seconds_max",
        "The most CPU time one fan-out pass took (its wall time can be longer on a busy machine).",
        fanout("pass_cpu_seconds_max"),
    )
    m.gauge(
        "wshub_fanout_pass_slices_total",
        "Fan-out passes that ran out of their time slice and went on in the next loop pass.",
        fanout("pass_slices"),
        kind="counter",
    )
    m.gauge(
        "wshub_event_loop_lag_seconds",
        "How late the last 1 s loop-lag probe timer fired.",
        node.loop_lag,
    )
    m.gauge(
        "wshub_backplane_up",
        "1 when the backplane link works (always 1 in memory).",
        backplane("up"),
    )
    m.gauge(
        "wshub_cluster_nodes",
        "Nodes this node knows of with open connections, itself included.",
        backplane("nodes"),
    )
    m.gauge(
        "wshub_backplane_received_total",
        "Envelopes received from other nodes.",
        backplane("received"),
        kind="counter",
    )
    m.gauge(
        "wshub_backplane_forward_failures_total",
        "Envelopes that could not be "
        "forwarded to the other nodes (backplane down): dropped, at most once.",
        backplane("forward_failures"),
        kind="counter",
    )
    m.gauge(
        "wshub_backplane_malformed_total",
        "Envelopes from the backplane that could not be handled: logged and skipped.",
        backplane("malformed"),
        kind="counter",
    )
    m.gauge(
        "wshub_backplane_reconnects_total",
        "Times the backplane subscription was rebuilt.",
        backplane("reconnects"),
        kind="counter",
    )

    def history(key: str) -> Callable[[], float]:
        return lambda: node.history_figures()[key]

    m.gauge(
        "wshub_history_bytes",
        "Bytes the memory history accounts for now (entries and room states; "
        "--history-memory bounds it).",
        history("bytes"),
    )
    m.gauge("wshub_history_entries", "Entries the memory history holds now.", history("entries"))
    m.gauge("wshub_history_rooms", "Room states the memory history holds now.", history("rooms"))
    m.gauge(
        "wshub_history_evicted_total",
        "Entries the memory history dropped to stay within --history-memory.",
        history("evicted"),
        kind="counter",
    )

    def on_redis(key: str) -> Callable[[], float]:
        return lambda: node.backplane_figures().get(key, 0.0)

    m.gauge(
        "wshub_history_redis_published_total",
        "Publications recorded by the room history script in Redis (0 without Redis).",
        on_redis("history_published"),
        kind="counter",
    )
    m.gauge(
        "wshub_history_redis_failures_total",
        "Publications (lost, at most once), join reads (served without history), "
        "refreshes of the epochs of rooms with members and reads of the frames a gap "
        "left out (the members closed 1012) that Redis did not answer.",
        lambda: sum(
            node.backplane_figures().get(f"history_{what}_failures", 0.0)
            for what in ("publish", "join", "keep", "fill")
        ),
        kind="counter",
    )
    m.gauge(
        "wshub_history_redis_stalled",
        "1 while Redis has not answered a publication (or the check before one) "
        "given up unanswered: publications meanwhile are served here only.",
        on_redis("history_stalled"),
    )
    m.gauge(
        "wshub_history_redis_gaps_filled_total",
        "Gaps in a room's offsets (frames the subscription missed while it was "
        "rebuilt) filled from the room's stream in Redis, its members kept.",
        on_redis("history_gaps_filled"),
        kind="counter",
    )
    m.gauge("wshub_uptime_seconds", "Seconds since this node started.", node.uptime)
    return m, counters
