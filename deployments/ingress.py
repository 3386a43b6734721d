"""The HTTP ingress: OpenAI-style completions and chat completions over FastAPI under ``@serve.ingress``.

A chat request's messages are rendered here, with the base model's own chat template
(:class:`hotswap.chat.ChatRenderer`, the tokenizer loaded on the first chat request), and the
prompt goes to the replicas' ordinary ``complete`` / ``stream``: chat and completions share
the running batch, adapters, retries and errors.

Every completion, streamed or not, names the adapter that produced it in the headers
``x-adapter-uri`` / ``x-adapter-sha256`` (and ``x-adapter-config-sha256``) and in the JSON body, and the replica that
answered in ``x-replica-id`` (the id ``hotswap status`` lists). Bad requests get a 4xx with
an OpenAI-shaped JSON error body, never a 500; a replica whose admission queue is full
answers 429 with ``Retry-After``.
"""


import asyncio
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from hotswap.chat import ChatRenderer
from hotswap.errors import RequestError
from hotswap.settings import HotswapSettings

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "Ingress", "api"]

logger = logging.getLogger(__name__)

# a replica that died (killed, crashed, scaled down) before answering: the completion is sent again, to
# another replica, since generating has no side effects; the answer names the version that produced it
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
_ATTEMPTS = 3

_draining: set[asyncio.Task] = set()  # streams whose response ended on their last item, read to their end


def _drain(events) -> None:
    """Read a replica stream whose last item was sent to the client to its end, in the background: the replica's
    generator then returns as it would have, not cancelled mid-way (its cleanup and Serve's request record)."""
    async def drain():
        try:
            async for _ in events:
                pass
        except Exception:  # noqa: BLE001 - the answer is already sent; nothing left to tell the client
            logger.debug("the end of a finished stream failed", exc_info=True)

    task = asyncio.ensure_future(drain())
    _draining.add(task)
    task.add_done_callback(_draining.discard)


api = FastAPI(title="hotswap", description="Completions from a base model with hot-swapped LoRA adapters.")

MAX_BODY_BYTES = 8 << 20  # a 1,000,000-character prompt fits even as JSON \u escapes; nothing larger is read


class _BodyLimit:
    """Answer 413 to a request body over ``MAX_BODY_BYTES``, declared or streamed, before it is read whole."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return await _too_large(send)
        # read the body first, counting (a chunked body declares no length), then hand it to the app
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > MAX_BODY_BYTES:
                return await _too_large(send)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


async def _too_large(send) -> None:
    body = json.dumps({"error": {"message": f"request body over {MAX_BODY_BYTES} bytes; send a shorter prompt",
                                 "type": "invalid_request_error", "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


api.add_middleware(_BodyLimit)

_Stop = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _SamplingRequest(BaseModel):
    """The fields ``/v1/completions`` and ``/v1/chat/completions`` share; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=512, description="Accepted for compatibility; one model is served.")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: _Stop | Annotated[list[_Stop], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="Generate max_tokens even past the end-of-sequence token (as vLLM's "
                             "extra parameter): for benchmarks and load tests.")

    def _replica_request(self, prompt: str, max_tokens: int) -> dict:
        """What a replica's ``complete`` / ``stream`` take."""
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "stop": self.stop, "seed": self.seed, "ignore_eos": self.ignore_eos}


class CompletionRequest(_SamplingRequest):
    """The supported subset of OpenAI's ``/v1/completions`` body; unknown fields are refused."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=1_000_000)] | Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=1_000_000)]], Field(min_length=1, max_length=1)
    ]
    max_tokens: int = Field(16, ge=1, le=1_000_000)

    def to_replica(self) -> dict:
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return self._replica_request(prompt, self.max_tokens)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=1_000_000)]


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of text parts (joined with newlines, as vLLM does)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=1_000_000)] | Annotated[
        list[_TextPart], Field(min_length=1, max_length=64)
    ]
    name: str | None = Field(None, max_length=256)

    def for_template(self) -> dict:
        """The message as chat templates read it. ``developer`` is OpenAI's newer name for ``system``, which is
        the role templates know."""
        text = self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        return message | ({"name": self.name} if self.name is not None else {})


class ChatCompletionRequest(_SamplingRequest):
    """The supported subset of OpenAI's ``/v1/chat/completions`` body; unknown fields (tools, ...) are refused.

    Without ``max_tokens`` (or its newer name ``max_completion_tokens``) the reply may fill the rest of the
    context window, as OpenAI's does.
    """

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)

    def to_replica(self, prompt: str, *, window_left: int) -> dict:
        """The replica request for the rendered ``prompt``; ``window_left``: tokens the prompt leaves free."""
        max_tokens = self.max_tokens or self.max_completion_tokens or max(1, window_left)
        return self._replica_request(prompt, max_tokens)


def _error(status: int, message: str, param: str | None = None, *, retry_after_s: float | None = None
           ) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"retry-after": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def _stream_error(message: str) -> dict:
    """An error event for a stream whose status (200) is already sent: OpenAI's error object, as its API streams it."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def _replica_error(result: dict) -> JSONResponse:
    """A replica's refusal (``{"error", "status"[, "retry_after_s"]}``) as the response to send."""
    return _error(result["status"], result["error"]["message"], retry_after_s=result.get("retry_after_s"))


