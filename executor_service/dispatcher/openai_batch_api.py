"""The dispatcher's OpenAI Batch API routes: what the official client's ``files`` and
``batches`` calls need.

    POST /v1/files                   upload a batch input file (multipart, purpose=batch)
    GET  /v1/files                   the tenant's uploaded files
    GET  /v1/files/<id>              a file object (input, output or error file)
    GET  /v1/files/<id>/content      its bytes (output and error files: built now)
    POST /v1/batches                 input_file_id, endpoint, completion_window, metadata
                                     (+ ours: regions, failover; or in metadata)
    GET  /v1/batches                 newest first; ``after`` and ``limit`` page
    GET  /v1/batches/<id>            status and request_counts, read from its jobs
    POST /v1/batches/<id>/cancel     cancel what has not started

Errors are in OpenAI's shape (``openai_errors``). The logic is in ``openai_batch.py``;
files and batches are kept by ``store/objects.py``, their requests are ordinary jobs.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, request
from marshmallow import Schema, fields, validate

from .. import openai_errors
from ..errors import Conflict, NotFound, ValidationFailed
from ..jsonbody import Blueprint
from . import openai_batch as ob
from .api import DispatcherState, state
from .store.objects import StoredObject, objects_for

logger = logging.getLogger(__name__)

blp = Blueprint(
    "openai_batch",
    __name__,
    url_prefix="/v1",
    description="OpenAI Batch API: files and batches, with a fan-out across regions.",
)
openai_errors.install(blp)

MAX_METADATA_PAIRS = 16


class BatchCreateSchema(Schema):
    """OpenAI's ``POST /v1/batches`` body; ``regions`` and ``failover`` are ours (they may
    also be given in ``metadata``: ``{"regions": "eu,us", "failover": "any"}``)."""

    input_file_id = fields.String(required=True, validate=validate.Length(min=1, max=200))
    endpoint = fields.String(required=True, validate=validate.OneOf([ob.ENDPOINT]))
    completion_window = fields.String(
        required=True, validate=validate.OneOf(sorted(ob.COMPLETION_WINDOWS))
    )
    metadata = fields.Dict(
        keys=fields.String(validate=validate.Length(max=64)),
        values=fields.String(validate=validate.Length(max=512)),
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=MAX_METADATA_PAIRS),
    )
    regions = fields.Raw(
        load_default=None,
        metadata={"description": "ours: regions every line runs in (default: all serving it)"},
    )
    failover = fields.String(
        load_default=None, metadata={"description": "ours: none (default) or any"}
    )
    reuse = fields.Raw(
        load_default=None,
        metadata={"description": "ours: reuse identical earlier calls (README), default false"},
    )


class BatchListQuerySchema(Schema):
    after = fields.String(load_default=None)
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


class RequestCountsSchema(Schema):
    total = fields.Integer(metadata={"description": "requests x regions"})
    completed = fields.Integer()
    failed = fields.Integer()


class BatchSchema(Schema):
    """OpenAI's batch object."""

    id = fields.String()
    object = fields.String(metadata={"example": "batch"})
    endpoint = fields.String()
    errors = fields.Dict(allow_none=True)
    input_file_id = fields.String()
    completion_window = fields.String()
    status = fields.String(
        metadata={
            "description": "validating | failed | in_progress | completed | cancelling | cancelled"
        }
    )
    output_file_id = fields.String(allow_none=True)
    error_file_id = fields.String(allow_none=True)
    created_at = fields.Integer()
    in_progress_at = fields.Integer(allow_none=True)
    expires_at = fields.Integer(allow_none=True)
    finalizing_at = fields.Integer(allow_none=True)
    completed_at = fields.Integer(allow_none=True)
    failed_at = fields.Integer(allow_none=True)
    expired_at = fields.Integer(allow_none=True)
    cancelling_at = fields.Integer(allow_none=True)
    cancelled_at = fields.Integer(allow_none=True)
    request_counts = fields.Nested(RequestCountsSchema)
    metadata = fields.Dict(allow_none=True)
    regions = fields.List(fields.String(), allow_none=True)
    failover = fields.String()
    reuse = fields.Boolean()


class BatchListSchema(Schema):
    object = fields.String()
    data = fields.List(fields.Nested(BatchSchema))
    first_id = fields.String(allow_none=True)
    last_id = fields.String(allow_none=True)
    has_more = fields.Boolean()


class FileSchema(Schema):
    """OpenAI's file object."""

    id = fields.String()
    object = fields.String(metadata={"example": "file"})
    bytes = fields.Integer()
    created_at = fields.Integer()
    filename = fields.String()
    purpose = fields.String(metadata={"description": "batch, batch_output"})
    status = fields.String()
    status_details = fields.String(allow_none=True)


class FileListSchema(Schema):
    object = fields.String()
    data = fields.List(fields.Nested(FileSchema))
    has_more = fields.Boolean()


UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                    },
                }
            }
        },
    }
}


def _st() -> tuple[DispatcherState, Any]:
    st = state()
    return st, objects_for(st.store)


def _batch(batch_id: str) -> StoredObject:
    st, objects = _st()
    obj = objects.get(g.tenant, "batch", batch_id)
    if obj is None:
        raise NotFound(f"no batch {batch_id!r}", details={"batch_id": batch_id})
    return ob.materialize(objects, st.store, obj, st.clock())


def _view(obj: StoredObject) -> dict[str, Any]:
    """The batch now; the first read that sees it final records when it ended."""
    st, objects = _st()
    view = ob.batch_view(obj, st.store, st.clock())
    if view["status"] in {"completed", "cancelled"} and "_done_at" not in obj.body:
        objects.update_body(obj.tenant, "batch", obj.id, {**obj.body, "_done_at": st.clock()})
    return view


@blp.route("/files", methods=["POST"])
@blp.doc(**UPLOAD_DOC)
@blp.response(200, FileSchema)
@blp.alt_response(413, description="payload_too_large (ES_MAX_BODY_BYTES)")
@blp.alt_response(422, description="validation_error: no file, or purpose is not batch")
def upload_file() -> dict[str, Any]:
    """Upload a batch input file (JSONL); it is checked when a batch uses it."""
    st, objects = _st()
    upload = request.files.get("file")
    purpose = request.form.get("purpose")
    errors: dict[str, list[str]] = {}
    if purpose != "batch":
        errors["purpose"] = ["only purpose 'batch' is supported"]
    if upload is None:
        errors["file"] = ["a file is required (multipart field 'file')"]
    if errors:
        raise ValidationFailed(details=errors)
    assert upload is not None
    content = upload.read()
    now = st.clock()
    body: dict[str, Any] = {
        "id": f"file-{ob.new_id('in').removeprefix('in_')}",
        "object": "file",
        "bytes": len(content),
        "created_at": int(now),
        "filename": upload.filename or "batch.jsonl",
        "purpose": "batch",
        "status": "processed",
        "status_details": None,
    }
    objects.put(StoredObject("file", body["id"], g.tenant, now, body, content))
    logger.info("batch file uploaded", extra={"file_id": body["id"], "bytes": len(content)})
    return body


@blp.route("/files", methods=["GET"])
@blp.response(200, FileListSchema)
def list_files() -> dict[str, Any]:
    """The tenant's uploaded files, newest first."""
    _, objects = _st()
    return {
        "object": "list",
        "data": [ob.file_view(o) for o in objects.list(g.tenant, "file")],
        "has_more": False,
    }


def _output(file_id: str) -> tuple[StoredObject, str] | None:
    parsed = ob.parse_output_file_id(file_id)
    if parsed is None:
        return None
    _, objects = _st()
    obj = objects.get(g.tenant, "batch", parsed[0])
    return None if obj is None else (obj, parsed[1])


@blp.route("/files/<file_id>", methods=["GET"])
@blp.response(200, FileSchema)
@blp.alt_response(404, description="not_found")
def retrieve_file(file_id: str) -> dict[str, Any]:
    """A file object: an uploaded file, or a batch's output or error file."""
    st, objects = _st()
    output = _output(file_id)
    if output is not None:
        obj, which = output
        size = sum(len(line.encode()) for line in ob.output_lines(obj, st.store, which))
        return {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": obj.body["created_at"],
            "filename": f"{obj.id}_{which}.jsonl",
            "purpose": "batch_output",
            "status": "processed",
            "status_details": None,
        }
    found = objects.get(g.tenant, "file", file_id)
    if found is None:
        raise NotFound(f"no file {file_id!r}", details={"file_id": file_id})
    return ob.file_view(found)


@blp.route("/files/<file_id>/content", methods=["GET"])
@blp.response(200, description="the file's bytes (JSONL)")
@blp.alt_response(404, description="not_found")
def file_content(file_id: str) -> Response:
    """A file's content. A batch's output and error files are built from its executions
    when read: one line per request and region (``custom_id`` and ``region``)."""
    st, objects = _st()
    output = _output(file_id)
    if output is not None:
        obj, which = output
        text = "".join(ob.output_lines(obj, st.store, which))
        return Response(text.encode(), mimetype="application/octet-stream")
    found = objects.get(g.tenant, "file", file_id, content=True)
    if found is None or found.content is None:
        raise NotFound(f"no file {file_id!r}", details={"file_id": file_id})
    return Response(found.content, mimetype="application/octet-stream")


