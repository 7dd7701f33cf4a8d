"""A remote OpenAI-compatible engine (vLLM, TGI, llama.cpp server, Ollama) behind the same
backend interface as the in-process engine.

Setting: `{"kind": "openai", "url": "http://gpu-box:8000", "model": "...",
"apiKeyEnv": "CODEVISTA_API_KEY", "timeoutMs": 30000, "tokenizerPath": "DIR"}`.
The server above does not know which backend it has: it builds the same prompts (with the
tokenizer at `tokenizerPath`, default the embedded model's, which names the FIM family and
counts the budget) and reads the same stream of text deltas. Prompts go as text to
`/v1/completions` with `stream: true` (server-sent events), with the sampling parameters
pinned (temperature, top_p, and no repeat penalty, which some servers apply by default).

Three more routes, by what the server is and what the setting says:
- llama.cpp's own server (`llama-server`, recognised by its `/props`): completions go to
  `/infill` with the prefix and suffix as text and `cache_prompt`, so the server keeps the
  KV cache of the previous keystroke's prompt (setting `infill`: "auto" (default), true, false);
- `chat: true` (an instruct model): translation goes to `/v1/chat/completions` as messages;
- `visionModel: NAME`: images go to `/v1/chat/completions` as `image_url` data URLs, to the
  served vision-language model NAME (which may be the same as `model`).

Cancelling closes the HTTP stream. Connection failures are retried a bounded number of
times with backoff, but never once the server has started answering. The API key is read
from the environment variable the setting names and is never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from codevista.models.engine import GenerationResult, SamplingParams
from codevista.models.errors import ModelError
from codevista.models.loader import DEFAULT_MODEL_DIR
from codevista.models.tokenizer import Tokenizer

from .prompts import Family, detect_family

log = logging.getLogger(__name__)
RETRIES = 3


class RemoteError(ModelError):
    """The remote server failed, refused, or is not there."""


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 30.0
    tokenizer_path: str | None = None
    max_positions: int = 4096
    chat: bool = False
    infill: str = "auto"  # "auto" | "on" | "off"
    vision_model: str | None = None

    @classmethod
    def from_setting(cls, raw: object) -> RemoteConfig:
        if not isinstance(raw, dict) or raw.get("kind") != "openai":
            raise ValueError('expected {"kind": "openai", "url": ..., "model": ...}')
        url, model = raw.get("url"), raw.get("model")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError("url must be an http(s) URL")
        if not isinstance(model, str) or not model:
            raise ValueError("model must name the served model")
        env = raw.get("apiKeyEnv")
        timeout = raw.get("timeoutMs", 30000)
        if env is not None and not isinstance(env, str):
            raise ValueError("apiKeyEnv must be the name of an environment variable")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError("timeoutMs must be a positive number")
        tok = raw.get("tokenizerPath")
        ctx = raw.get("contextTokens", 4096)
        if isinstance(ctx, bool) or not isinstance(ctx, int) or not 64 <= ctx <= 1 << 20:
            raise ValueError("contextTokens must be an integer from 64 to 1048576")
        chat = raw.get("chat", False)
        if not isinstance(chat, bool):
            raise ValueError("chat must be true or false")
        infill = raw.get("infill", "auto")
        if infill not in ("auto", True, False):
            raise ValueError('infill must be "auto", true or false')
        vision = raw.get("visionModel")
        if vision is not None and (not isinstance(vision, str) or not vision):
            raise ValueError("visionModel must name the served vision-language model")
        return cls(url.rstrip("/"), model, env, float(timeout) / 1000,
                   tok if isinstance(tok, str) else None, ctx, chat,
                   {True: "on", False: "off"}.get(infill, "auto"), vision)


def _completion_delta(event: dict) -> tuple[str, str | None]:
    choice = (event.get("choices") or [{}])[0]
    return choice.get("text") or "", choice.get("finish_reason")


def _chat_delta(event: dict) -> tuple[str, str | None]:
    choice = (event.get("choices") or [{}])[0]
    delta = choice.get("delta") or {}
    return delta.get("content") or "", choice.get("finish_reason")


def _infill_delta(event: dict) -> tuple[str, str | None]:
    """llama-server's native stream: {"content": ..., "stop": bool, "stop_type": ...}."""
    reason = None
    if event.get("stop"):
        reason = "length" if event.get("stop_type") == "limit" else "stop"
    return event.get("content") or "", reason


PARSERS = {"/v1/completions": _completion_delta, "/v1/chat/completions": _chat_delta,
           "/infill": _infill_delta}


