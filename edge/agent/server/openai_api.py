"""OpenAI-compatible routes: ``/v1/models``, ``/v1/embeddings``, ``/v1/chat/completions``.

Embeddings go through the model's dynamic batcher; chat completions through its fair
scheduler, streamed as server-sent events when asked. A model is named by its bundle name, or
``name@version`` for one version. Errors answer OpenAI's shape (see :mod:`.errors`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from edge.agent.server.context import Context, check_text, parse_json, read_body
from edge.agent.server.registry import ServedModel
from edge.errors import RequestError
from edge.protocol.enums import ModelKind, Task

if TYPE_CHECKING:
    from edge.agent.server.batching import DynamicBatcher
    from edge.agent.server.scheduler import Scheduler, Ticket


# ---------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # Clients send fields this server does not use (user, metadata, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore", frozen=True)


class EmbeddingsRequest(_Body):
    """Body of ``POST /v1/embeddings``."""

    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class TextPart(_Body):
    """One text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        """Return the message text (parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    """``stream_options`` of a streamed completion."""

    include_usage: bool = False


class ChatRequest(_Body):
    """Body of ``POST /v1/chat/completions``."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None

    def stops(self) -> list[str]:
        """Return the stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _validate(model: type[BaseModel], data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise RequestError(f"{what} must be a JSON object")
    check_text(data, what)  # texts go to the tokenizer, which needs valid Unicode
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise RequestError(f"invalid {what}: {details}") from None


def _resolve(ctx: Context, ref: str) -> ServedModel:
    name, _, version = ref.partition("@")
    return ctx.registry.resolve(name, version or None)


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status, media_type="application/json")


# ---------------------------------------------------------------------------- helpers per model
def _batcher(ctx: Context, served: ServedModel) -> "DynamicBatcher":
    if served.batcher is None:
        from edge.agent.server.batching import DynamicBatcher

        encoder = served.model
        max_batch = ctx.config.batch_max_size

        def embed_rows(texts: list[str]) -> list[tuple[Any, int]]:
            # The encoder sorts the batch by length and runs it in runs of at most max_batch; the
            # token counts come from the same tokenization.
            vectors, counts = encoder.embed_counted(texts, batch_size=max_batch)
            return list(zip(vectors, counts))

        m = ctx.metrics
        served.batcher = DynamicBatcher(
            embed_rows, max_batch=max_batch, max_wait_s=ctx.config.batch_max_wait_s,
            max_queue=ctx.config.batch_max_queue, name=served.name,
            on_batch=m.batch_size.labels(served.name, served.version).observe,
            on_depth=m.queue_depth.labels(served.name, served.version).set,
        )
    return served.batcher


def _scheduler(ctx: Context, served: ServedModel) -> "Scheduler":
    if served.scheduler is None:
        from edge.agent.server.scheduler import Scheduler

        m = ctx.metrics
        served.scheduler = Scheduler(
            served.model.generate, max_active=ctx.config.llm_max_active, max_queue=ctx.config.llm_max_queue,
            name=served.name, on_depth=m.queue_depth.labels(served.name, served.version).set,
            on_active=m.active.labels(served.name, served.version).set,
        )
    return served.scheduler


async def _watch_disconnect(request: Request, ticket: "Ticket") -> None:
    """Cancel the generation when the client goes away (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.cancel()
            return


class _Usage:
    """Token counts and timing of one generation, reported to the metrics at the end."""

    def __init__(self, ctx: Context, served: ServedModel, prompt_tokens: int, started: float) -> None:
        self.ctx, self.served, self.started = ctx, served, started
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.first: float | None = None
        self.last: float | None = None

    def token(self, event: Any) -> None:
        now = time.perf_counter()
        m, s = self.ctx.metrics, self.served
        if getattr(event, "token_id", None) is None:
            return
        self.completion_tokens += 1
        if self.first is None:
            self.first = now
            m.ttft.labels(s.name, s.version).observe(now - self.started)
        elif self.last is not None:
            m.itl.labels(s.name, s.version).observe(now - self.last)
        self.last = now

    def finish(self) -> None:
        m, s = self.ctx.metrics, self.served
        m.prompt_tokens.labels(s.name, s.version).inc(self.prompt_tokens)
        m.generation_tokens.labels(s.name, s.version).inc(self.completion_tokens)
        if self.first is not None and self.last is not None and self.completion_tokens > 1:
            m.tokens_per_s.labels(s.name, s.version).observe((self.completion_tokens - 1) / max(self.last - self.first, 1e-9))

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _finish_reason(reason: str | None) -> str:
    # "cancelled" only happens once the client left; OpenAI knows "stop" and "length".
    return reason if reason in ("stop", "length") else "stop"


# ---------------------------------------------------------------------------- routes
def routes(ctx: Context) -> list[Route]:
    """Return the OpenAI-compatible routes bound to one server context."""
    registry, metrics, config = ctx.registry, ctx.metrics, ctx.config

    def model_card(s: ServedModel) -> dict[str, Any]:
        return {"id": s.name, "object": "model", "created": s.created, "owned_by": "edge",
                "version": s.version, "task": s.manifest.task.value}

    async def list_models(request: Request) -> Response:
        cards = [model_card(s) for s in sorted(registry.served(), key=lambda s: (s.name, s.version))]
        return _json({"object": "list", "data": cards})

    async def get_model(request: Request) -> Response:
        return _json(model_card(_resolve(ctx, request.path_params["model"])))

    async def embeddings(request: Request) -> Response:
        started = time.perf_counter()
        served = None
        name = ""
        try:
            body = await read_body(request, config.max_body_bytes)
            req: EmbeddingsRequest = _validate(EmbeddingsRequest, parse_json(body), "embeddings request")
            name = req.model.partition("@")[0]
            served = _resolve(ctx, req.model)
            if served.manifest.task is not Task.FEATURE_EXTRACTION:
                raise RequestError(f"model {served.name} is a {served.manifest.task.value} model; "
                                   f"/v1/embeddings needs a feature-extraction (embedding) model")
            texts = [req.input] if isinstance(req.input, str) else req.input
            if not texts:
                raise RequestError("input is empty; send a string or a non-empty list of strings")
            if not all(isinstance(t, str) for t in texts):
                raise RequestError("input must be text: token-id arrays are not supported")
            if len(texts) > config.embeddings_max_inputs:
                raise RequestError(f"input has {len(texts)} items, the limit is {config.embeddings_max_inputs}")
            rows = await _batcher(ctx, served).submit(texts)
            dim = int(rows[0][0].shape[-1])
            if req.dimensions is not None and req.dimensions != dim:
                raise RequestError(f"model {served.name} makes {dim}-dimensional embeddings; "
                                   f"dimensions={req.dimensions} is not supported")
            data = []
            for i, (vector, _) in enumerate(rows):
                if req.encoding_format == "base64":
                    emb: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode()
                else:
                    emb = vector.tolist()
                data.append({"object": "embedding", "index": i, "embedding": emb})
            tokens = int(sum(count for _, count in rows))
            result = {"object": "list", "data": data, "model": served.name,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        except Exception as exc:
            ctx.fail("embeddings", name, served, exc)
            raise
        metrics.observe_success(metrics.timer(served.name, served.version, "embeddings"), time.perf_counter() - started)
        return _json(result)

    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        served = None
        name = ""
        try:
            body = await read_body(request, config.max_body_bytes)
            req: ChatRequest = _validate(ChatRequest, parse_json(body), "chat completion request")
            name = req.model.partition("@")[0]
            served = _resolve(ctx, req.model)
            if served.kind is not ModelKind.LLM:
                raise RequestError(f"model {served.name} is a {served.manifest.task.value} model; "
                                   f"/v1/chat/completions needs a text-generation model")
            if req.n != 1:
                raise RequestError("n must be 1: this server returns one choice per request")
            if req.logprobs:
                raise RequestError("logprobs are not supported")
            if req.tools:
                raise RequestError("tools are not supported")
            stops = req.stops()
            if len(stops) > 4 or any(not s for s in stops):
                raise RequestError("stop takes at most 4 non-empty strings")
            llm = served.model
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
            prompt_ids = await asyncio.to_thread(_prompt_ids, llm, messages)
            limit = int(llm.max_context)
            wanted = req.max_completion_tokens or req.max_tokens
            if len(prompt_ids) >= limit:
                raise RequestError(f"the prompt is {len(prompt_ids)} tokens; this model's context is {limit} "
                                   f"tokens, so it must be shorter")
            if wanted is not None and len(prompt_ids) + wanted > limit:
                raise RequestError(f"this model's maximum context length is {limit} tokens, but {len(prompt_ids)} "
                                   f"prompt tokens plus max_tokens={wanted} need {len(prompt_ids) + wanted}; "
                                   f"shorten the messages or lower max_tokens")
            from edge.runtime.generator import GenerationParams

            params = GenerationParams(
                max_tokens=wanted or (limit - len(prompt_ids)),
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed, stop=stops,
            )
            ticket = _scheduler(ctx, served).submit(prompt_ids, params)
        except Exception as exc:
            ctx.fail("chat", name, served, exc)
            raise
        usage = _Usage(ctx, served, len(prompt_ids), started)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _stream(ctx, served, ticket, usage, cid, created, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, ticket))
        parts: list[str] = []
        reason = None
        try:
            while (event := await ticket.next_event()) is not None:
                usage.token(event)
                parts.append(event.text or "")
                reason = event.finish_reason or reason
        except BaseException as exc:
            ticket.cancel()
            if isinstance(exc, Exception):
                ctx.fail("chat", name, served, exc)
            raise
        finally:
            watcher.cancel()
        usage.finish()
        if ticket.is_cancelled():  # the client left; nobody reads this answer
            metrics.observe_failure(served.name, served.version, "chat", "client_disconnected")
            return Response(status_code=499)
        metrics.observe_success(metrics.timer(served.name, served.version, "chat"), time.perf_counter() - started)
        return _json({
            "id": cid, "object": "chat.completion", "created": created, "model": served.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "logprobs": None, "finish_reason": _finish_reason(reason)}],
            "usage": usage.as_dict(),
        })

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]


