"""The machine-readable contract: an OpenAPI 3.1 document of every route, with one request schema per
workflow built from its exposed inputs, and a small self-contained page that shows it."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from .. import __version__
from ..core.clients import CLIENT_ID
from ..core.workflows import InputSpec, Workflow, WorkflowStore

__all__ = ["DOCS_PAGE", "document"]

JSON_TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}
STATUSES = ["connected", "listening", "progress", "closed", "error"]
_STRING = {"type": "string"}
COMPONENT_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")  # OpenAPI: a component's name is ^[a-zA-Z0-9.\-_]+$


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "bad input (the detail says what)",
        401: "a valid API key is required",
        403: "the API key may not do this",
        404: "not found",
        405: "method not allowed",
        408: "the body did not arrive in time",
        409: "the client's results are being sent to another request right now",
        410: "results whose files were lost (removed or cut short by other hands), now forgotten",
        413: "too large",
        415: "an upload that is not an allowed, whole media file, or a body in a Content-Type or Content-Encoding "
        "the route does not take",
        417: "an Expect header other than 100-continue",
        429: "too many requests or jobs (see Retry-After)",
        502: "in a cluster: the leading bridge was lost after the request reached it; whether it was done is "
        "not known (see /execution-info)",
        503: "not now (see Retry-After): no backend can take it, the bridge's store or database is away, it "
        "is stopping, or its cluster has no leader",
        507: "the bridge's disk is full",
    }
    # Any route: keys, rate limits, and a bridge that cannot answer now (in a cluster, any request).
    return {str(code): {"description": reasons[code], **_json(_ref("Error"))} for code in (*codes, 401, 429, 503)}


def _limited() -> dict[str, Any]:
    """The one refusal of a route open without a key: an address over `ip_rate_limit`."""
    return {"429": {"description": "too many requests from this address (see Retry-After)", **_json(_ref("Error"))}}


def _client_id(required: bool = True) -> dict[str, Any]:
    return {
        "name": "clientId",
        "in": "query",
        "required": required,
        "description": "the app's id for one request context (a UUID is recommended)",
        "schema": {"type": "string", "pattern": f"^{CLIENT_ID.pattern}$"},
    }


def input_schema(spec: InputSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": JSON_TYPES[spec.type], "title": spec.title, "default": spec.default}
    if spec.upload:
        schema["description"] = f"the stored name of an uploaded {spec.upload} file (POST /upload)"
        return schema
    if spec.minimum is not None:
        schema["minimum"] = spec.minimum
    if spec.maximum is not None:
        schema["maximum"] = spec.maximum
    if spec.choices is not None:
        schema["enum"] = spec.choices
    if spec.description:
        schema["description"] = spec.description
    return schema


WEBHOOK_PROPERTY = {
    "type": "string",
    "format": "uri",
    "description": "an http(s) URL the job's end is POSTed to, signed (Standard Webhooks)",
}


def request_schema(workflow: Workflow, root: str = "", webhooks: bool = False) -> dict[str, Any]:
    """What POST /generate-based-workflow takes for this workflow: its alias and its exposed inputs
    (and `_webhook` when the bridge signs webhooks)."""
    properties: dict[str, Any] = {"workflow": {"const": workflow.alias}}
    properties.update({key: input_schema(spec) for key, spec in workflow.inputs.items()})
    if webhooks:
        properties["_webhook"] = WEBHOOK_PROPERTY
    schema: dict[str, Any] = {
        "type": "object",
        "title": workflow.alias,
        "properties": properties,
        "required": ["workflow"],
        "additionalProperties": False,
    }
    if workflow.description:
        schema["description"] = workflow.description
    catalogue = workflow.catalogue_entry(root)
    if catalogue["thumbnail"]:
        schema["x-thumbnail"] = catalogue["thumbnail"]
    return schema


def _component_names(aliases: list[str]) -> dict[str, str]:
    """`Generate_<alias>` for each alias, in the characters OpenAPI allows a component's name (a
    space, a slash or an accent in a file name would make the document invalid, or a $ref point
    nowhere); a name two aliases would share gets a number. The schema's title keeps the alias."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for alias in aliases:
        name = base = "Generate_" + COMPONENT_UNSAFE.sub("_", alias)
        number = 1
        while name in taken:
            number += 1
            name = f"{base}_{number}"
        names[alias] = name
        taken.add(name)
    return names


