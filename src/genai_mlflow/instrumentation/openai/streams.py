"""Transparent proxies over the client's streams and raw responses, ending the span once.

A stream's span ends when it is read to the end, fails, is closed (directly, through its HTTP
response, or by a context manager), or is garbage-collected unfinished. The proxies are wrapt
``ObjectProxy`` objects, so the user's ``isinstance`` checks, attributes and chunks are unchanged.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import wrapt

from . import attributes as attrs
from .attributes import Attributes, ContentPolicy
from .call import LLMCall

logger = logging.getLogger("genai_mlflow.instrumentation")


class ChatAccumulator:
    """Collects chat or legacy completion chunks into choices; does as little per chunk as it can."""

    __slots__ = ("choices", "header", "policy", "usage")

    def __init__(self, policy: ContentPolicy) -> None:
        self.policy = policy
        self.choices: dict[int, attrs.Choice] = {}
        self.header: Attributes | None = None
        self.usage: Any = None

    def add(self, chunk: Any) -> None:
        if self.header is None:
            self.header = attrs.response_header_attributes(chunk)
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage = usage
        for choice in getattr(chunk, "choices", None) or ():
            state = self.choices.get(choice.index)
            if state is None:
                state = self.choices[choice.index] = attrs.Choice()
            if choice.finish_reason:
                state.finish_reason = choice.finish_reason
            delta = getattr(choice, "delta", None)
            if delta is None:  # legacy completions stream text, not deltas
                if self.policy.capture and choice.text:
                    state.text.append(choice.text)
                continue
            if self.policy.capture and delta.content:
                state.text.append(delta.content)
            if delta.tool_calls:
                _add_tool_call_deltas(state, delta.tool_calls)

    def result(self) -> Attributes:
        result = dict(self.header or {})
        result.update(attrs.usage_attributes(self.usage))
        choices = [self.choices[i] for i in sorted(self.choices)]
        result.update(attrs.output_attributes(choices, self.policy))
        return result


def _add_tool_call_deltas(state: attrs.Choice, deltas: Any) -> None:
    for delta in deltas:
        index = delta.index or 0
        while len(state.tool_calls) <= index:
            state.tool_calls.append(attrs.ToolCall())
        call = state.tool_calls[index]
        if delta.id:
            call.id = delta.id
        function = delta.function
        if function is not None:
            if function.name:
                call.name = function.name
            if function.arguments:
                call.arguments += function.arguments


class ResponsesAccumulator:
    """Collects Responses API stream events; the terminal event carries the whole response."""

    __slots__ = ("final", "header", "policy", "text")

    def __init__(self, policy: ContentPolicy) -> None:
        self.policy = policy
        self.final: Any = None
        self.header: Attributes | None = None
        self.text: list[str] = []

    def add(self, event: Any) -> None:
        kind = getattr(event, "type", None)
        if kind == "response.output_text.delta":
            if self.policy.capture:
                self.text.append(event.delta)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.final = event.response
        elif kind == "response.created":
            self.header = attrs.response_header_attributes(event.response)

    def result(self) -> Attributes:
        if self.final is not None:
            return responses_result(self.final, self.policy)
        result = dict(self.header or {})
        if self.text:  # the stream stopped before its terminal event
            result.update(attrs.output_attributes([attrs.Choice(self.text)], self.policy))
        return result


def responses_result(response: Any, policy: ContentPolicy) -> Attributes:
    result = attrs.response_header_attributes(response)
    result.update(attrs.usage_attributes(getattr(response, "usage", None)))
    result.update(attrs.output_attributes([attrs.responses_choice(response)], policy))
    return result


Accumulator = ChatAccumulator | ResponsesAccumulator


class _StreamState:
    """What a stream proxy shares with its response proxy and finaliser."""

    __slots__ = ("accumulator", "call")

    def __init__(self, call: LLMCall, accumulator: Accumulator) -> None:
        self.call = call
        self.accumulator = accumulator

    def add(self, chunk: Any) -> None:
        self.call.first_chunk()
        try:
            self.accumulator.add(chunk)
        except Exception:
            logger.exception("genai-mlflow could not read a stream chunk")

    def end(self, error: BaseException | None = None) -> None:
        self.call.end(self.accumulator.result, error)


class _ResponseProxy(wrapt.ObjectProxy[Any]):
    """The stream's HTTP response: closing it (as the ``stream()`` helpers do) ends the span."""

    def __init__(self, response: Any, state: _StreamState) -> None:
        super().__init__(response)
        self._self_state = state

    def close(self) -> Any:
        try:
            return self.__wrapped__.close()
        finally:
            self._self_state.end()

    async def aclose(self) -> Any:
        try:
            return await self.__wrapped__.aclose()
        finally:
            self._self_state.end()


