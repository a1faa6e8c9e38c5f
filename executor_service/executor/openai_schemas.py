"""Marshmallow schemas of the OpenAI-compatible routes (``/v1/...``): the subset of OpenAI's
chat completions request this executor honours, and the response shapes it answers with.

A parameter that would change the answer and that we cannot honour (``tools``,
``n > 1``, ``logprobs``, ``stop``, ``top_p``, ...) is refused with a 422 that
names it, never silently ignored: a caller comparing models must not get an
answer to a different question than the one it asked. Such a parameter given
at its neutral value (``n: 1``, ``logprobs: false``, ``top_p: 1``, ...) is
accepted, because clients and proxies often send those defaults explicitly.
"""

from __future__ import annotations

import json
from typing import Any

from marshmallow import (
    Schema,
    ValidationError,
    fields,
    pre_load,
    validate,
    validates_schema,
)

from .schemas import MAX_MESSAGES, MAX_PROMPT_CHARS

#: OpenAI's default temperature (the /execute contract defaults to 0, OpenAI to 1:
#: a client written for OpenAI expects OpenAI's default).
OPENAI_DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 256

#: OpenAI parameters we do not implement, each with the values that mean "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),  # meaningless without tools
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "stop": ([],),
    "top_p": (1, 1.0),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "response_format": ({"type": "text"},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
}

ROLES = ("system", "developer", "user", "assistant")


class ContentField(fields.Field):
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts
    (joined); images, audio and files are refused."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValidationError(
                        f"content part of type {kind!r} is not supported; only text parts are"
                    )
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValidationError("a text content part needs a string 'text'")
                texts.append(text)
            return "".join(texts)
        raise ValidationError("content must be a string or a non-empty list of text parts")


class ChatMessageSchema(Schema):
    role = fields.String(
        required=True,
        validate=validate.OneOf(ROLES),
        metadata={"description": "tool messages are not supported; developer is read as system"},
    )
    content = ContentField(
        required=True,
        validate=validate.Length(max=MAX_PROMPT_CHARS),
        metadata={"type": "string", "description": "a string or a list of text parts"},
    )


class StreamOptionsSchema(Schema):
    include_usage = fields.Boolean(load_default=False)


class ChatCompletionRequestSchema(Schema):
    """OpenAI's ``POST /v1/chat/completions`` request, the part this executor honours.
    ``timeout_s`` is ours: the call's deadline, capped by the server like /execute's."""

    model = fields.String(required=True, validate=validate.Length(min=1, max=128))
    messages = fields.List(
        fields.Nested(ChatMessageSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_MESSAGES),
    )
    max_tokens = fields.Integer(
        strict=True, allow_none=True, load_default=None, validate=validate.Range(min=1, max=4096)
    )
    max_completion_tokens = fields.Integer(
        strict=True, allow_none=True, load_default=None, validate=validate.Range(min=1, max=4096)
    )
    temperature = fields.Float(
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=0.0, max=2.0),
        metadata={"description": f"default {OPENAI_DEFAULT_TEMPERATURE} as in OpenAI's API"},
    )
    seed = fields.Integer(strict=True, load_default=None, allow_none=True)
    stream = fields.Boolean(load_default=False, allow_none=True)
    stream_options = fields.Nested(StreamOptionsSchema, load_default=None, allow_none=True)
    user = fields.String(
        load_default=None,
        allow_none=True,
        metadata={"description": "accepted for compatibility; it does not change the answer"},
    )
    timeout_s = fields.Float(
        load_default=None, allow_none=True, validate=validate.Range(min=0.001, max=3600)
    )

    @pre_load
    def _refuse_unsupported(self, data: Any, **_: Any) -> Any:
        if not isinstance(data, dict):
            return data
        errors: dict[str, list[str]] = {}
        kept = {}
        for key, value in data.items():
            neutral = UNSUPPORTED.get(key)
            if neutral is None:
                kept[key] = value
            elif value is not None and value not in neutral:
                allowed = " or ".join(json.dumps(v) for v in neutral) or "null"
                errors[key] = [
                    f"{key}={json.dumps(value)[:80]} is not supported by this server "
                    f"(accepted: {allowed}, or leave it out)"
                ]
        if errors:
            raise ValidationError(errors)
        return kept

    @validates_schema
    def _check(self, data: dict[str, Any], **_: Any) -> None:
        total = sum(len(m["content"]) for m in data.get("messages") or [])
        if total > MAX_PROMPT_CHARS:
            raise ValidationError(
                f"messages hold {total} characters; at most {MAX_PROMPT_CHARS}", "messages"
            )
        a, b = data.get("max_tokens"), data.get("max_completion_tokens")
        if a is not None and b is not None and a != b:
            raise ValidationError(
                "max_tokens and max_completion_tokens differ; give one", "max_completion_tokens"
            )
        if data.get("stream_options") and not data.get("stream"):
            raise ValidationError("stream_options needs stream: true", "stream_options")


class ChatResponseMessageSchema(Schema):
    role = fields.String()
    content = fields.String()
    refusal = fields.String(allow_none=True)


class ChoiceSchema(Schema):
    index = fields.Integer()
    message = fields.Nested(ChatResponseMessageSchema)
    logprobs = fields.Raw(allow_none=True)
    finish_reason = fields.String()


class ChatUsageSchema(Schema):
    prompt_tokens = fields.Integer()
    completion_tokens = fields.Integer()
    total_tokens = fields.Integer()


class ExecutorInfoSchema(Schema):
    """Ours, beside OpenAI's fields: where and how the call ran."""

    request_id = fields.String()
    provider = fields.String()
    region = fields.String()
    replica = fields.String()
    timing = fields.Dict()


class ChatCompletionSchema(Schema):
    """OpenAI's ``chat.completion`` object (with ``stream: true``: ``chat.completion.chunk``
    server-sent events, ended by ``data: [DONE]``)."""

    id = fields.String()
    object = fields.String(metadata={"example": "chat.completion"})
    created = fields.Integer()
    model = fields.String()
    choices = fields.List(fields.Nested(ChoiceSchema))
    usage = fields.Nested(ChatUsageSchema)
    system_fingerprint = fields.String(allow_none=True)
    executor = fields.Nested(ExecutorInfoSchema)


class OpenAIModelSchema(Schema):
    id = fields.String()
    object = fields.String(metadata={"example": "model"})
    created = fields.Integer()
    owned_by = fields.String(metadata={"description": "the provider serving the model"})


class OpenAIModelListSchema(Schema):
    object = fields.String(metadata={"example": "list"})
    data = fields.List(fields.Nested(OpenAIModelSchema))


class OpenAIErrorBodySchema(Schema):
    message = fields.String()
    type = fields.String()
    param = fields.String(allow_none=True)
    code = fields.String()
    details = fields.Dict(metadata={"description": "ours: the contract's error details"})


class OpenAIErrorSchema(Schema):
    error = fields.Nested(OpenAIErrorBodySchema)
