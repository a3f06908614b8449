"""Counters, gauges and histograms, rendered in the Prometheus text format.

No client library: the format is a few lines of text, and these objects are
touched on the hot path, so they are plain attributes and dict entries.
Gauges whose value lives elsewhere (open connections, buffer sizes) are read
through a callback when rendered.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence

__all__ = ["Counter", "Gauge", "Histogram", "Metrics", "close_code_label"]

# Close codes a label may name one by one: RFC 6455's (1000-1015, 1004-1006
# and 1015 included though never sent on the wire) and the application codes
# wshub itself sends (decisions.md 19). Any other code a client sends goes
# into a range bucket, so clients cannot create series (issue 19.3).
_KNOWN_CLOSE_CODES = frozenset(range(1000, 1016)) | {4401, 4403, 4429}


def close_code_label(code: int) -> str:
    """The ``code`` label of ``wshub_closes_total`` for a close code."""
    if code in _KNOWN_CLOSE_CODES:
        return str(code)
    if 3000 <= code <= 3999:
        return "3000-3999"
    if 4000 <= code <= 4999:
        return "4000-4999"
    return "other"


Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels) + "}"


def _format_value(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Counter:
    """A monotonically increasing count, optionally split by one label."""

    kind = "counter"

    def __init__(self, name: str, help: str, label: str | None = None) -> None:
        assert name.endswith("_total"), "counter names end in _total"
        self.name = name
        self.help = help
        self.label = label
        self.values: dict[str, int] = {}
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def inc_label(self, label_value: str, amount: int = 1) -> None:
        self.values[label_value] = self.values.get(label_value, 0) + amount

    def get(self, label_value: str) -> int:
        return self.values.get(label_value, 0)

    def samples(self) -> Iterable[tuple[str, Labels, float]]:
        if self.label is None:
            yield self.name, (), self.value
        else:
            for key in sorted(self.values):
                yield self.name, ((self.label, key),), self.values[key]


class Gauge:
    """A value read from *read* when rendered; it may return a number or a
    mapping of label value to number (for gauges with one label). With
    ``kind="counter"`` it exposes a count kept elsewhere."""

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], float | dict[str, float]],
        label: str | None = None,
        kind: str = "gauge",
    ) -> None:
        self.kind = kind
        self.name = name
        self.help = help
        self.read = read
        self.label = label

    def samples(self) -> Iterable[tuple[str, Labels, float]]:
        value = self.read()
        if isinstance(value, dict):
            assert self.label is not None
            for key in sorted(value):
                yield self.name, ((self.label, key),), value[key]
        else:
            yield self.name, (), value


class Histogram:
    """Observations counted into cumulative buckets."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0
        self.tally: dict[float, int] = {}
        """Observations not yet counted into the buckets, by value: a hot path
        with few distinct values (a room's fan-out size) adds to it inline,
        ``tally[v] = tally.get(v, 0) + 1``, a dict update instead of a call
        and a bisect per observation; :meth:`samples` counts them in."""

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def _count_tally(self) -> None:
        tally = self.tally
        for value, times in tally.items():
            self.counts[bisect.bisect_left(self.bounds, value)] += times
            self.sum += value * times
            self.count += times
        tally.clear()

    def samples(self) -> Iterable[tuple[str, Labels, float]]:
        self._count_tally()
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            yield self.name + "_bucket", (("le", _format_value(bound)),), cumulative
        yield self.name + "_bucket", (("le", "+Inf"),), self.count
        yield self.name + "_sum", (), self.sum
        yield self.name + "_count", (), self.count


Metric = Counter | Gauge | Histogram


class Metrics:
    """The registry: metrics in the order they were added."""

    def __init__(self) -> None:
        self._metrics: list[Metric] = []

    def add(self, metric: Metric) -> Metric:
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help: str, label: str | None = None) -> Counter:
        counter = Counter(name, help, label)
        self.add(counter)
        return counter

    def gauge(
        self,
        name: str,
        help: str,
        read: Callable[[], float | dict[str, float]],
        label: str | None = None,
        kind: str = "gauge",
    ) -> Gauge:
        gauge = Gauge(name, help, read, label, kind)
        self.add(gauge)
        return gauge

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        histogram = Histogram(name, help, buckets)
        self.add(histogram)
        return histogram

    def __iter__(self) -> Iterable[Metric]:
        return iter(self._metrics)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for name, labels, value in metric.samples():
                lines.append(f"{name}{_format_labels(labels)} {_format_value(value)}")
        return "\n".join(lines) + "\n"
