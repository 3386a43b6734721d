"""The HTTP ingress: OpenAI-style completions over FastAPI under ``@serve.ingress``.

Every completion, streamed or not, names the adapter that produced it in the headers
``x-adapter-uri`` / ``x-adapter-sha256`` and in the JSON body, and the replica that
answered in ``x-replica-id`` (the id ``hotswap status`` lists). Bad requests get a 4xx with
an OpenAI-shaped JSON error body, never a 500.
"""


import hmac
import json
import logging
import os
import time
import uuid
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from hotswap.settings import HotswapSettings

__all__ = ["CompletionRequest", "Ingress", "api"]

logger = logging.getLogger(__name__)

# a replica that died (killed, crashed, scaled down) before answering: the completion is sent again, to
# another replica, since generating has no side effects; the answer names the version that produced it
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
_ATTEMPTS = 3

api = FastAPI(title="hotswap", description="Completions from a base model with hot-swapped LoRA adapters.")

_Stop = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class CompletionRequest(BaseModel):
    """The supported subset of OpenAI's ``/v1/completions`` body; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=512, description="Accepted for compatibility; one model is served.")
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=1_000_000)] | Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=1_000_000)]], Field(min_length=1, max_length=1)
    ]
    max_tokens: int = Field(16, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: _Stop | Annotated[list[_Stop], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    user: str | None = Field(None, max_length=256)

    def to_replica(self) -> dict:
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "stop": self.stop, "seed": self.seed}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


_EXPECTED = {
    "prompt": "a non-empty string, or a list holding one",
    "stop": "a string or a list of up to 4 non-empty strings",
}


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems: dict[str, str] = {}
    for item in exc.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        if item.get("type") == "json_invalid":
            problems["body"] = "the body is not valid JSON"
            continue
        field = loc[0] if loc else "body"
        if item.get("type") == "extra_forbidden":
            problems[field] = f"unknown field '{field}'"
        elif item.get("type") == "missing":
            problems[field] = f"'{field}' is required"
        elif field in _EXPECTED and len(loc) > 1:  # a union: one error per branch, say what is accepted
            problems[field] = f"'{field}' must be {_EXPECTED[field]}"
        else:
            problems.setdefault(field, f"'{field}': {item.get('msg')}")
    param = next((f for f in problems if f != "body"), None)
    return _error(400, "; ".join(problems.values()) or "invalid request", param)


async def _admin_call(app_name: str, operation: str, request: Request) -> JSONResponse:
    from ray.exceptions import RayTaskError

    from hotswap.controller import get_controller
    from hotswap.errors import (
        AdapterFetchError,
        AdapterNotFoundError,
        AdapterValidationError,
        ConfigError,
        ControllerNotFoundError,
        HotswapError,
        RolloutConflictError,
        UnsafePathError,
    )

    args: list = []
    if operation == "roll":
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON; send {\"uri\": \"s3://...\", \"canary\": 10}")
        uri, canary = (body.get("uri"), body.get("canary")) if isinstance(body, dict) else (None, None)
        if not isinstance(uri, str) or not uri or (canary is not None and (
                isinstance(canary, bool) or not isinstance(canary, (int, float)) or not 0 < canary <= 100)):
            return _error(400, "roll takes {\"uri\": string, \"canary\": percent in (0, 100] or null}", "uri")
        args = [uri, canary]
    try:
        controller = get_controller(app_name)
        return JSONResponse(await getattr(controller, operation).remote(*args))
    except (RayTaskError, HotswapError) as e:
        cause = e.cause if isinstance(e, RayTaskError) else e
        statuses = [(AdapterValidationError, 422), (AdapterNotFoundError, 404), (UnsafePathError, 403),
                    (AdapterFetchError, 502), (RolloutConflictError, 409), (ConfigError, 400),
                    (ControllerNotFoundError, 503), (HotswapError, 500)]
        status = next((code for cls, code in statuses if isinstance(cause, cls)), 500)
        body = {"error": {"message": str(cause), "type": type(cause).__name__}}
        if isinstance(cause, AdapterValidationError):
            body["error"]["problems"] = cause.problems
        return JSONResponse(body, status_code=status)


def _no_replica(error: BaseException) -> JSONResponse:
    return _error(503, f"no model replica could answer ({type(error).__name__}, {_ATTEMPTS} attempts); retry")


def _adapter_headers(item: dict) -> dict[str, str]:
    return {"x-adapter-uri": item["adapter_uri"], "x-adapter-sha256": item["adapter_sha256"],
            "x-replica-id": item["replica_id"]}


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, replica: DeploymentHandle, settings: HotswapSettings) -> None:
        self.replica = replica
        self.settings = settings
        self.model_id = settings.base_model
        self.app_name = serve.get_replica_context().app_name
        # the admin routes exist only when a token is configured (read once, at start)
        token = os.environ.get("HOTSWAP_ADMIN_TOKEN") or None
        self._admin_token = f"Bearer {token}".encode() if token else None

    @api.api_route("/admin/{operation}", methods=["GET", "POST"])
    async def admin(self, operation: str, request: Request) -> JSONResponse:
        """roll (POST {"uri", "canary"}), promote, rollback (POST), status (GET); bearer token required."""
        if self._admin_token is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), self._admin_token):
            return JSONResponse({"error": {"message": "missing or wrong bearer token", "type": "unauthorized"}},
                                status_code=401, headers={"www-authenticate": "Bearer"})
        expected = {"roll": "POST", "promote": "POST", "rollback": "POST", "status": "GET"}
        if expected.get(operation) != request.method:
            return _error(404 if operation not in expected else 405,
                          f"unknown admin operation {request.method} /admin/{operation}; use POST roll, promote, "
                          "rollback or GET status")
        return await _admin_call(self.app_name, operation, request)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            replica_id = await self.replica.ping.remote()
        except Exception as e:  # no replica can answer
            return _error(503, f"no model replica is available: {type(e).__name__}")
        return JSONResponse({"status": "ok", "replica": replica_id})

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "owned_by": "hotswap"}]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            return await self._stream(body, request_id, created)
        try:
            result = await self._retrying(lambda: self.replica.complete.remote(body.to_replica()))
        except _REPLICA_GONE as e:
            return _no_replica(e)
        if "error" in result:
            return _error(result["status"], result["error"]["message"])
        payload = self._completion(request_id, created, result["text"], result["finish_reason"], result)
        payload["usage"] = {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        }
        return JSONResponse(payload, headers=_adapter_headers(result))

    def _completion(self, request_id: str, created: int, text: str, finish_reason, adapter: dict) -> dict:
        """An OpenAI ``text_completion`` object (a whole answer, or one streamed chunk) naming its adapter."""
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": self.model_id,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "adapter_uri": adapter["adapter_uri"],
            "adapter_sha256": adapter["adapter_sha256"],
        }

    @staticmethod
    async def _retrying(call):
        """Await ``call()``; call it again (up to ``_ATTEMPTS`` times) while the replica it reached is gone."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return await call()
            except _REPLICA_GONE as e:
                if attempt == _ATTEMPTS:
                    raise
                logger.warning("a replica went away before answering (%s); sending the request again (%d/%d)",
                               type(e).__name__, attempt + 1, _ATTEMPTS)

    async def _stream(self, body: CompletionRequest, request_id: str, created: int):
        async def start():
            events = self.replica.options(stream=True).stream.remote(body.to_replica())
            return events, await events.__anext__()

        try:  # before the first item nothing was sent to the client: a replica gone by then is retried
            events, first = await self._retrying(start)
        except _REPLICA_GONE as e:
            return _no_replica(e)
        if "error" in first:
            return _error(first["status"], first["error"]["message"])

        async def sse():
            async for item in events:
                if "error" in item:
                    chunk = {"error": item["error"]}
                else:
                    chunk = self._completion(request_id, created, item["delta"], item["finish_reason"], first)
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=_adapter_headers(first))
