"""``kvtier serve``: an OpenAI-compatible HTTP server over one engine.

uvicorn runs a FastAPI (Starlette) app on an asyncio loop; one engine thread owns the ``LLMEngine``,
which is not thread-safe. Handlers hand requests and aborts to that thread through a queue; it
steps while there is work and otherwise blocks on the queue, and after every step posts the outputs
back to the event loop in one ``call_soon_threadsafe``. Each request's mailbox keeps only the newest
output: outputs are cumulative, so a slow client gets bigger deltas, never a backlog. A client that
goes away has its request aborted at once, which frees its KV blocks before the next step.

FastAPI, uvicorn and pydantic are imported when the server is built, not with this module, so
``kvtier --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kvtier.entrypoints.options import engine_config, engine_options
from kvtier.errors import ConfigError, KvtierError, ModelLoadError
from kvtier.utils.units import parse_bytes

if TYPE_CHECKING:
    from kvtier.engine.llm_engine import LLMEngine
    from kvtier.engine.outputs import RequestOutput
    from kvtier.entrypoints.metrics import ServerMetrics
    from kvtier.entrypoints.openai_protocol import ReplyContext, SamplingRequest
    from kvtier.sampling_params import SamplingParams

log = logging.getLogger("kvtier.serve")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServerError(Exception):
    """The engine failed while running a request (a bug, not the user's input): HTTP 500."""


# ---- engine loop --------------------------------------------------------------------------------

@dataclass(slots=True)
class Submission:
    request_id: str
    params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None  # chat: the template is applied on the engine thread
    add_generation_prompt: bool = True
    check_room: bool = False  # max_tokens was asked for: prompt + max_tokens must fit the context
    arrival: float = field(default_factory=time.perf_counter)  # when the HTTP request came in: TTFT counts from here


@dataclass(slots=True)
class Abort:
    request_id: str


_STOP = object()


class Mailbox:
    """The newest output of one request (outputs are cumulative: older ones can be dropped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.accepted: asyncio.Future = loop.create_future()
        self.latest: RequestOutput | None = None
        self.error: Exception | None = None
        self.event = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        self.latest = out
        self.event.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.event.set()
        if not self.accepted.done():
            self.accepted.set_exception(error)

    async def next(self) -> RequestOutput:
        await self.event.wait()
        self.event.clear()
        if self.error is not None:
            raise self.error
        assert self.latest is not None
        return self.latest


class EngineLoop:
    """Owns the engine on one thread; the event loop reaches it only through the inbox."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics):
        self.engine = engine
        engine.incremental_text = True
        self.metrics = metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.mailboxes: dict[str, Mailbox] = {}  # touched on the event loop only
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    # ---- event-loop side ----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.thread is None, "the engine loop runs once"
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="kvtier-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread is not None:
            self.inbox.put(_STOP)
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def submit(self, sub: Submission) -> Mailbox:
        """Queue a request; returns once the engine took it, raises its RequestError if it did not."""
        if not self.alive:
            raise ServerError("the engine loop is not running")
        box = Mailbox(self.loop)
        self.mailboxes[sub.request_id] = box
        self.inbox.put(sub)
        try:
            await box.accepted
        except BaseException:
            self.abort(sub.request_id)
            raise
        return box

    def abort(self, request_id: str) -> None:
        """Cancel a request (a no-op once it finished); its KV blocks are free before the next step."""
        if self.mailboxes.pop(request_id, None) is not None:
            self.inbox.put(Abort(request_id))

    def _deliver(self, acks: list, outs: list[RequestOutput], failures: list) -> None:
        for rid, error in acks:
            box = self.mailboxes.get(rid)
            if box is None or box.accepted.done():
                continue
            if error is None:
                box.accepted.set_result(None)
            else:
                del self.mailboxes[rid]
                box.accepted.set_exception(error)
        for out in outs:
            box = self.mailboxes.get(out.request_id)
            if box is not None:
                box.put(out)
                if out.finished:
                    del self.mailboxes[out.request_id]
        for rid, error in failures:
            box = self.mailboxes.pop(rid, None)
            if box is not None:
                box.fail(error)

    def _fail_all(self, error: Exception) -> None:
        self._deliver([], [], [(rid, error) for rid in list(self.mailboxes)])

    def _post(self, acks: list, outs: list, failures: list) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver, acks, outs, failures)
        except RuntimeError:  # the event loop closed during shutdown
            pass

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException:
            log.exception("the engine loop died")
            self.loop.call_soon_threadsafe(self._fail_all, ServerError("the engine loop died"))
            raise

    def _drain(self, block: bool) -> bool:
        """Take in new requests and aborts; False when asked to stop."""
        items = [self.inbox.get()] if block else []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        acks = []
        for item in items:
            if item is _STOP:
                return False
            if isinstance(item, Abort):
                self._abort(item.request_id)
            else:
                acks.append((item.request_id, self._add(item)))
        if items:
            self.metrics.on_idle(self.engine)
        if acks:
            self._post(acks, [], [])
        return True

    def _add(self, sub: Submission) -> Exception | None:
        try:
            ids = self._prompt_ids(sub)
            if sub.check_room:
                _check_room(len(ids), sub.params.max_tokens, self.engine.max_model_len)
            self.engine.add_request(sub.request_id, sub.prompt, sub.params, ids, arrival_time=sub.arrival)
        except KvtierError as e:
            return e
        except Exception as e:
            log.exception("could not queue request %s", sub.request_id)
            return ServerError(f"could not queue the request: {e}")
        return None

    def _prompt_ids(self, sub: Submission) -> list[int]:
        if sub.messages is None:
            return self.engine.encode_prompt(sub.prompt, sub.prompt_token_ids)
        from kvtier.errors import RequestError

        tok = self.engine.tokenizer
        if tok is None:
            raise RequestError("this model has no tokenizer, so no chat template", "use /v1/completions")
        try:
            ids = tok.apply_chat_template(sub.messages, sub.add_generation_prompt)
        except KvtierError:
            raise
        except Exception as e:  # jinja raises its own errors for messages a template refuses
            raise RequestError(f"the chat template refused the messages: {str(e).splitlines()[0]}",
                               "check the roles and their order") from e
        return self.engine.encode_prompt(None, ids)

    def _abort(self, request_id: str) -> None:
        if request_id in self.engine.requests:
            self.engine.abort_request(request_id)
            self.metrics.on_abort(request_id)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:
            log.exception("an engine step failed; failing the requests in flight")
            error = ServerError(f"the engine failed: {e}")
            rids = list(self.engine.requests)
            for rid in rids:
                self._abort(rid)
            self._post([], [], [(rid, error) for rid in rids])
            return
        self.metrics.on_step(self.engine, outs)
        if outs:
            self._post([], outs, [])


