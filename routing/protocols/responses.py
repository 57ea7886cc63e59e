"""OpenAI's Responses API (``/v1/responses``), stateless, over chat-completions upstreams.

No response is stored: a request carries its whole transcript (as Codex sends it), and
``previous_response_id`` is refused with a clear 400. The request is translated with an
allow-list; the answer and the stream are translated back as chunks arrive, every stream event
numbered (``sequence_number``) and the stream ended by ``response.completed`` (or
``response.incomplete`` at the token limit, ``response.failed`` on a failure). Errors are in
OpenAI's shape, as for chat completions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from billing.usage import Usage, parse_usage
from routing.errors import GatewayError
from routing.protocols.openai import error_response
from routing.protocols.translated import ChunkTranslator, TranslatedFront
from routing.requests import ClientRequest, prompt_token_estimate

ENDPOINT = "responses"
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param)


@dataclass
class Translation:
    """What answering a translated request needs, echoed in every ``response`` object."""

    model: str
    response_id: str
    created_at: int
    echo: dict[str, Any] = field(default_factory=dict)
    reasoning: dict[str, Any] | None = None  # for upstreams with a reasoning parameter


# --- request: Responses -> chat completions ----------------------------------------------------


def to_chat(body: dict[str, Any]) -> tuple[dict[str, Any], Translation]:
    if body.get("previous_response_id"):
        raise _invalid(
            "previous_response_id is not supported: Keyaos keeps no responses. Send the whole "
            "conversation in 'input' (and store: false).",
            "previous_response_id",
        )
    if body.get("conversation"):
        raise _invalid("conversation is not supported: send the whole conversation in 'input'.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _invalid("'model' is required and must be a non-empty string.", "model")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    source = body.get("input")
    if isinstance(source, str):
        messages.append({"role": "user", "content": source})
    elif isinstance(source, list):
        for item in source:
            _add_item(messages, item)
    else:
        raise _invalid("'input' is required: a string or an array of items.", "input")
    if not any(message["role"] != "system" for message in messages):
        raise _invalid("'input' has nothing to send after translation.", "input")
    translation = Translation(
        model=model.strip(),
        response_id="resp_" + os.urandom(12).hex(),
        created_at=int(time.time()),
    )
    chat: dict[str, Any] = {"model": translation.model, "messages": messages}
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _invalid("'max_output_tokens' must be an integer of at least 1.")
        chat["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _invalid(f"'{name}' must be a number.", name)
            chat[name] = value
    tools = [_function(tool) for tool in body.get("tools") or [] if _is_function(tool)]
    if tools:
        chat["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            chat["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    response_format = _response_format((body.get("text") or {}).get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    effort = (body.get("reasoning") or {}).get("effort")
    if isinstance(effort, str) and effort:
        translation.reasoning = {"effort": effort}
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    translation.echo = {
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": max_tokens,
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": [tool for tool in body.get("tools") or [] if _is_function(tool)],
        "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "store": False,
    }
    return chat, translation


def input_tokens(body: dict[str, Any]) -> int:
    """The router's estimate: instructions, every input item's text, tool definitions."""
    tokens = prompt_token_estimate(body.get("instructions") or "")
    source = body.get("input")
    if isinstance(source, str):
        return tokens + prompt_token_estimate(source)
    for item in source if isinstance(source, list) else []:
        if isinstance(item, dict):
            tokens += prompt_token_estimate(item)
            for name in ("arguments", "output"):
                if isinstance(item.get(name), str):
                    tokens += prompt_token_estimate(item[name])
    if body.get("tools"):
        tokens += prompt_token_estimate(json.dumps(body["tools"]))
    return tokens


def _add_item(messages: list[dict[str, Any]], item: Any) -> None:
    if not isinstance(item, dict):
        raise _invalid("Each 'input' item must be an object.", "input")
    kind = item.get("type", "message")
    if kind == "message":
        role = ROLES.get(item.get("role"))
        if role is None:
            raise _invalid("An input message needs a role: user, assistant, system, developer.")
        content = _content(item.get("content"), role)
        if content:
            messages.append({"role": role, "content": content})
    elif kind == "function_call":
        call = {
            "id": item.get("call_id", ""),
            "type": "function",
            "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "")},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output", "")
        if not isinstance(output, str):
            output = _text_of(output)
        messages.append(
            {"role": "tool", "tool_call_id": item.get("call_id", ""), "content": output}
        )
    # reasoning items, server tool calls and anything else are dropped


def _content(content: Any, role: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "input_image" and role == "user" and part.get("image_url"):
            image = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _text_of(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return "".join(
        str(part.get("text", ""))
        for part in parts
        if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text")
    )


def _is_function(tool: Any) -> bool:
    return isinstance(tool, dict) and tool.get("type") == "function" and "name" in tool


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    return None


def _response_format(format_: Any) -> dict[str, Any] | None:
    if not isinstance(format_, dict):
        return None
    if format_.get("type") == "json_object":
        return {"type": "json_object"}
    if format_.get("type") == "json_schema":
        schema = {key: format_[key] for key in ("name", "schema", "strict") if key in format_}
        return {"type": "json_schema", "json_schema": schema}
    return None


# --- answer: chat completions -> Responses -----------------------------------------------------


def response_object(
    translation: Translation,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "id": translation.response_id,
        "object": "response",
        "created_at": translation.created_at,
        "status": status,
        "model": translation.model,
        "output": output,
        "usage": usage_body(usage) if usage is not None else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        **translation.echo,
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def from_chat(chat: dict[str, Any], translation: Translation) -> dict[str, Any]:
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output = []
    if message.get("content"):
        output.append(_message_item(_item_id("msg"), message["content"], "completed"))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(
            _call_item(
                _item_id("fc"),
                call.get("id") or _item_id("call"),
                function.get("name", ""),
                function.get("arguments") or "",
                "completed",
            )
        )
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    usage = parse_usage(chat.get("usage")) or Usage()
    return response_object(translation, status=status, output=output, usage=usage)


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_text_part(text)]
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str):
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _item_id(prefix: str) -> str:
    return f"{prefix}_" + os.urandom(12).hex()


# --- stream: chat-completion chunks -> Responses events ----------------------------------------


class _Item:
    def __init__(self, kind: str, item_id: str, output_index: int, **fields: Any) -> None:
        self.kind = kind
        self.id = item_id
        self.output_index = output_index
        self.text: list[str] = []
        self.fields = fields
        self.where = b'"item_id": "%s", "output_index": %d' % (item_id.encode(), output_index)

    def whole(self, status: str) -> dict[str, Any]:
        text = "".join(self.text)
        if self.kind == "message":
            return _message_item(self.id, text, status)
        return _call_item(self.id, self.fields["call_id"], self.fields["name"], text, status)


_TEXT_DELTA = (
    b"event: response.output_text.delta\ndata: "
    b'{"type": "response.output_text.delta", "sequence_number": %d, %s, "content_index": 0, '
    b'"delta": %s, "logprobs": []}\n\n'
)


class ResponsesStream(ChunkTranslator):
    """Translates a chat-completions stream into numbered Responses events as chunks arrive."""

    def __init__(self, request: ClientRequest) -> None:
        super().__init__(request)
        self.sequence = 0
        self.items: list[_Item] = []
        self.open: _Item | None = None
        self.calls: dict[int, _Item] = {}

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + json.dumps(payload).encode() + b"\n\n"

    def _response(self, status: str, error: dict[str, str] | None = None) -> dict[str, Any]:
        item_status = {"in_progress": "in_progress", "failed": "incomplete"}.get(
            status, "completed"
        )
        output = [item.whole(item_status) for item in self.items]
        usage = self.usage if status != "in_progress" else None
        return response_object(
            self.translation, status=status, output=output, usage=usage, error=error
        )

    def _start(self) -> bytes:
        self.started = True
        response = self._response("in_progress")
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def _choice(self, choice: dict[str, Any]) -> bytes:
        out = []
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if isinstance(text, str) and text:
            out.append(self._text(text))
        for call in delta.get("tool_calls") or ():
            out.append(self._call(call))
        return b"".join(out)

    def _add(self, item: _Item) -> bytes:
        out = self._close_open()
        self.items.append(item)
        self.open = item
        return out + self._event(
            "response.output_item.added",
            {"output_index": item.output_index, "item": item.whole("in_progress")},
        )

    def _text_json(self, text: bytes) -> bytes:
        out = self._open_message()
        item = self.open
        item.text.append(json.loads(text))
        event = _TEXT_DELTA % (self.sequence, item.where, text)
        self.sequence += 1
        return out + event

    def _open_message(self) -> bytes:
        if self.open is not None and self.open.kind == "message":
            return b""
        item = _Item("message", _item_id("msg"), len(self.items))
        return self._add(item) + self._event(
            "response.content_part.added",
            {
                "item_id": item.id,
                "output_index": item.output_index,
                "content_index": 0,
                "part": _text_part(""),
            },
        )

    def _text(self, text: str) -> bytes:
        out = self._open_message()
        item = self.open
        item.text.append(text)
        self.text_chars += len(text)
        return out + self._event(
            "response.output_text.delta",
            {
                "item_id": item.id,
                "output_index": item.output_index,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            },
        )

    def _call(self, call: dict[str, Any]) -> bytes:
        position = call.get("index", 0)
        function = call.get("function") or {}
        out = b""
        item = self.calls.get(position)
        if item is None:
            item = _Item(
                "function_call",
                _item_id("fc"),
                len(self.items),
                call_id=call.get("id") or _item_id("call"),
                name=function.get("name") or "",
            )
            self.calls[position] = item
            out = self._add(item)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.text.append(arguments)
            self.text_chars += len(arguments)
            out += self._event(
                "response.function_call_arguments.delta",
                {"item_id": item.id, "output_index": item.output_index, "delta": arguments},
            )
        return out

    def _close_open(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        text = "".join(item.text)
        where = {"item_id": item.id, "output_index": item.output_index}
        if item.kind == "message":
            out = self._event(
                "response.output_text.done", {**where, "content_index": 0, "text": text}
            )
            out += self._event(
                "response.content_part.done",
                {**where, "content_index": 0, "part": _text_part(text)},
            )
        else:
            out = self._event("response.function_call_arguments.done", {**where, "arguments": text})
        return out + self._event(
            "response.output_item.done",
            {"output_index": item.output_index, "item": item.whole("completed")},
        )

    def _end(self) -> bytes:
        self.done = True
        out = self._close_open()
        if (self.finish or {}).get("finish_reason") == "length":
            return out + self._event(
                "response.incomplete", {"response": self._response("incomplete")}
            )
        return out + self._event("response.completed", {"response": self._response("completed")})

    def _failed(self, message: str, status: int) -> bytes:
        self.done = True
        error = {"code": "server_error", "message": message}
        return self._event("response.failed", {"response": self._response("failed", error)})


# --- the front ---------------------------------------------------------------------------------


RESPONSES = TranslatedFront(
    endpoint=ENDPOINT,
    to_chat=to_chat,
    input_tokens=input_tokens,
    from_chat=from_chat,
    stream=ResponsesStream,
    render_error=error_response,
)