class RemoteGeneration:
    """One streamed answer; the same surface as the engine's RequestHandle."""

    def __init__(self, backend: OpenAIBackend, endpoint: str, body: dict,
                 prompt_tokens: int, vision: bool = False) -> None:
        self.backend = backend
        self.vision = vision
        self.endpoint = endpoint
        self.body = body
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.text = ""
        self.finish_reason = "stop"
        self.error: ModelError | None = None
        self.t0 = time.monotonic()
        self.ttft: float | None = None
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        b = self.backend
        url = f"{b.cfg.url}{self.endpoint}"
        try:
            for attempt in range(RETRIES):
                try:
                    async with b.client.stream("POST", url, json=self.body,
                                               headers=b.headers()) as resp:
                        if resp.status_code != 200:
                            raise b.http_error(resp.status_code, (await resp.aread())
                                               .decode("utf-8", "replace"), self.vision)
                        await self._read(resp)
                        return
                except b.httpx.ConnectError as e:  # nothing was answered: safe to retry
                    if attempt == RETRIES - 1:
                        raise RemoteError(f"the server at {b.cfg.url} is down or unreachable "
                                          f"({type(e).__name__})") from e
                    await asyncio.sleep(0.2 * 2 ** attempt)
        except asyncio.CancelledError:
            self.finish_reason = "cancelled"
        except RemoteError as e:
            self.error, self.finish_reason = e, "error"
        except b.httpx.TimeoutException as e:
            self.error = RemoteError(f"the server at {b.cfg.url} timed out ({e})")
            self.finish_reason = "error"
        except b.httpx.HTTPError as e:
            self.error = RemoteError(f"the stream from {b.cfg.url} broke: "
                                     f"{type(e).__name__}")
            self.finish_reason = "error"
        finally:
            self.queue.put_nowait(None)

    async def _read(self, resp) -> None:
        parse = PARSERS[self.endpoint]
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            if "error" in event:  # some servers report a failure inside the stream
                err = event["error"]
                msg = err.get("message") if isinstance(err, dict) else err
                raise RemoteError(f"the server at {self.backend.cfg.url} failed: {msg}")
            delta, reason = parse(event)
            if delta:
                if self.ttft is None:
                    self.ttft = time.monotonic() - self.t0
                self.text += delta
                self.queue.put_nowait(delta)
            usage = event.get("usage") or {}
            timings = event.get("timings") or {}
            if "tokens_cached" in event or "cache_n" in timings:
                self.cached_tokens = int(timings.get("cache_n", event.get("tokens_cached", 0)))
            if isinstance(usage, dict) and usage.get("prompt_tokens"):
                self.prompt_tokens = int(usage["prompt_tokens"])
            if reason:
                self.finish_reason = "length" if reason == "length" else "stop"
                if self.endpoint == "/infill":
                    break  # llama-server ends its native stream without [DONE]

    async def astream(self) -> AsyncIterator[str]:
        while True:
            delta = await self.queue.get()
            if delta is None:
                return
            yield delta

    async def aresult(self) -> GenerationResult:
        try:
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            pass
        return GenerationResult(
            text=self.text, token_ids=[], finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
            ttft_s=self.ttft,
            total_s=time.monotonic() - self.t0, error=self.error)

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()  # closes the HTTP stream