def _check_room(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    from kvtier.entrypoints.openai_protocol import APIRequestError

    if prompt_tokens + max_tokens > max_model_len:
        raise APIRequestError(
            f"this model's context is {max_model_len} tokens, but the request asks for {prompt_tokens} prompt "
            f"tokens and max_tokens {max_tokens}", "lower max_tokens or shorten the prompt",
            param="max_tokens", code="context_length_exceeded")


# ---- HTTP side ----------------------------------------------------------------------------------

@dataclass(slots=True)
class ServeSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 4096

    def __post_init__(self):
        if not self.served_model_names or not all(self.served_model_names):
            raise ConfigError("served model names must be non-empty", "pass --served-model-name NAME")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"--max-request-bytes {self.max_request_bytes} is too small", "allow at least 1KiB")
        if self.max_tokens_limit < 1:
            raise ConfigError(f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}")


def served_names(model: str) -> list[str]:
    """Names clients may put in 'model': what --model says, plus the model's file or folder name."""
    names = [model]
    if model == "default":
        from kvtier.models.loader import default_model_gguf

        try:
            names.append(default_model_gguf().stem)
        except ModelLoadError:
            pass
    elif Path(model).exists():
        path = Path(model)
        names.append(path.stem if path.is_file() else path.name)
    return list(dict.fromkeys(names))


