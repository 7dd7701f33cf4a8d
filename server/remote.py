"""A remote OpenAI-compatible engine (vLLM, TGI, llama.cpp server, Ollama) behind the same
backend interface as the in-process engine.

Setting: `{"kind": "openai", "url": "http://gpu-box:8000", "model": "...",
"apiKeyEnv": "CODEVISTA_API_KEY", "timeoutMs": 30000, "tokenizerPath": "DIR"}`.
The server above does not know which backend it has: it builds the same prompts (with the
tokenizer at `tokenizerPath`, default the embedded model's, which names the FIM family and
counts the budget) and reads the same stream of text deltas. Prompts go as text to
`/v1/completions` with `stream: true` (server-sent events), with the sampling parameters
pinned (temperature, top_p, and no repeat penalty, which some servers apply by default).

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
        return cls(url.rstrip("/"), model, env, float(timeout) / 1000,
                   tok if isinstance(tok, str) else None, int(ctx))


class RemoteGeneration:
    """One streamed completion; the same surface as the engine's RequestHandle."""

    def __init__(self, backend: OpenAIBackend, prompt: str, params: SamplingParams,
                 prompt_tokens: int) -> None:
        self.backend = backend
        self.prompt = prompt
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.text = ""
        self.finish_reason = "stop"
        self.error: ModelError | None = None
        self.t0 = time.monotonic()
        self.ttft: float | None = None
        self.task = asyncio.ensure_future(self._run())

    def _body(self) -> dict:
        p = self.params
        body = {"model": self.backend.cfg.model, "prompt": self.prompt, "stream": True,
                "max_tokens": p.max_new_tokens, "temperature": p.temperature,
                "top_p": p.top_p, "repeat_penalty": 1.0, "frequency_penalty": 0.0,
                "presence_penalty": 0.0}
        stops = list(p.stop) + list(self.backend.stop_texts)
        if stops:
            body["stop"] = stops[:4]  # the OpenAI API takes at most four
        if p.seed is not None:
            body["seed"] = p.seed
        return body

    async def _run(self) -> None:
        b = self.backend
        try:
            for attempt in range(RETRIES):
                try:
                    async with b.client.stream("POST", f"{b.cfg.url}/v1/completions",
                                               json=self._body(),
                                               headers=b.headers()) as resp:
                        if resp.status_code != 200:
                            raise b.http_error(resp.status_code, (await resp.aread())
                                               .decode("utf-8", "replace"))
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
            choice = (event.get("choices") or [{}])[0]
            delta = choice.get("text") or ""
            if delta:
                if self.ttft is None:
                    self.ttft = time.monotonic() - self.t0
                self.text += delta
                self.queue.put_nowait(delta)
            reason = choice.get("finish_reason")
            if reason:
                self.finish_reason = "length" if reason == "length" else "stop"

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
            prompt_tokens=self.prompt_tokens, cached_tokens=0, ttft_s=self.ttft,
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
        import httpx

        self.httpx = httpx

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    def headers(self) -> dict[str, str]:
        env = self.cfg.api_key_env
        key = os.environ.get(env) if env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def http_error(self, status: int, body: str) -> RemoteError:
        if status in (401, 403):
            env = self.cfg.api_key_env
            return RemoteError(f"the server at {self.cfg.url} refused the API key (HTTP "
                               f"{status}); check the key in ${env}" if env else
                               f"the server at {self.cfg.url} needs an API key (HTTP "
                               f"{status}): set apiKeyEnv")
        if status == 404 or "model" in body.lower() and status == 400:
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
        except (ModelError, OSError, ValueError) as e:
            self.state, self.error = "error", str(e)
            log.error("remote backend: %s", e)
            return
        self.state = "ready"
        log.info("remote backend %s ready (model %s, family %s)", self.cfg.url,
                 self.cfg.model, self.family.name)

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

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RemoteGeneration:
        if self.state != "ready" or self.tokenizer is None or self.client is None:
            raise RemoteError("the remote backend is not connected")
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        return RemoteGeneration(self, prompt, params, len(prompt_ids))

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