class OpenAIBackend:
    """Backend interface over an OpenAI-compatible HTTP server."""

    supports_healing = False  # the remote samples freely: no constrained first token

    def __init__(self, cfg: RemoteConfig) -> None:
        self.cfg = cfg
        self.state = "idle"
        self.error: str | None = None
        self.model_name = cfg.model
        self.tokenizer: Tokenizer | None = None
        self.family: Family | None = None
        self.chat_template = None
        self.loaded = None
        self.client = None
        self.stop_texts: tuple[str, ...] = ()
        self.infill = False  # completions through llama-server's /infill
        import httpx

        self.httpx = httpx

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    def headers(self) -> dict[str, str]:
        env = self.cfg.api_key_env
        key = os.environ.get(env) if env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def http_error(self, status: int, body: str, vision: bool = False) -> RemoteError:
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:  # a server (or proxy) that echoes the request must not put it in our logs
            body = body.replace(key, "<api key>")
        if status in (401, 403):
            env = self.cfg.api_key_env
            return RemoteError(f"the server at {self.cfg.url} refused the API key (HTTP "
                               f"{status}); check the key in ${env}" if env else
                               f"the server at {self.cfg.url} needs an API key (HTTP "
                               f"{status}): set apiKeyEnv")
        low = body.lower()
        if vision and (
                "image" in low or "multimodal" in low or "vision" in low):
            return RemoteError(f"the server at {self.cfg.url} does not accept images for "
                               f"model {self.cfg.vision_model!r} (HTTP {status}): serve a "
                               f"vision-language model with its projector (e.g. llama-server "
                               f"--mmproj, vLLM with a LLaVA/Qwen2-VL checkpoint)")
        if status == 404 or "model" in low and status == 400:
            return RemoteError(f"the server at {self.cfg.url} does not serve model "
                               f"{self.cfg.model!r} (HTTP {status})")
        return RemoteError(f"the server at {self.cfg.url} answered HTTP {status}: "
                           f"{body[:200]}")

    async def load(self, model_path: str | None, dtype: str,
                   report: Callable[[str], None]) -> None:
        self.close()
        self.state, self.error = "loading", None
        report(f"connecting to {self.cfg.url}")
        try:
            tok_dir = Path(self.cfg.tokenizer_path).expanduser() if self.cfg.tokenizer_path \
                else DEFAULT_MODEL_DIR
            self.tokenizer = Tokenizer.from_dir(tok_dir)
            self.family = detect_family(self.tokenizer)
            self.stop_texts = self.family.stop_tokens
            timeout = self.httpx.Timeout(self.cfg.timeout_s, connect=min(5.0, self.cfg.timeout_s))
            self.client = self.httpx.AsyncClient(timeout=timeout)
            await self._check_model()
            self.infill = self.cfg.infill == "on" or (
                self.cfg.infill == "auto" and self.family.name != "plain"
                and await self._is_llama_server())
        except (ModelError, OSError, ValueError) as e:
            self.state, self.error = "error", str(e)
            log.error("remote backend: %s", e)
            return
        self.state = "ready"
        log.info("remote backend %s ready (model %s, family %s%s)", self.cfg.url,
                 self.cfg.model, self.family.name, ", /infill" if self.infill else "")

    async def _check_model(self) -> None:
        assert self.client is not None
        try:
            resp = await self.client.get(f"{self.cfg.url}/v1/models", headers=self.headers())
        except self.httpx.HTTPError as e:
            raise RemoteError(f"the server at {self.cfg.url} is down or unreachable "
                              f"({type(e).__name__})") from e
        if resp.status_code != 200:
            raise self.http_error(resp.status_code, resp.text)
        served = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]
        if served and self.cfg.model not in served:
            raise RemoteError(f"the server at {self.cfg.url} serves {', '.join(served)}, not "
                              f"{self.cfg.model!r}")

    async def _is_llama_server(self) -> bool:
        """llama.cpp's server answers GET /props with its generation settings."""
        assert self.client is not None
        try:
            resp = await self.client.get(f"{self.cfg.url}/props", headers=self.headers())
            return resp.status_code == 200 and "default_generation_settings" in resp.json()
        except (self.httpx.HTTPError, ValueError):
            return False

    def _sampling(self, params: SamplingParams) -> dict:
        p = params
        body = {"max_tokens": p.max_new_tokens, "temperature": p.temperature,
                "top_p": p.top_p, "repeat_penalty": 1.0, "frequency_penalty": 0.0,
                "presence_penalty": 0.0, "stream": True}
        stops = list(p.stop) + list(self.stop_texts)
        if stops:
            body["stop"] = stops[:4]  # the OpenAI API takes at most four
        if p.seed is not None:
            body["seed"] = p.seed
        return body

    def _ready(self) -> None:
        if self.state != "ready" or self.tokenizer is None or self.client is None:
            raise RemoteError("the remote backend is not connected")

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RemoteGeneration:
        self._ready()
        assert self.tokenizer is not None
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        body = {"model": self.cfg.model, "prompt": prompt, **self._sampling(params)}
        return RemoteGeneration(self, "/v1/completions", body, len(prompt_ids))

    def submit_infill(self, prefix: str, suffix: str, params: SamplingParams,
                      prompt_tokens: int = 0) -> RemoteGeneration:
        """llama-server's /infill: it adds the model's own FIM tokens; `cache_prompt`
        keeps the previous request's KV for the shared prefix."""
        self._ready()
        body = self._sampling(params)
        body = {"model": self.cfg.model, "input_prefix": prefix, "input_suffix": suffix,
                "prompt": "", "n_predict": body.pop("max_tokens"), "cache_prompt": True,
                **body}
        return RemoteGeneration(self, "/infill", body, prompt_tokens)

    def submit_chat(self, messages: list[dict], params: SamplingParams,
                    prompt_tokens: int = 0, vision: bool = False) -> RemoteGeneration:
        """/v1/chat/completions; the server applies the model's own chat template."""
        self._ready()
        model = self.cfg.vision_model if vision and self.cfg.vision_model else self.cfg.model
        body = self._sampling(params)
        body.pop("stop", None)
        if params.stop:
            body["stop"] = list(params.stop)[:4]
        return RemoteGeneration(self, "/v1/chat/completions",
                                {"model": model, "messages": messages, **body}, prompt_tokens,
                                vision=vision)

    def stop_ids(self, stop_tokens: tuple[str, ...]) -> tuple[int, ...]:
        return ()  # stops travel as text (`stop`), the remote knows its own end token

    def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            try:
                asyncio.get_running_loop().create_task(client.aclose())
            except RuntimeError:
                pass
        self.state = "idle"