class OpenAIServer:
    """The routes and error handlers of the app, around one engine loop."""

    def __init__(self, engine: LLMEngine, settings: ServeSettings):
        from kvtier.entrypoints.metrics import ServerMetrics

        self.settings = settings
        self.metrics = ServerMetrics()
        self.metrics.on_idle(engine)  # before the engine thread exists
        self.engine_loop = EngineLoop(engine, self.metrics)
        self.root = engine.config.model
        self.max_model_len = engine.max_model_len

    @asynccontextmanager
    async def lifespan(self, app):
        self.engine_loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            self.engine_loop.stop()

    def routes(self) -> list[tuple[str, object, list[str]]]:
        return [("/health", self.health, ["GET"]), ("/metrics", self.metrics_text, ["GET"]),
                ("/v1/models", self.models, ["GET"]), ("/v1/completions", self.completions, ["POST"]),
                ("/v1/chat/completions", self.chat_completions, ["POST"])]

    async def health(self, request):
        from starlette.responses import Response

        return Response(status_code=200 if self.engine_loop.alive else 503)

    async def metrics_text(self, request):
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request):
        from kvtier.entrypoints.openai_protocol import ModelCard, ModelList

        cards = [ModelCard(id=n, root=self.root, max_model_len=self.max_model_len)
                 for n in self.settings.served_model_names]
        return _json_response(ModelList(data=cards))

    async def completions(self, request):
        from kvtier.entrypoints.openai_protocol import CompletionRequest

        req = await _parse(request, CompletionRequest)
        prompt, ids = req.single_prompt()
        return await self._serve(request, req, "cmpl", False, prompt=prompt, prompt_token_ids=ids)

    async def chat_completions(self, request):
        from kvtier.entrypoints.openai_protocol import ChatCompletionRequest

        req = await _parse(request, ChatCompletionRequest)
        messages = [m.as_template_input() for m in req.messages]
        return await self._serve(request, req, "chatcmpl", True, messages=messages,
                                 add_generation_prompt=req.add_generation_prompt)

    async def _serve(self, request, req: SamplingRequest, prefix: str, chat: bool, **prompt):
        from kvtier.entrypoints.openai_protocol import ReplyContext

        ctx = ReplyContext(f"{prefix}-{uuid.uuid4().hex}", self._model_name(req.model), req.n, req.include_usage())
        req.check_supported()
        max_tokens, explicit = self._max_tokens(req)
        sub = Submission(ctx.id, req.sampling_params(max_tokens), check_room=explicit, **prompt)
        box = await self.engine_loop.submit(sub)
        if req.stream:
            return _event_stream(_sse(_events(box, ctx, _hold_back(sub.params), chat)),
                                 on_close=lambda: self.engine_loop.abort(ctx.id))
        try:
            out = await _until_disconnect(request, _final(box))
        finally:
            self.engine_loop.abort(ctx.id)
        return _reply(ctx, out, chat)

    def _model_name(self, asked: str | None) -> str:
        from kvtier.entrypoints.openai_protocol import APIRequestError

        names = self.settings.served_model_names
        if asked is None:
            return names[0]
        if asked not in names:
            raise APIRequestError(f"the model `{asked}` does not exist", f"use one of: {', '.join(names)}",
                                  status=404, param="model", code="model_not_found")
        return asked

    def _max_tokens(self, req: SamplingRequest) -> tuple[int, bool]:
        """(max_tokens to run with, whether the client asked for it)."""
        from kvtier.entrypoints.openai_protocol import APIRequestError

        asked, limit = req.requested_max_tokens(), self.settings.max_tokens_limit
        if asked is None:
            return limit, False  # the engine also stops at the end of the context
        if asked > limit:
            raise APIRequestError(f"max_tokens {asked} is over this server's limit of {limit}",
                                  "ask for fewer tokens (the limit is kvtier serve --max-tokens-limit)",
                                  param="max_tokens")
        return asked, True

    def add_error_handlers(self, app) -> None:
        from starlette.exceptions import HTTPException

        from kvtier.entrypoints.openai_protocol import APIRequestError

        async def api(request, e):
            return self._error(e.status, str(e), e.type, e.param, e.code)

        async def user(request, e):
            return self._error(400, str(e))

        async def server(request, e):
            return self._error(500, str(e), "server_error")

        async def http(request, e):
            return self._error(e.status_code, str(e.detail))

        for exc, handler in ((APIRequestError, api), (KvtierError, user), (ServerError, server),
                             (HTTPException, http), (Exception, self._unexpected)):
            app.add_exception_handler(exc, handler)

    def _error(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None):
        from starlette.responses import JSONResponse

        from kvtier.entrypoints.openai_protocol import error_body

        self.metrics.on_http_error(status)
        return JSONResponse(error_body(message, type, param, code), status_code=status)

    async def _unexpected(self, request, exc: Exception):
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return self._error(500, f"internal error: {type(exc).__name__}", "server_error")