def _prompt_ids(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    try:
        text = llm.render_chat(messages, add_generation_prompt=True)
    except RequestError:
        raise
    except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
        raise RequestError(f"the model's chat template rejected these messages: {exc}") from exc
    return list(llm.encode(text))


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _stream(ctx: Context, served: ServedModel, ticket: "Ticket", usage: _Usage, cid: str,
                  created: int, include_usage: bool) -> AsyncIterator[bytes]:
    """Yield the completion as server-sent events; cancel the generation if the client leaves."""
    def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": served.name,
                               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            out["usage"] = None
        return out

    outcome = ""
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}, None))
        reason = None
        while True:
            try:
                event = await ticket.next_event()
            except Exception as exc:  # the model failed or was unloaded mid-stream
                from edge.agent.server.errors import http_status
                from edge.errors import EdgeError

                outcome = "failed"
                ctx.fail("chat", served.name, served, exc)
                code = exc.code if isinstance(exc, EdgeError) else "internal_error"
                status = http_status(exc) if isinstance(exc, EdgeError) else 500
                yield _sse({"error": {"message": str(exc), "type": "server_error" if status >= 500 else
                                      "invalid_request_error", "param": None, "code": code}})
                return
            if event is None:
                break
            usage.token(event)
            reason = event.finish_reason or reason
            if event.text:
                yield _sse(chunk({"content": event.text}, None))
        yield _sse(chunk({}, _finish_reason(reason)))
        if include_usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                        "choices": [], "usage": usage.as_dict()})
        yield b"data: [DONE]\n\n"
        outcome = "ok"
    finally:
        ticket.cancel()  # no-op when finished; stops the generation when the client went away
        usage.finish()
        m = ctx.metrics
        if outcome == "ok":
            m.observe_success(m.timer(served.name, served.version, "chat"), time.perf_counter() - usage.started)
        elif not outcome:  # the client went away mid-stream
            m.observe_failure(served.name, served.version, "chat", "client_disconnected")