@blp.route("/batches", methods=["POST"])
@blp.arguments(BatchCreateSchema())
@blp.response(200, BatchSchema)
@blp.alt_response(404, description="not_found: no such input file")
@blp.alt_response(422, description="validation_error: endpoint, window, regions, failover")
def create_batch(body: dict[str, Any]) -> dict[str, Any]:
    """Run every line of an input file, in each requested region. A file with errors
    gives a batch with status ``failed`` and its errors, each naming its line."""
    st, objects = _st()
    file = objects.get(g.tenant, "file", body["input_file_id"], content=True)
    if file is None or file.content is None:
        raise NotFound(
            f"no file {body['input_file_id']!r}", details={"input_file_id": body["input_file_id"]}
        )
    requested, failover = ob.selection(body["metadata"], body)
    reuse = ob.wants_reuse(body["metadata"], body)
    if requested is not None:
        unknown = [r for r in requested if r not in st.regions]
        if unknown:
            raise ValidationFailed(
                details={"regions": [f"unknown regions {unknown}; known: {st.regions.names()}"]}
            )
    now = st.clock()
    batch_id = ob.new_id("batch")
    view: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": body["endpoint"],
        "errors": None,
        "input_file_id": body["input_file_id"],
        "completion_window": body["completion_window"],
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": int(now),
        "in_progress_at": None,
        "expires_at": int(now + ob.COMPLETION_WINDOWS[body["completion_window"]]),
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body["metadata"],
        "regions": requested,
        "failover": failover.value,
        "reuse": reuse,
    }
    lines, errors = ob.parse_lines(
        file.content, st.regions, requested, st.settings.max_job_questions
    )
    if reuse:
        lines = ob.with_reuse(lines)
    planned = (
        [] if errors else ob.plan_jobs(batch_id, g.tenant, lines, st.regions, requested, failover)
    )
    total = sum(len(job.questions) * len(job.regions_by_model[job.models[0]]) for job, _ in planned)
    if total > st.limits.max_executions:
        errors = [
            ob.LineError(
                "too_many_tasks", f"{total} requests x regions; at most {st.limits.max_executions}"
            )
        ]
    if errors:
        view.update(
            status="failed",
            failed_at=int(now),
            errors={
                "object": "list",
                "data": [e.view() for e in errors[: ob.MAX_REPORTED_ERRORS]],
            },
        )
        objects.put(StoredObject("batch", batch_id, g.tenant, now, view))
        logger.info("batch failed validation", extra={"batch_id": batch_id, "errors": len(errors)})
        return view
    view["_plan"] = ob.plan_body(planned)
    obj = StoredObject("batch", batch_id, g.tenant, now, view)
    objects.put(obj)
    obj = ob.materialize(objects, st.store, obj, now)
    logger.info(
        "batch submitted",
        extra={"batch_id": batch_id, "lines": len(lines), "jobs": len(planned), "total": total},
    )
    return _view(obj)


@blp.route("/batches", methods=["GET"])
@blp.arguments(BatchListQuerySchema, location="query")
@blp.response(200, BatchListSchema)
def list_batches(query: dict[str, Any]) -> dict[str, Any]:
    """The tenant's batches, newest first; ``after`` a batch id, at most ``limit``."""
    st, objects = _st()
    found = objects.list(g.tenant, "batch")
    if query["after"] is not None:
        ids = [o.id for o in found]
        found = found[ids.index(query["after"]) + 1 :] if query["after"] in ids else []
    page = found[: query["limit"]]
    data = [_view(ob.materialize(objects, st.store, o, st.clock())) for o in page]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(found) > len(page),
    }


@blp.route("/batches/<batch_id>", methods=["GET"])
@blp.response(200, BatchSchema)
@blp.alt_response(404, description="not_found (also another tenant's batch)")
def retrieve_batch(batch_id: str) -> dict[str, Any]:
    """A batch: status and request_counts (requests x regions) read from its jobs."""
    return _view(_batch(batch_id))


@blp.route("/batches/<batch_id>/cancel", methods=["POST"])
@blp.response(200, BatchSchema)
@blp.alt_response(404, description="not_found")
@blp.alt_response(409, description="conflict: the batch already ended")
def cancel_batch(batch_id: str) -> dict[str, Any]:
    """Cancel the requests not yet started; calls in flight finish and keep their answer."""
    st, objects = _st()
    obj = _batch(batch_id)
    status = ob.batch_view(obj, st.store, st.clock())["status"]
    if status in {"failed", "completed", "expired"}:
        raise Conflict(
            f"batch {batch_id} is {status}: nothing to cancel", details={"status": status}
        )
    now = st.clock()
    cancelled = sum(st.store.cancel_job(g.tenant, j["job_id"], now) for j in obj.body["_jobs"])
    body = {**obj.body, "cancelling_at": obj.body.get("cancelling_at") or int(now)}
    objects.update_body(g.tenant, "batch", batch_id, body)
    logger.info("batch cancel", extra={"batch_id": batch_id, "cancelled": cancelled})
    return _view(StoredObject("batch", batch_id, g.tenant, obj.created_at, body))


def init_app(app: Flask, api: Any) -> None:
    api.register_blueprint(blp)