# ---- request and response helpers ---------------------------------------------------------------

async def _parse(request, cls):
    from pydantic import ValidationError

    body = await request.body()
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(e):
    from kvtier.entrypoints.openai_protocol import APIRequestError

    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return APIRequestError(f"the body is not valid JSON ({err['msg']})", "send one JSON object")
    loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
    if not loc:
        return APIRequestError(f"the body is not a request object ({err['msg']})", "send one JSON object")
    if err["type"] == "missing":
        return APIRequestError(f"'{loc[0]}' is required", param=loc[0])
    return APIRequestError(f"invalid '{'.'.join(loc)}': {err['msg']}", param=loc[0])


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union it tried ('str', 'list[int]'); users never see those."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


async def _final(box: Mailbox) -> RequestOutput:
    while True:
        out = await box.next()
        if out.finished:
            return out


async def _until_disconnect(request, work):
    """The result of ``work``, or None if the client hangs up first (then ``work`` is cancelled)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _reply(ctx: ReplyContext, out: RequestOutput | None, chat: bool):
    from starlette.responses import Response

    from kvtier.entrypoints.openai_protocol import chat_response, completion_response

    if out is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    return _json_response((chat_response if chat else completion_response)(ctx, out))


def _json_response(model):
    from starlette.responses import Response

    return Response(model.model_dump_json(), media_type="application/json")


def _hold_back(params: SamplingParams) -> int:
    """Characters held back while streaming, so a stop string is never partly sent."""
    return max((len(s) for s in params.stop), default=1) - 1


async def _pieces(box: Mailbox, n: int, hold: int) -> AsyncIterator[tuple[RequestOutput, list]]:
    """(output, [(index, new text, finish reason, stop reason)]) each time some choice moved."""
    sent, done = [0] * n, [False] * n
    while True:
        out = await box.next()
        pieces = []
        for c in out.outputs:
            if done[c.index]:
                continue
            end = len(c.text) if c.finish_reason else max(sent[c.index], len(c.text) - hold)
            assert end >= sent[c.index], "streamed text must only grow"
            text, sent[c.index], done[c.index] = c.text[sent[c.index]:end], end, c.finish_reason is not None
            if text or c.finish_reason:
                pieces.append((c.index, text, c.finish_reason, c.stop_reason))
        if pieces:
            yield out, pieces
        if out.finished:
            return


async def _events(box: Mailbox, ctx: ReplyContext, hold: int, chat: bool):
    from kvtier.entrypoints import openai_protocol as proto

    if chat:
        yield proto.chat_role_chunk(ctx)
    last = None
    async for out, pieces in _pieces(box, ctx.n, hold):
        last = out
        yield (proto.chat_chunk if chat else proto.completion_chunk)(ctx, pieces)
    if ctx.include_usage and last is not None:
        yield proto.usage_chunk(ctx, last, chat)


async def _sse(chunks) -> AsyncIterator[str]:
    from kvtier.entrypoints.openai_protocol import error_body

    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except ServerError as e:
        yield f"data: {json.dumps(error_body(str(e), 'server_error', code=500))}\n\n"
    yield "data: [DONE]\n\n"


def _event_stream(events, on_close):
    from starlette.responses import StreamingResponse

    return _Closing(StreamingResponse(events, media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}), on_close)


class _Closing:
    """An ASGI response that calls ``on_close`` however it ends: done, client gone, or failed."""

    def __init__(self, response, on_close):
        self.response, self.on_close = response, on_close

    async def __call__(self, scope, receive, send):
        try:
            await self.response(scope, receive, send)
        finally:
            self.on_close()


class Guard:
    """ASGI middleware: the API key on /v1/*, then the body size cap, before the app parses anything."""

    def __init__(self, app, api_key: str | None, max_bytes: int, metrics: ServerMetrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["path"].startswith("/v1") and \
                not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await self._reject(send, 401, "missing or wrong API key",
                                      "send the header 'Authorization: Bearer <key given to --api-key>'",
                                      "invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._too_large(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body, more = body + message.get("body", b""), message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(send)
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, send):
        return await self._reject(send, 413, f"the request body is over the server's limit of {self.max_bytes} "
                                  "bytes", "send a smaller request (the limit is kvtier serve --max-request-bytes)",
                                  "request_too_large")

    async def _reject(self, send, status: int, problem: str, fix: str, code: str):
        from kvtier.entrypoints.openai_protocol import error_body

        self.metrics.on_http_error(status)
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        data = json.dumps(error_body(f"{problem}; {fix}", kind, None, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then passes through (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def build_app(engine: LLMEngine, settings: ServeSettings):
    """The ASGI app; the engine loop starts and stops with the app's lifespan."""
    from fastapi import FastAPI

    server = OpenAIServer(engine, settings)
    app = FastAPI(title="kvtier", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    for path, endpoint, methods in server.routes():
        app.add_route(path, endpoint, methods=methods)
    server.add_error_handlers(app)
    app.add_middleware(Guard, api_key=settings.api_key, max_bytes=settings.max_request_bytes,
                       metrics=server.metrics)
    app.state.server = server
    return app


# ---- command ------------------------------------------------------------------------------------

@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; anything but loopback exposes the server (use --api-key)")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--served-model-name", "served_model_names", multiple=True,
              help="name clients put in 'model' (repeatable; default: --model and the model's file name)")
@click.option("--api-key", envvar="KVTIER_API_KEY", default=None,
              help="require 'Authorization: Bearer KEY' on /v1/* (or set $KVTIER_API_KEY)")
@click.option("--max-request-bytes", default="1MiB", show_default=True, help="larger request bodies get 413")
@click.option("--max-tokens-limit", type=int, default=4096, show_default=True,
              help="largest max_tokens a request may ask for (also the default when it asks for none)")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--no-access-log", is_flag=True, help="do not log one line per request")
@engine_options
def serve(host, port, served_model_names, api_key, max_request_bytes, max_tokens_limit, log_level, no_access_log,
          **kw):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    import uvicorn

    from kvtier.engine.llm_engine import LLMEngine

    config = engine_config(kw, fast=True)
    settings = ServeSettings(list(served_model_names) or served_names(config.model), api_key,
                             parse_bytes(max_request_bytes, "--max-request-bytes"), max_tokens_limit)
    engine = LLMEngine(config)
    app = build_app(engine, settings)
    if host not in LOOPBACK_HOSTS and api_key is None:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    click.echo(f"kvtier serve: model {config.model} as {', '.join(settings.served_model_names)}; "
               f"context {engine.max_model_len} tokens, {engine.pool.num_blocks} KV blocks", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=not no_access_log,
                timeout_graceful_shutdown=5)