_EXPECTED = {  # fields that are unions: pydantic reports one error per branch, so say what is accepted instead
    "prompt": "a non-empty string, or a list holding one",
    "stop": "a string or a list of up to 4 non-empty strings",
    "content": 'a string, or a list of 1 to 64 {"type": "text", "text": ...} parts',
}


def _path(loc: list) -> tuple[str, str | None]:
    """``messages[0].role`` for an error location, and the union field it stopped at (its branch names are noise)."""
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        path += f".{part}" if path else str(part)
        if part in _EXPECTED and i + 1 < len(loc):
            return path, str(part)
    return path or "body", None


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems: dict[str, str] = {}
    for item in exc.errors():
        loc = [p for p in item.get("loc", ()) if p != "body"]
        if item.get("type") == "json_invalid":
            problems["body"] = "the body is not valid JSON"
            continue
        path, union = _path(loc)
        if union:
            problems[path] = f"'{path}' must be {_EXPECTED[union]}"
        elif item.get("type") == "extra_forbidden":
            problems[path] = f"unknown field '{path}'"
        elif item.get("type") == "missing":
            problems[path] = f"'{path}' is required"
        elif item.get("type") == "literal_error":
            problems.setdefault(path, f"'{path}': {item.get('msg')}, got {item.get('input')!r}")
        else:
            problems.setdefault(path, f"'{path}': {item.get('msg')}")
    param = next((f for f in problems if f != "body"), None)
    return _error(400, "; ".join(problems.values()) or "invalid request", param)