def document(workflows: WorkflowStore, aliases: list[str], root: str = "", webhooks: bool = False) -> dict[str, Any]:
    """The OpenAPI document for the workflows a caller may use; `root`: the path a proxy serves the
    bridge under (its `servers`, which the paths are relative to); `webhooks`: it signs webhooks."""
    names = _component_names(aliases)
    per_workflow = {name: request_schema(workflows.get(alias), root, webhooks) for alias, name in names.items()}
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]},
        "CatalogueEntry": {
            "type": "object",
            "required": ["name", "description", "thumbnail", "inputs"],
            "properties": {
                "name": _STRING,
                "description": _STRING,
                "thumbnail": {"type": ["string", "null"], "description": "a link to GET /workflow-thumbnail"},
                "inputs": {"type": "object", "additionalProperties": _ref("Input")},
            },
        },
        "Status": {
            "type": "object",
            "properties": {
                "status": {"enum": STATUSES},
                "detail": {"type": "string"},
                "details": {"type": "string", "description": "the same text as detail"},
                "job_id": {"type": "string", "description": "the job the message is about"},
                "jobs_left": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "the client's jobs it has still to hear the end of (with job_id)",
                },
            },
            "required": ["status", "detail", "details"],
        },
        "Input": {
            "type": "object",
            "properties": {
                "type": {"enum": list(JSON_TYPES)},
                "title": {"type": "string"},
                "class": {"type": "string"},
                "default": {},
                "upload": {"enum": ["image", "video", "audio"]},
                "min": {"type": "number"},
                "max": {"type": "number"},
                "choices": {"type": "array"},
                "description": {"type": "string"},
            },
            "required": ["type", "title", "class", "default"],
        },
        **per_workflow,
    }
    generate_body = {"oneOf": [_ref(name) for name in per_workflow]} if per_workflow else {"type": "object"}
    ok_detail = _json({"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]})
    paths: dict[str, Any] = {
        "/workflow-list": {
            "get": {
                "summary": "Every workflow alias, sorted; `?detail=1`: the catalogue (description, thumbnail, inputs)",
                "parameters": [
                    {"name": "detail", "in": "query", "schema": {"type": "string", "enum": ["1", "true", "0", "false"]}}
                ],
                "responses": {
                    "200": {
                        "description": "aliases, or catalogue entries with ?detail=1",
                        **_json(
                            {
                                "oneOf": [
                                    {"type": "array", "items": {"type": "string"}},
                                    {"type": "array", "items": _ref("CatalogueEntry")},
                                ]
                            }
                        ),
                    },
                    **_errors(400),
                },
            }
        },
        "/workflow-thumbnail": {
            "get": {
                "summary": "A picture of what the workflow makes, when its alias entry names one",
                "parameters": [
                    {"name": "workflow", "in": "query", "required": True, "schema": _STRING},
                    {
                        "name": "token",
                        "in": "query",
                        "schema": _STRING,
                        "description": "the API key, for an <img> (which sends no headers), when keys are on",
                    },
                ],
                "responses": {
                    "200": {"description": "the image", "content": {"image/*": {"schema": {"type": "string"}}}},
                    **_errors(400, 403, 404),
                },
            }
        },
        "/workflow-info": {
            "get": {
                "summary": "The inputs a workflow exposes",
                "parameters": [{"name": "workflow", "in": "query", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {
                        "description": "inputs by `node/input`",
                        **_json({"type": "object", "additionalProperties": _ref("Input")}),
                    },
                    **_errors(400, 403),
                },
            }
        },
        "/upload": {
            "post": {
                "summary": "Store files for later jobs (one file per part; the field name is your identifier)",
                "parameters": [_client_id(required=False)],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {"file": {"type": "string", "format": "binary"}},
                                "additionalProperties": {"type": "string", "format": "binary"},
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "stored names by identifier",
                        **_json({"type": "object", "additionalProperties": {"type": "string"}}),
                    },
                    **_errors(400, 408, 413, 415, 417, 502, 507),
                },
            }
        },
        "/generate-based-workflow": {
            "post": {
                "summary": "Queue a job; with wait=1, answer once it ended, with its results",
                "parameters": [
                    _client_id(),
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": ["1", "true", "0", "false"]},
                        "description": "answer once the job ended: its results, as GET /history gives them",
                    },
                    {
                        "name": "resType",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": ["base64", "url"]},
                        "description": "with wait: how the results come, as for GET /history",
                    },
                ],
                "requestBody": {"required": True, **_json(generate_body)},
                "responses": {
                    "200": {
                        "description": "accepted: its place in line and its id; with wait, the job's results "
                        "(multipart, base64 JSON or links, as GET /history), which then count as fetched",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"detail": {"type": "string"}, "job_id": {"type": "string"}},
                                }
                            },
                            "multipart/form-data": {"schema": {"type": "object"}},
                        },
                    },
                    "204": {"description": "with wait: the job left no results to hand over (X-Detail says why)"},
                    **_errors(400, 403, 408, 410, 413, 415, 417, 503, 507),
                    "502": {
                        "description": "with wait: the job ended without results; its error, as its socket heard it "
                        "(with `status` and `job_id`). In a cluster, also: the leading bridge was lost after the "
                        "request reached it, and whether the job was accepted is not known (see /execution-info)",
                        **_json(
                            {
                                "oneOf": [
                                    {
                                        "type": "object",
                                        "properties": {
                                            "status": {"const": "error"},
                                            "detail": _STRING,
                                            "job_id": _STRING,
                                        },
                                        "required": ["status", "detail", "job_id"],
                                    },
                                    {**_ref("Error"), "not": {"required": ["job_id"]}},
                                ]
                            }
                        ),
                    },
                },
            }
        },
        "/history": {
            "get": {
                "summary": "The results of the client's finished jobs, then forgets them",
                "parameters": [
                    _client_id(),
                    {"name": "resType", "in": "query", "required": False, "schema": {"enum": ["base64", "url"]}},
                ],
                "responses": {
                    "200": {
                        "description": "one part per file (multipart), base64 JSON with resType=base64, or presigned "
                        "links with resType=url (results in object storage only)",
                        "content": {
                            "multipart/form-data": {"schema": {"type": "object"}},
                            "application/json": {"schema": {"type": "object"}},
                        },
                    },
                    "204": {"description": "nothing to fetch; the reason is in the X-Detail header"},
                    **_errors(400, 409, 410),
                },
            }
        },
        "/execution-info": {
            "get": {
                "summary": "The client's latest status",
                "parameters": [_client_id()],
                "responses": {"200": {"description": "status", **_json(_ref("Status"))}, **_errors(400)},
            }
        },
        "/generation-count": {
            "get": {
                "summary": "Jobs ever accepted",
                "responses": {
                    "200": {"description": "a bare integer", **_json({"type": "integer", "minimum": 0})},
                    **_errors(),
                },
            }
        },
        "/free": {
            "post": {
                "summary": "Ask ComfyUI to unload models and free memory",
                "parameters": [_client_id(required=False)],
                "responses": {"200": {"description": "done", **ok_detail}, **_errors(400, 502, 503)},
            }
        },
        "/interrupt": {
            "post": {
                "summary": "Cancel the client's jobs",
                "parameters": [_client_id()],
                "responses": {"200": {"description": "cancelled", **ok_detail}, **_errors(400, 502, 507)},
            }
        },
        "/health": {
            "get": {
                "summary": "The process serves; each backend's state (addresses only for a caller with a key)",
                "responses": {"200": {"description": "ok", **_json(HEALTH)}, **_limited()},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (jobs, queue, backends, requests, journal commits)",
                "responses": {
                    "200": {"description": "text exposition format", "content": {"text/plain": {"schema": _STRING}}},
                    **_errors(403),
                },
            }
        },
        "/ready": {
            "get": {
                "summary": "Whether to send work here: 503 when no backend is usable, the queue is too deep, "
                "or the bridge is stopping",
                "responses": {
                    "200": {"description": "ready", **_json(HEALTH)},
                    "503": {"description": "not ready; `detail` says why", **_json(HEALTH)},
                    **_limited(),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document (with API keys on, for the caller's workflows)",
                "responses": {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}, **_errors()},
            }
        },
        "/docs": {
            "get": {
                "summary": "A page that shows this document (`/docs?token=KEY` when keys are on)",
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": _STRING}}},
                    **_limited(),
                },
            }
        },
        "/docs/": {
            "get": {
                "summary": "Redirects to /docs",
                "responses": {"301": {"description": "to /docs"}, **_limited()},
            }
        },
        "/playground": {
            "get": {
                "summary": "A page to try any workflow: a form from its inputs, live progress, the results "
                "(its files are under /playground/)",
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": _STRING}}},
                    **_limited(),
                },
            }
        },
        "/playground/": {
            "get": {
                "summary": "Redirects to /playground",
                "responses": {"301": {"description": "to /playground"}, **_limited()},
            }
        },
        "/playground/{name}": {
            "get": {
                "summary": "One of the playground's files (app.js, style.css)",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": _STRING}],
                "responses": {"200": {"description": "the file"}, **_errors(404)},
            }
        },
        "/ws": {
            "get": {
                "summary": "The client's live status channel (WebSocket; `?token=KEY` when keys are on)",
                "parameters": [_client_id(), {"name": "token", "in": "query", "schema": {"type": "string"}}],
                "responses": {
                    "101": {"description": "switching to WebSocket; frames are Status objects"},
                    **_errors(400),
                },
            }
        },
    }
    served_at = {"servers": [{"url": root}]} if root else {}  # (absent: "/", the default)
    return {
        "openapi": "3.1.0",
        **served_at,
        "info": {
            "title": "comfybridge",
            "version": __version__,
            "description": 'One small API in front of many ComfyUI servers. Errors are {"detail": ...}. '
            "The workflow catalogue (descriptions, thumbnails, inputs) is GET /workflow-list?detail=1.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }


HEALTH: dict[str, Any] = {
    "type": "object",
    # A bridge of a cluster that does not lead reports no schedule (`schedule` says whose it is).
    "required": ["status", "backends"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "ready", "not ready"]},
        "detail": {"type": "string"},
        "schedule": {"type": "string"},
        "backends": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["state"],
                "properties": {
                    "url": {"type": "string"},
                    "state": {"type": "string", "enum": ["up", "down", "draining", "resting", "stuck"]},
                    "in_flight": {"type": "integer"},
                    "comfyui_queue": {"type": "integer"},
                    "relative_speed": {"type": ["number", "null"]},
                    "jobs_api": {"type": ["boolean", "null"]},
                },
            },
        },
        "usable_backends": {"type": "integer"},
        "queued": {"type": "integer"},
        "stopping": {"type": "boolean"},
        "generation_count": {"type": "integer"},
    },
}


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>comfybridge API</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{margin-top:2rem;border-bottom:1px solid #ddd}code,pre{background:#f5f5f5;border-radius:4px;padding:.1rem .3rem}
pre{padding:.6rem;overflow:auto}.m{font-weight:bold;text-transform:uppercase;margin-right:.5rem}
</style></head><body>
<h1>comfybridge API</h1>
<p>The machine-readable contract is <a href="openapi.json"><code>openapi.json</code></a> (OpenAPI 3.1).</p>
<div id="routes">Loading…</div>
<script>
const ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
const esc = s => String(s).replace(/[&<>"']/g, c => ENTITIES[c]);
const token = new URLSearchParams(location.search).get("token");  // with API keys on: /docs?token=KEY
fetch("openapi.json", {headers: token ? {"X-API-Key": token} : {}}).then(r => r.json()).then(doc => {
  if (!doc.paths) { document.getElementById("routes").textContent = doc.detail; return; }
  const out = [];
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const params = (op.parameters || []).map(p => p.name + (p.required ? "" : "?")).join(", ");
      const codes = Object.keys(op.responses).join(" ");
      out.push(`<h2><span class="m">${method}</span><code>${esc(path)}</code></h2><p>${esc(op.summary)}</p>` +
        (params ? `<p>Query: <code>${esc(params)}</code></p>` : "") + `<p>Answers: ${esc(codes)}</p>`);
    }
  }
  const bodies = Object.entries(doc.components.schemas).filter(([n]) => n.startsWith("Generate_"));
  out.push("<h2>Workflows</h2>");
  for (const [name, schema] of bodies) {
    out.push(`<h3>${esc(schema.title)}</h3><pre>${esc(JSON.stringify(schema.properties, null, 2))}</pre>`);
  }
  document.getElementById("routes").innerHTML = out.join("");
});
</script></body></html>
"""


def _inline_hash(kind: str) -> str:
    """The CSP source that lets the docs page's one inline <script> or <style> run, and nothing else."""
    start = DOCS_PAGE.index(f"<{kind}>") + len(f"<{kind}>")
    digest = hashlib.sha256(DOCS_PAGE[start : DOCS_PAGE.index(f"</{kind}>", start)].encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


DOCS_HASHES = {kind: _inline_hash(kind) for kind in ("script", "style")}
