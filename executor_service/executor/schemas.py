"""Marshmallow schemas of the executor API: validation and the OpenAPI document in one place."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

MAX_PROMPT_CHARS = 32_000
MAX_MESSAGES = 256
#: what a request id may be, in the body's ``request_id`` and in the X-Request-ID header
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class MessageSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(["system", "user", "assistant"]))
    content = fields.String(required=True, validate=validate.Length(max=MAX_PROMPT_CHARS))


class ExecuteRequestSchema(Schema):
    """One model call. Give exactly one of ``prompt`` and ``messages``."""

    model = fields.String(required=True, validate=validate.Length(min=1, max=128))
    prompt = fields.String(validate=validate.Length(min=1, max=MAX_PROMPT_CHARS))
    messages = fields.List(
        fields.Nested(MessageSchema), validate=validate.Length(min=1, max=MAX_MESSAGES)
    )
    max_tokens = fields.Integer(
        strict=True, load_default=256, validate=validate.Range(min=1, max=4096)
    )
    temperature = fields.Float(load_default=0.0, validate=validate.Range(min=0.0, max=2.0))
    seed = fields.Integer(strict=True, load_default=None, allow_none=True)
    timeout_s = fields.Float(
        load_default=None, allow_none=True, validate=validate.Range(min=0.001, max=3600)
    )
    request_id = fields.String(
        load_default=None,
        allow_none=True,
        validate=[validate.Length(min=1, max=128), validate.Regexp(REQUEST_ID_PATTERN)],
    )

    @validates_schema
    def _prompt_xor_messages(self, data: dict[str, Any], **_: Any) -> None:
        has_prompt = data.get("prompt") is not None
        has_messages = data.get("messages") is not None
        if has_prompt == has_messages:
            raise ValidationError("give exactly one of 'prompt' and 'messages'", "_schema")
        if has_messages:
            total = sum(len(m["content"]) for m in data["messages"])
            if total > MAX_PROMPT_CHARS:
                raise ValidationError(
                    f"messages hold {total} characters; at most {MAX_PROMPT_CHARS}", "messages"
                )


class UsageSchema(Schema):
    prompt_tokens = fields.Integer()
    completion_tokens = fields.Integer()


class TimingSchema(Schema):
    queue_ms = fields.Float(metadata={"description": "from arrival to the start of the model call"})
    model_ms = fields.Float(metadata={"description": "inside the provider"})
    total_ms = fields.Float()


class ExecuteResponseSchema(Schema):
    request_id = fields.String()
    model = fields.String()
    provider = fields.String()
    region = fields.String()
    replica = fields.String()
    output = fields.String()
    finish_reason = fields.String()
    usage = fields.Nested(UsageSchema)
    timing = fields.Nested(TimingSchema)


class ModelSchema(Schema):
    name = fields.String()
    provider = fields.String()
    description = fields.String()
    loaded = fields.Boolean()


class ModelListSchema(Schema):
    region = fields.String()
    models = fields.List(fields.Nested(ModelSchema))


class ErrorBodySchema(Schema):
    code = fields.String()
    message = fields.String()
    details = fields.Dict()


class ErrorSchema(Schema):
    error = fields.Nested(ErrorBodySchema)