async def _admin_call(app_name: str, operation: str, request: Request) -> JSONResponse:
    from hotswap.controller import get_controller
    from hotswap.errors import AdapterValidationError, ConfigError, HotswapError, unwrap

    args: list = []
    kwargs: dict = {}
    if operation == "roll":
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON; send {\"uri\": \"s3://...\", \"canary\": 10}")
        uri, canary = (body.get("uri"), body.get("canary")) if isinstance(body, dict) else (None, None)
        if not isinstance(uri, str) or not uri or (canary is not None and (
                isinstance(canary, bool) or not isinstance(canary, (int, float)) or not 0 < canary <= 100)):
            return _error(400, "roll takes {\"uri\": string, \"canary\": percent in (0, 100] or null, "
                          "\"sha256\": 64 lowercase hex or null}", "uri")
        sha256 = body.get("sha256")
        if sha256 is not None:
            from hotswap.signing import check_pin

            try:
                check_pin(sha256, what="'sha256'")
            except ConfigError as e:
                return _error(400, str(e), "sha256")
        args, kwargs = [uri, canary], {"expected_sha256": sha256}
    try:  # finding the controller blocks (named-actor look-ups): off the event loop the requests share
        controller = await asyncio.to_thread(get_controller, app_name)
        return JSONResponse(await getattr(controller, operation).remote(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - every error maps to a status in one place (hotswap.errors)
        cause = unwrap(e)
        if not isinstance(cause, HotswapError):
            return _internal_error(f"admin {operation}", e)
        body = {"error": {"message": str(cause), "type": type(cause).__name__}}
        if isinstance(cause, AdapterValidationError):
            body["error"]["problems"] = cause.problems
        return JSONResponse(body, status_code=cause.http_status)


def _no_replica(error: BaseException) -> JSONResponse:
    return _error(503, f"no model replica could answer ({type(error).__name__}, {_ATTEMPTS} attempts); retry")


def _internal_error(what: str, error: BaseException) -> JSONResponse:
    """A JSON 500 naming an incident id; the exception goes to the ingress log under it, never to the client."""
    incident = uuid.uuid4().hex[:8]
    logger.error("%s failed (incident %s): %r", what, incident, error, exc_info=error)  # the stack, under the id
    return _error(500, f"internal error (incident {incident}; the ingress log has the details)")


def _usage(result: dict) -> dict[str, int]:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


def _adapter_headers(item: dict) -> dict[str, str]:
    return {"x-adapter-uri": item["adapter_uri"], "x-adapter-sha256": item["adapter_sha256"],
            # the config's digest too: a config-only re-push is another version with the same weights
            "x-adapter-config-sha256": item.get("adapter_config_sha256", ""),
            "x-replica-id": item["replica_id"]}


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, replica: DeploymentHandle, settings: HotswapSettings) -> None:
        # the transport to the replicas from this process's own environment (deployments.app SERVE_FAST_PATH_ENV):
        # a handle keeps the default of the process that built the app, not this one's
        from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT  # as Ray reads it (throughput mode too)

        self.replica = replica.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)
        self.settings = settings
        self.model_id = settings.base_model
        self.app_name = serve.get_replica_context().app_name
        # the admin routes exist only when a token is configured (read once, at start)
        token = os.environ.get("HOTSWAP_ADMIN_TOKEN") or None
        self._admin_token = f"Bearer {token}".encode() if token else None
        self._renderer: ChatRenderer | None = None  # loaded on the first chat request
        self._renderer_lock = asyncio.Lock()

    @api.api_route("/admin/{operation}", methods=["GET", "POST"])
    async def admin(self, operation: str, request: Request) -> JSONResponse:
        """roll (POST {"uri", "canary", "sha256"}), promote, rollback (POST), status (GET); bearer token required."""
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
            return await self._stream(body.to_replica(), lambda item, adapter: [
                self._completion(request_id, created, item["delta"], item["finish_reason"], adapter)])
        result = await self._complete(body.to_replica())
        if isinstance(result, JSONResponse):
            return result
        payload = self._completion(request_id, created, result["text"], result["finish_reason"], result)
        payload["usage"] = _usage(result)
        return JSONResponse(payload, headers=_adapter_headers(result))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        """Messages rendered with the base model's chat template, then generated like a completion."""
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            return _error(400, "give max_tokens or max_completion_tokens (its newer name), not both", "max_tokens")
        try:
            renderer = await self._chat_renderer()
        except Exception as e:  # the tokenizer could not be loaded (an unreachable hub, a broken checkpoint)
            logger.exception("chat: loading the tokenizer of %s failed", self.model_id)
            return _error(503, f"the tokenizer of base model {self.model_id!r} could not be loaded "
                               f"({type(e).__name__}: {e}); chat needs it to apply the chat template, retry later "
                               "or use /v1/completions")

        def render() -> dict:
            prompt = renderer.render([m.for_template() for m in body.messages])
            window_left = 0 if body.max_tokens or body.max_completion_tokens else (
                self.settings.max_seq_len - renderer.count_tokens(prompt))
            return body.to_replica(prompt, window_left=window_left)

        try:
            request = await asyncio.to_thread(render)
        except RequestError as e:
            return _error(e.http_status, str(e), "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            def chunks(item: dict, adapter: dict) -> list[dict]:
                out = [self._chat_chunk(request_id, created, {"content": item["delta"]}, None, adapter)
                       ] if item["delta"] else []
                if item["finish_reason"] is not None:  # OpenAI closes with an empty delta carrying the reason
                    out.append(self._chat_chunk(request_id, created, {}, item["finish_reason"], adapter))
                return out

            return await self._stream(request, chunks, opening=lambda adapter: [
                self._chat_chunk(request_id, created, {"role": "assistant", "content": ""}, None, adapter)])
        result = await self._complete(request)
        if isinstance(result, JSONResponse):
            return result
        message = {"role": "assistant", "content": result["text"]}
        payload = self._answer("chat.completion", request_id, created,
                               {"message": message, "finish_reason": result["finish_reason"]}, result)
        payload["usage"] = _usage(result)
        return JSONResponse(payload, headers=_adapter_headers(result))

    async def _chat_renderer(self) -> ChatRenderer:
        """The base model's tokenizer, loaded on the first chat request (completions never need it)."""
        if self._renderer is None:
            async with self._renderer_lock:
                if self._renderer is None:
                    self._renderer = await asyncio.to_thread(ChatRenderer.load, self.settings)
        return self._renderer

    def _answer(self, kind: str, request_id: str, created: int, choice: dict, adapter: dict) -> dict:
        """An OpenAI ``kind`` object (``text_completion``, ``chat.completion``, ``chat.completion.chunk``) with one
        choice, naming the adapter that produced it."""
        return {
            "id": request_id,
            "object": kind,
            "created": created,
            "model": self.model_id,
            "choices": [{"index": 0, **choice, "logprobs": None}],
            "adapter_uri": adapter["adapter_uri"],
            "adapter_sha256": adapter["adapter_sha256"],
        }

    def _completion(self, request_id: str, created: int, text: str, finish_reason, adapter: dict) -> dict:
        """A ``text_completion``: a whole answer, or one streamed chunk."""
        return self._answer("text_completion", request_id, created, {"text": text, "finish_reason": finish_reason},
                            adapter)

    def _chat_chunk(self, request_id: str, created: int, delta: dict, finish_reason, adapter: dict) -> dict:
        return self._answer("chat.completion.chunk", request_id, created,
                            {"delta": delta, "finish_reason": finish_reason}, adapter)

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

    async def _complete(self, request: dict) -> dict | JSONResponse:
        """A replica's whole answer to ``request``, or the error response to send instead."""
        try:
            result = await self._retrying(lambda: self.replica.complete.remote(request))
        except _REPLICA_GONE as e:
            return _no_replica(e)
        except Exception as e:  # noqa: BLE001 - the call itself failed (a transport error): a JSON 500, logged
            return _internal_error("the call to a model replica", e)
        if "error" in result:
            return _replica_error(result)
        return result

    async def _stream(self, request: dict, chunks: Callable[[dict, dict], list[dict]], *,
                      opening: Callable[[dict], list[dict]] | None = None):
        """Server-sent events for ``request``: ``opening(adapter)``, then ``chunks(item, adapter)`` for each item with
        text the replica yields (the first, which names the adapter, may carry text too), and ``data: [DONE]`` in the
        same message as the chunk with the finish reason (the response ends there; the replica's stream is read to
        its end in the background); or the error response, when the replica refuses the request."""
        async def start():
            events = self.replica.options(stream=True).stream.remote(request)
            return events, await events.__anext__()

        try:  # before the first item nothing was sent to the client: a replica gone by then is retried
            events, first = await self._retrying(start)
        except _REPLICA_GONE as e:
            return _no_replica(e)
        except Exception as e:  # noqa: BLE001 - the call itself failed (a transport error): a JSON 500, logged
            return _internal_error("the call to a model replica", e)
        if "error" in first:
            return _replica_error(first)

        def sse_events(chunk_list: list[dict], *, last: bool) -> str:
            text = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunk_list)
            return text + "data: [DONE]\n\n" if last else text

        async def sse():
            # the first item may carry the first text with the version (the replica sends them together)
            head = [*(opening(first) if opening else ()), *(chunks(first, first) if "delta" in first else ())]
            if first.get("finish_reason") is not None:  # the whole answer came in the first item
                _drain(events)  # before the last message: a client gone at once must not cut the replica's stream
                yield sse_events(head, last=True)
                return
            sent = 0  # messages sent: what the client has of the answer if the stream breaks
            if head:
                yield sse_events(head, last=False)
                sent += 1
            try:
                async for item in events:
                    if "error" in item:
                        yield sse_events([{"error": item["error"]}], last=False)
                        continue
                    if item["finish_reason"] is not None:
                        # the replica counted the request before sending its last item: the response ends here,
                        # with [DONE] in the same message, instead of one more message after the replica's stream
                        # closes (read to its end in the background, started before a client gone can stop it)
                        _drain(events)
                        yield sse_events(chunks(item, first), last=True)
                        return
                    yield sse_events(chunks(item, first), last=False)
                    sent += 1
            except Exception as e:  # noqa: BLE001 - the status is sent: the client learns it from an error event
                gone = e if isinstance(e, _REPLICA_GONE) else getattr(e, "cause", None)  # a task error wrapping it
                if isinstance(gone, _REPLICA_GONE):
                    logger.warning("the replica %s went away mid-stream after %d message(s): %s",
                                   first.get("replica_id"), sent, type(gone).__name__)
                    yield sse_events([_stream_error(
                        f"the model replica serving this stream went away ({type(gone).__name__}) after {sent} "
                        "message(s); the answer is incomplete: send the request again")], last=True)
                    return
                incident = uuid.uuid4().hex[:8]
                logger.error("a stream failed (incident %s): %r", incident, e, exc_info=e)
                yield sse_events([_stream_error(f"internal error mid-stream (incident {incident}; the ingress log "
                                                "has the details); the answer is incomplete")], last=True)
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=_adapter_headers(first))