class _StreamProxyBase(wrapt.ObjectProxy[Any]):
    def __init__(self, stream: Any, state: _StreamState) -> None:
        super().__init__(stream)
        self._self_state = state
        self._self_response: _ResponseProxy | None = None

    @property
    def response(self) -> Any:
        if self._self_response is None:
            self._self_response = _ResponseProxy(self.__wrapped__.response, self._self_state)
        return self._self_response

    def __del__(self) -> None:
        # Garbage-collected unfinished: end the span rather than leak it.
        state = getattr(self, "_self_state", None)
        if state is not None:
            state.end()


class StreamProxy(_StreamProxyBase):
    def __iter__(self) -> StreamProxy:
        return self

    def __next__(self) -> Any:
        try:
            chunk = self.__wrapped__.__next__()
        except StopIteration:
            self._self_state.end()
            raise
        except BaseException as exc:
            self._self_state.end(exc)
            raise
        self._self_state.add(chunk)
        return chunk

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_state.end()

    def __enter__(self) -> StreamProxy:
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Any:
        try:
            return self.__wrapped__.__exit__(exc_type, exc, tb)
        finally:
            self._self_state.end(exc)


class AsyncStreamProxy(_StreamProxyBase):
    def __aiter__(self) -> AsyncStreamProxy:
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await self.__wrapped__.__anext__()
        except StopAsyncIteration:
            self._self_state.end()
            raise
        except BaseException as exc:  # CancelledError included
            self._self_state.end(exc)
            raise
        self._self_state.add(chunk)
        return chunk

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            self._self_state.end()

    async def __aenter__(self) -> AsyncStreamProxy:
        await self.__wrapped__.__aenter__()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Any:
        try:
            return await self.__wrapped__.__aexit__(exc_type, exc, tb)
        finally:
            self._self_state.end(exc)


def wrap_stream(stream: Any, call: LLMCall, accumulator: Accumulator, is_async: bool) -> Any:
    state = _StreamState(call, accumulator)
    return AsyncStreamProxy(stream, state) if is_async else StreamProxy(stream, state)


class _RawResponseProxyBase(wrapt.ObjectProxy[Any]):
    """A ``with_raw_response`` / ``with_streaming_response`` result. The span ends when the body
    is parsed (or, for a stream, when the parsed stream ends), or when the response is closed."""

    def __init__(self, response: Any, call: LLMCall, summarise: Any, new_accumulator: Any) -> None:
        super().__init__(response)
        self._self_call = call
        self._self_summarise = summarise
        self._self_new_accumulator = new_accumulator
        self._self_stream: Any = None

    def _self_parsed(self, parsed: Any) -> Any:
        if self._self_stream is not None:
            return self._self_stream
        stream_kind = _stream_kind(parsed)
        if stream_kind is not None:
            self._self_stream = wrap_stream(
                parsed, self._self_call, self._self_new_accumulator(), stream_kind == "async"
            )
            return self._self_stream
        self._self_call.end(partial(self._self_summarise, parsed))
        return parsed

    def __del__(self) -> None:
        call = getattr(self, "_self_call", None)
        if call is not None and getattr(self, "_self_stream", None) is None:
            call.end()


class RawResponseProxy(_RawResponseProxyBase):
    def parse(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_parsed(self.__wrapped__.parse(*args, **kwargs))

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            if self._self_stream is None:
                self._self_call.end()


class AsyncRawResponseProxy(_RawResponseProxyBase):
    async def parse(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_parsed(await self.__wrapped__.parse(*args, **kwargs))

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            if self._self_stream is None:
                self._self_call.end()


def _stream_kind(value: Any) -> str | None:
    from openai import AsyncStream, Stream  # lazily: this package imports without openai

    if isinstance(value, Stream):
        return "sync"
    if isinstance(value, AsyncStream):
        return "async"
    return None
