"""Questions to every node of the cluster: the backend API's control plane.

The API (decisions.md 14) answers for the whole cluster: the rooms and their
connections, and a disconnect that finds a connection on whichever node it
lives. Each node knows its own connections best (their user ids too), so a
question is asked of every node and the answers are merged: a scatter and a
gather, off the hot path (an API call, not a delivery).

:class:`LocalControl` asks the one node of an embedded backplane.
:class:`RedisControl` asks over Redis pub/sub::

    {p}:control          every node subscribes: the questions
    {p}:control:{id}     node {id}'s answers

A question is ``{"id", "from", "query"}`` in JSON; each node that hears it
answers ``{"id", "node", "answer"}`` on the asker's channel. ``PUBLISH``
returns how many nodes heard the question, so the asker knows how many
answers to wait for; a node that heard and does not answer within the
timeout (a loop that is stuck) does not hold the call: the asker is told the
answers are incomplete (:class:`IncompleteAnswers`, a 503 unless the answers
it has are enough: a disconnect that closed something).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any, Protocol

from ..ids import NodeId

__all__ = [
    "Control",
    "ControlError",
    "ControlHandler",
    "IncompleteAnswers",
    "LocalControl",
    "RedisControl",
]

log = logging.getLogger("wshub.backplane")

Query = dict[str, Any]
Answer = dict[str, Any]

ANSWER_TIMEOUT = 2.0
"""Seconds the asker waits for every node that heard a question to answer."""


class ControlError(Exception):
    """The cluster cannot be asked now (Redis unreachable): a 503."""


class IncompleteAnswers(ControlError):
    """Not every node that heard the question answered in time (a node stuck,
    or frozen): what the others said is in *answers*, but "none found" is not
    known, and the silent node may still act on the question when it runs."""

    def __init__(self, answers: list[Answer], heard: int) -> None:
        super().__init__(f"{heard - len(answers)} of {heard} nodes did not answer in time")
        self.answers = answers


class ControlHandler(Protocol):
    def on_control(self, query: Query) -> Answer:
        """This node's answer to *query* (from any node, this one included)."""
        ...


class Control(Protocol):
    node_id: NodeId

    async def start(self, handler: ControlHandler) -> None: ...

    async def stop(self) -> None: ...

    async def ask(self, query: Query) -> list[Answer]:
        """Every node's answer to *query*.

        Raises:
            ControlError: the cluster can't be reached.
        """
        ...


class LocalControl:
    """The embedded backplane's cluster: this node alone."""

    def __init__(self, node_id: NodeId) -> None:
        self.node_id = node_id
        self._handler: ControlHandler | None = None

    async def start(self, handler: ControlHandler) -> None:
        self._handler = handler

    async def stop(self) -> None:
        self._handler = None

    async def ask(self, query: Query) -> list[Answer]:
        if self._handler is None:
            raise ControlError("the node is stopping")
        return [self._handler.on_control(query)]


class RedisControl:
    """Questions and answers over Redis pub/sub, on a connection of their own
    (the backplane's carry the rooms' traffic and are not slowed by this)."""

    def __init__(
        self, url: str, node_id: NodeId, *, prefix: str = "wshub", timeout: float = ANSWER_TIMEOUT
    ) -> None:
        self.node_id = node_id
        self.url = url
        self.timeout = timeout
        self._questions = f"{prefix}:control"
        self._answers = f"{prefix}:control:{node_id}"
        self._handler: ControlHandler | None = None
        self._redis: Any = None
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._pending: dict[str, tuple[list[Answer], asyncio.Event]] = {}

    async def start(self, handler: ControlHandler) -> None:
        from .redisconn import redis_client  # the redis package only in a cluster

        self._handler = handler
        self._redis = redis_client(self.url, socket_connect_timeout=2.0)
        self._task = asyncio.create_task(self._listen(), name="wshub-control")
        try:  # serve at once either way, as the backplane does
            await asyncio.wait_for(self._listening.wait(), 2.0)
        except TimeoutError:
            log.warning("control channel not subscribed yet at start")

    async def stop(self) -> None:
        self._handler = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()

    async def _listen(self) -> None:
        from .redis import backoff_delays  # the redis package only in a cluster

        delays = backoff_delays(initial=0.5)
        while self._handler is not None:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._questions, self._answers)
                self._listening.set()
                delays = backoff_delays(initial=0.5)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None:
                        await self._on_message(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: ask nothing until it is back
                self._listening.clear()
                log.warning("control channel lost: %r", exc)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # closing a broken connection may fail too
                    pass
            await asyncio.sleep(next(delays))

    async def _on_message(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        try:
            message = json.loads(data)
            request_id = str(message["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("malformed control message on %s", name)
            return
        if name == self._answers:
            pending = self._pending.get(request_id)
            if pending is not None and isinstance(message.get("answer"), dict):
                pending[0].append(message["answer"])
                pending[1].set()
            return
        handler = self._handler
        asker = message.get("from")
        query = message.get("query")
        if handler is None or not isinstance(asker, str) or not isinstance(query, dict):
            return
        try:
            answer = handler.on_control(query)
        except Exception:  # a bug answering must not end the listener
            log.exception("control query failed: %r", query)
            answer = {}
        reply = json.dumps({"id": request_id, "node": self.node_id, "answer": answer})
        prefix = self._questions
        # Bounded: a stalled Redis must not stop this node hearing questions.
        await asyncio.wait_for(self._redis.publish(f"{prefix}:{asker}", reply), self.timeout)

    async def ask(self, query: Query) -> list[Answer]:
        if not self._listening.is_set():
            raise ControlError("the cluster is not reachable (Redis)")
        request_id = secrets.token_hex(8)
        answers: list[Answer] = []
        arrived = asyncio.Event()
        self._pending[request_id] = (answers, arrived)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            question = json.dumps({"id": request_id, "from": self.node_id, "query": query})
            try:
                heard = int(
                    await asyncio.wait_for(
                        self._redis.publish(self._questions, question), self.timeout
                    )
                )
            except Exception as exc:
                raise ControlError(f"the cluster is not reachable (Redis): {exc!r}") from exc
            while len(answers) < heard:
                arrived.clear()
                left = deadline - loop.time()
                if left <= 0:
                    log.warning("control: %d of %d nodes answered", len(answers), heard)
                    raise IncompleteAnswers(answers, heard)
                try:
                    await asyncio.wait_for(arrived.wait(), left)
                except TimeoutError:
                    pass
            return answers
        finally:
            del self._pending[request_id]
