"""The engine: one thread owns the model and runs every request.

Callers `submit()` a prompt and get a RequestHandle immediately. The engine thread
admits requests into prefix-cache slots, then works in turns: each turn is one forward
pass in which every decoding request advances one step (batched: the weights are read
once for all of them) and one prefilling request runs one chunk, so a short completion
that arrives during a long translation gets its first token after at most one chunk
of the other's work, not after it ends. Cancellation and deadlines are checked before
every turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, EngineStoppedError, ModelError, RequestError
from ..kv_cache import KVCache
from ..loader import LoadedModel
from ..quant import Int8Linear, set_kernel_threads
from ..sampling import greedy, sample
from ..stopping import StopStringMatcher
from ..tokenizer import IncrementalDetokenizer
from ..transformer import KERNEL_ROWS, ROWS, Linear, Segment
from ..vision.image import content_key
from .lookup import DraftPolicy, NgramIndex
from .prefix_cache import PrefixCache, Slot
from .request import GenerationResult, Request, RequestHandle, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class _Guide:
    """The guidance prompt's sequence of a request with classifier-free guidance: its own
    cache slot, fed the same sampled tokens as the request."""

    owner: _Active
    slot: Slot
    prompt: list[int]
    pos: int
    last: torch.Tensor | None = None  # logits after the latest token fed

    @property
    def prefilled(self) -> bool:
        return self.pos >= len(self.prompt)


@dataclass
class _Active:
    """Engine-side state of one admitted request."""

    handle: RequestHandle
    slot: Slot
    cached: int  # prompt tokens reused from the prefix cache
    pos: int  # next position to compute (= len(slot.tokens))
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet fed through the model
    required: str = ""  # text the output must still begin with (token healing)
    first_token_at: float | None = None
    text: list[str] = field(default_factory=list)
    lookup: NgramIndex | None = None  # prompt lookup (greedy requests only)
    draft_len: int = 4
    drafted: int = 0
    accepted: int = 0
    guide: _Guide | None = None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values)

    @property
    def request(self) -> Request:
        return self.handle.request


def _keep_only(row: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`row` with every logit but those of `ids` at -inf; `row` itself when that would
    leave nothing to sample (no ids, or none with a finite logit): never a dead end."""
    if ids.numel() == 0:
        return row
    masked = torch.full_like(row, float("-inf"))
    masked[ids] = row[ids]
    return masked if bool(torch.isfinite(masked).any()) else row


def _owner(st: _Active | _Guide) -> _Active:
    return st.owner if isinstance(st, _Guide) else st


SMALL_MODEL_BYTES = 64 << 20


def uses_kernel(model: torch.nn.Module) -> bool:
    """Whether products of few rows run in our C kernel (int8 weights, or float32 in the
    row layout), which brings its own threads."""
    return any(isinstance(m, Int8Linear) or (isinstance(m, Linear) and m.blocks == ROWS)
               for m in model.modules())


def auto_threads(model: torch.nn.Module) -> int:
    """Intra-op threads for the engine thread's decode steps. Products of few rows that
    run in our C kernel (int8 weights, float32 weights in the row layout) use every core:
    its workers spin between products, so even the embedded 16 MB model gains from a
    second core (measured on this 2-core machine, 2026-11-29: float32 1 960 -> 2 900
    tokens/s, int8 4 450 -> 4 790). Elsewhere torch runs them, and a small model's
    matrices are too small for a second thread to pay for its synchronisation (the
    embedded model: 2.45 ms/token on one thread against 5.66 ms on two); a model big
    enough to be bound by memory bandwidth uses every core."""
    if uses_kernel(model):
        return torch.get_num_threads()
    # Weights are parameters, or buffers when quantized (int8 rows or their packed uint8
    # tiles, and their scales).
    size = sum(t.numel() * t.element_size()
               for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()
               or t.dtype in (torch.int8, torch.uint8))
    return 1 if size < SMALL_MODEL_BYTES else torch.get_num_threads()


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    slots: int
    busy_slots: int
    cache_bytes: int
    cache_budget_bytes: int
    evictions: int
    completed: int
    drafted: int = 0  # prompt-lookup draft tokens verified
    accepted: int = 0  # ... of which greedy decoding agreed with
    turns: int = 0  # forward passes
    batched_turns: int = 0  # ... that carried more than one request


class Engine:
    def __init__(self, loaded: LoadedModel, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 prefill_chunk: int = 512, warmup: bool = False,
                 num_threads: int | None = None, lookup: bool = True,
                 max_batch: int = 8) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        cfg = loaded.config
        dtype = loaded.dtype
        device = self.model.device
        self.prefill_chunk = prefill_chunk
        self.warmup = warmup
        # Speculative decoding by prompt lookup for greedy requests (output unchanged).
        self.lookup = lookup
        self.max_batch = max_batch  # decoding requests batched into one forward pass
        self._drafted = self._accepted = 0
        self._policy = DraftPolicy()  # whether drafts pay here (measured costs)
        self._turns = self._batched = 0
        self.num_threads = num_threads or auto_threads(self.model)
        self.prefill_threads = num_threads or torch.get_num_threads()
        # Products of few rows run in our C kernel (int8 weights, or float32 in the row
        # layout): it brings its own threads, and torch's would compete with them.
        self._kernel = uses_kernel(self.model)
        self._threads_now = 0
        self.cache = PrefixCache(
            make_cache=lambda cap: KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                           cap, dtype, device),
            bytes_per_token=cfg.kv_bytes_per_token(torch.finfo(dtype).bits // 8),
            budget_bytes=cache_bytes,
            max_positions=self.model.max_positions)
        self._cv = threading.Condition()
        self._inbox: deque[RequestHandle] = deque()
        self._waiting: deque[RequestHandle] = deque()
        self._active: deque[_Active] = deque()
        self._completed = 0
        self._stop = False
        self._healing_ids: dict[str, torch.Tensor] = {}
        self._features: dict[int, torch.Tensor] = {}  # image content key -> vectors (LRU)
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="codevista-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- public API ----------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               add_special_tokens: bool = True,
               images: Sequence[torch.Tensor] = ()) -> RequestHandle:
        """Queue a request; returns at once. `prompt` is text or token ids. With `images`
        (pixel values from the model's `vision.preprocess`), the prompt holds one image
        token per image, in order; each stands for all of that image's vectors."""
        if not self.running:
            raise EngineStoppedError("the engine is not running; call start()")
        params = params or SamplingParams()
        ids = (self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
               if isinstance(prompt, str) else list(prompt))
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        self._check_ids("prompt", ids)
        if params.token_range is not None and params.token_range[1] > vocab:
            raise RequestError(f"token_range {params.token_range} exceeds the vocabulary "
                               f"({vocab})")
        if params.logit_bias:
            self._check_ids("logit_bias", [i for i, _ in params.logit_bias])
        if params.guidance_prompt is not None:
            self._check_ids("guidance prompt", params.guidance_prompt)
            self._check_room("guidance prompt", len(params.guidance_prompt),
                             params.max_new_tokens)
        ids, keyed = self._expand_images(ids, list(images))
        self._check_room("prompt", len(ids), params.max_new_tokens)
        handle = RequestHandle(Request(ids, params, images=keyed), self._notify)
        with self._cv:
            self._inbox.append(handle)
            self._cv.notify()
        return handle

    def _check_ids(self, what: str, ids: Sequence[int]) -> None:
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"{what} token ids must be in [0, {vocab})")

    def _check_room(self, what: str, tokens: int, max_new_tokens: int) -> None:
        needed = tokens + max_new_tokens
        if needed > self.model.max_positions or not self.cache.fits_alone(needed):
            raise ContextLengthError(
                f"{what} ({tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context or the KV cache budget ({self.model.max_positions} "
                f"positions)")

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 timeout: float | None = None,
                 images: Sequence[torch.Tensor] = ()) -> GenerationResult:
        """Submit and wait: the blocking convenience used by scripts and tests."""
        return self.submit(prompt, params, images=images).result(timeout)

    def _expand_images(self, ids: list[int], images: list[torch.Tensor]
                       ) -> tuple[list[int], dict[int, torch.Tensor]]:
        """Each image token becomes tokens_per_image copies of the image's content key."""
        vision = self.loaded.vision
        if vision is None:
            if images:
                raise RequestError("this model has no vision tower; it cannot read images")
            return ids, {}
        marks = sum(t == vision.image_token_id for t in ids)
        if marks != len(images):
            raise RequestError(f"the prompt has {marks} image tokens for {len(images)} "
                               "images")
        if not images:
            return ids, {}
        keyed: dict[int, torch.Tensor] = {}
        out: list[int] = []
        pending = iter(images)
        for t in ids:
            if t != vision.image_token_id:
                out.append(t)
                continue
            pixels = next(pending)
            key = content_key(pixels)
            keyed[key] = pixels
            out.extend([key] * vision.tokens_per_image)
        return out, keyed

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(
                waiting=len(self._inbox) + len(self._waiting), running=len(self._active),
                slots=len(self.cache.slots), busy_slots=sum(s.busy for s in self.cache.slots),
                cache_bytes=self.cache.used_bytes, cache_budget_bytes=self.cache.budget_bytes,
                evictions=self.cache.evictions, completed=self._completed,
                drafted=self._drafted, accepted=self._accepted, turns=self._turns,
                batched_turns=self._batched)

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            torch.set_grad_enabled(False)
            # Thread-pool settings are per calling thread in OpenMP: set them here, in the
            # one thread that runs the model.
            torch.set_num_threads(self.num_threads)
            self._threads_now = self.num_threads
            if self._kernel:
                set_kernel_threads(self.num_threads)
            if self.warmup:
                self._warmup()
            while True:
                with self._cv:
                    while (not self._stop and not self._inbox and not self._active
                           and not self._waiting):
                        self._cv.wait()
                    if self._stop:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                self._admit()
                if not self._active:
                    with self._cv:  # waiting for cache room that running requests hold
                        if not self._inbox and not self._stop:
                            self._cv.wait(0.05)
                    continue
                self._turn()
        finally:
            self._fail_all(EngineStoppedError("the engine stopped"))

    def _warmup(self) -> None:
        """One full prefill chunk and a decode step, so the first real request does not pay
        for first-touch memory and kernel set-up (several seconds on a 0.5B model)."""
        t0 = time.monotonic()
        n = min(self.prefill_chunk, self.model.max_positions - 1)
        cfg = self.loaded.config
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, n + 1,
                        self.model.dtype, self.model.device)
        ids = torch.arange(n, device=self.model.device) % cfg.vocab_size
        self.model(ids, cache, 0)
        self.model(ids[:1], cache, n)
        log.info("engine warm-up took %.2f s", time.monotonic() - t0)

    def _admit(self) -> None:
        still: deque[RequestHandle] = deque()
        while self._waiting:
            handle = self._waiting.popleft()
            req = handle.request
            if req.cancelled.is_set():
                self._finish_unadmitted(handle, "cancelled")
                continue
            got = self.cache.acquire(req.prompt_ids,
                                     len(req.prompt_ids) + req.params.max_new_tokens)
            if got is None:
                still.append(handle)
                continue
            slot, cached = got
            p = req.params
            guide_got = guide_prompt = None
            if p.guidance_prompt is not None and p.guidance_scale != 1:
                guide_prompt = list(p.guidance_prompt)
                guide_got = self.cache.acquire(guide_prompt,
                                               len(guide_prompt) + p.max_new_tokens)
                if guide_got is None:
                    self.cache.release(slot)
                    still.append(handle)
                    continue
            stop_ids = (frozenset() if p.ignore_eos else
                        frozenset(p.stop_token_ids) if p.stop_token_ids is not None
                        else self.loaded.stop_token_ids)
            gen = None
            if p.temperature > 0:
                gen = torch.Generator()
                gen.manual_seed(p.seed if p.seed is not None else req.id)
            self._active.append(_Active(
                handle=handle, slot=slot, cached=cached, pos=cached,
                detok=IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens),
                stops=StopStringMatcher(list(p.stop)), stop_ids=stop_ids, generator=gen,
                required=p.required_prefix))
            if guide_got is not None and guide_prompt is not None:
                st = self._active[-1]
                st.guide = _Guide(owner=st, slot=guide_got[0], prompt=guide_prompt,
                                  pos=guide_got[1])
        self._waiting = still

    def _turn(self) -> None:
        """One engine turn, one forward pass: every decoding request advances (its pending
        token, and a prompt-lookup draft if it has one) and one prefilling request runs
        one chunk. Batching reads the weights once for all of them, so a completion that
        arrives during a translation neither waits for it nor slows it much."""
        now = time.monotonic()
        started = time.perf_counter()
        for st in list(self._active):
            req = st.request
            if req.cancelled.is_set():
                self._finish(st, "cancelled")
            elif req.deadline is not None and now >= req.deadline:
                self._finish(st, "deadline")
        work: list[tuple[_Active | _Guide, list[int], list[int] | None]] = []
        prefill = None
        for st in self._active:
            prompt = st.request.prompt_ids
            guide = st.guide
            if st.pos < len(prompt) or (guide is not None and not guide.prefilled):
                if prefill is None:
                    if guide is not None and not guide.prefilled:  # the guide's prompt first
                        end = min(len(guide.prompt), guide.pos + self.prefill_chunk)
                        prefill = (guide, guide.prompt[guide.pos:end], None)
                    else:
                        end = min(len(prompt), st.pos + self.prefill_chunk)
                        prefill = (st, prompt[st.pos:end], None)
            elif len(work) < self.max_batch:
                assert st.pending is not None
                draft = self._draft(st)
                work.append((st, [st.pending, *draft], draft))
                if guide is not None:
                    work.append((guide, [st.pending], None))
        if prefill is not None:
            work.append(prefill)
        if not work:
            return
        self._turns += 1
        self._batched += len(work) > 1
        for st, _, _ in work:  # served this turn: to the back of the queue
            if isinstance(st, _Active):
                self._active.remove(st)
                self._active.append(st)
        try:
            outputs = self._forward_many(work)
        except Exception:
            if len(work) == 1:
                outputs = [None]
                self._fail(_owner(work[0][0]))
            else:  # find the request that breaks the batch; the others go on
                outputs = []
                for item in work:
                    try:
                        outputs.extend(self._forward_many([item]))
                    except Exception:
                        outputs.append(None)
                        self._fail(_owner(item[0]))
        for (st, _, _), logits in zip(work, outputs, strict=True):
            if isinstance(st, _Guide):  # first, so that its owner below can use it
                st.last = None if logits is None else logits[-1]
        for (st, _, draft), logits in zip(work, outputs, strict=True):
            if (logits is None or isinstance(st, _Guide)
                    or not any(a is st for a in self._active)
                    or st.pos < len(st.request.prompt_ids)
                    or (st.guide is not None and not st.guide.prefilled)):
                continue  # failed, a guide, or more prefill chunks to go
            try:
                if draft:
                    self._verify(st, logits, draft)
                else:
                    self._accept(st, self._sample(st, self._guided(st, logits[-1])))
            except ModelError as e:
                self._finish(st, "error", e)
            except Exception as e:  # a bug: report it, keep serving others
                log.exception("request %d failed", st.request.id)
                self._finish(st, "error", ModelError(f"generation failed: {e}"))
        if len(work) == 1 and work[0][2] is not None and outputs[0] is not None:
            # one request's decode step, with or without a draft: what drafting costs
            self._policy.record_turn(len(work[0][1]), time.perf_counter() - started)

    def _guided(self, st: _Active, row: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: the guide's logits moved `scale` times the way from
        them to the request's (scale 1 is the request's own logits)."""
        if st.guide is None:
            return row
        base = st.guide.last
        if base is None:
            raise ModelError("the guidance sequence produced no logits")
        return base + st.request.params.guidance_scale * (row - base)

    def _fail(self, st: _Active) -> None:
        import sys

        e = sys.exc_info()[1]
        if isinstance(e, ModelError):
            return self._finish(st, "error", e)
        log.exception("request %d failed", st.request.id)
        self._finish(st, "error", ModelError(f"generation failed: {e}"))

    def _sample(self, st: _Active, row: torch.Tensor) -> int:
        p = st.request.params
        if p.logit_bias:
            if st.bias is None:  # once per request, not per token
                st.bias = (torch.tensor([i for i, _ in p.logit_bias], device=row.device),
                           torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype,
                                        device=row.device))
            row = row.index_add(0, st.bias[0], st.bias[1])
        if st.required:
            row = self._constrain(row, st.required)
        if p.constraint is not None:
            allowed = p.constraint.allowed(st.generated)
            if allowed:
                row = _keep_only(row, torch.tensor(
                    [i for i in allowed if 0 <= i < row.shape[0]], dtype=torch.long,
                    device=row.device))
        start = 0
        if p.token_range is not None:
            start = p.token_range[0]
            row = row[start:p.token_range[1]]
        return start + sample(row, p.temperature, p.top_k, p.top_p, st.generator)

    def _draft(self, st: _Active) -> list[int]:
        p = st.request.params
        if (not self.lookup or p.temperature > 0 or st.required or p.token_range is not None
                or st.guide is not None or p.logit_bias or p.constraint is not None):
            return []  # drafts are verified against the unrestricted argmax
        cap = min(st.draft_len, p.max_new_tokens - len(st.generated) - 1)
        limit = self._policy.limit(cap)  # none where drafts do not pay here
        if limit <= 0:
            return []
        if st.lookup is None:  # built when first wanted: the prompt, then the output
            st.lookup = NgramIndex(st.request.prompt_ids + st.generated)
        return st.lookup.draft(limit)

    def _verify(self, st: _Active, logits: torch.Tensor, draft: list[int]) -> None:
        """The pending token and the draft went through in one pass: keep the draft's
        longest prefix that greedy decoding agrees with, then the model's own next token.
        The keys and values of rejected draft tokens are dropped (their positions are
        overwritten later)."""
        best = greedy(logits)
        n = 0
        while n < len(draft) and draft[n] == best[n]:
            n += 1
        keep = st.pos - (len(draft) - n)
        del st.slot.tokens[keep:]
        st.pos = keep
        st.drafted += len(draft)
        st.accepted += n
        self._policy.judged(len(draft), n)
        self._drafted += len(draft)
        self._accepted += n
        # cheap drafts when they keep hitting, short ones when they miss
        st.draft_len = min(8, st.draft_len * 2) if n == len(draft) else \
            max(2, st.draft_len // 2) if n == 0 else st.draft_len
        for token in [*draft[:n], best[n]]:
            self._accept(st, token)
            if not any(a is st for a in self._active):
                return  # finished (stop token, stop string or length)

    def _image_features(self, key: int, pixels: torch.Tensor) -> torch.Tensor:
        feats = self._features.pop(key, None)
        if feats is None:
            vision = self.loaded.vision
            feats = vision.encode(pixels).to(self.model.dtype)
            while len(self._features) >= 4:
                self._features.pop(next(iter(self._features)))
        self._features[key] = feats  # most recently used last
        return feats

    def _embeds(self, st: _Active, tokens: list[int]) -> torch.Tensor:
        """Input vectors for a chunk holding image positions: token embeddings, with each
        image position replaced by its row of the image's projected features."""
        prompt = st.request.prompt_ids
        ids = torch.tensor([max(t, 0) for t in tokens], dtype=torch.long,
                           device=self.model.device)
        x = self.model.embed_tokens(ids).clone()
        for k, t in enumerate(tokens):
            if t >= 0:
                continue
            p = st.pos + k
            start = p
            while start > 0 and prompt[start - 1] == t:
                start -= 1
            x[k] = self._image_features(t, st.request.images[t])[p - start]
        return x

    def _forward_many(self, work: list[tuple[_Active | _Guide, list[int], list[int] | None]]
                      ) -> list[torch.Tensor]:
        # Prefill chunks are matrix products big enough for every core; a small model's
        # decode steps are not (see auto_threads).
        total = sum(len(tokens) for _, tokens, _ in work)
        threads = self.num_threads if total <= 32 else self.prefill_threads
        if self._kernel and total <= KERNEL_ROWS:
            threads = 1  # torch's share of a decode step; the kernel uses every core
        if threads != self._threads_now:
            torch.set_num_threads(threads)
            self._threads_now = threads
        segs = []
        for st, tokens, draft in work:
            ids = torch.tensor([max(t, 0) for t in tokens], dtype=torch.long,
                               device=self.model.device)
            embeds = (self._embeds(st, tokens) if isinstance(st, _Active)
                      and any(t < 0 for t in tokens) else None)
            segs.append(Segment(ids, st.slot.cache, st.pos, embeds, all_logits=bool(draft)))
        try:
            logits = self.model.forward_many(segs)
        except BaseException:
            # K/V may be half written: the slots' content is no longer trustworthy.
            for st, _, _ in work:
                st.slot.tokens = st.slot.tokens[:st.pos]
            raise
        for st, tokens, _ in work:
            st.slot.tokens.extend(tokens)
            st.pos += len(tokens)
        return logits

    def _constrain(self, row: torch.Tensor, required: str) -> torch.Tensor:
        """Only tokens consistent with the text the output must begin with."""
        allowed = self._healing_ids.get(required)
        if allowed is None:
            ids = self.tokenizer.ids_consistent_with(required)
            allowed = torch.tensor([i for i in ids if i < row.shape[0]], dtype=torch.long)
            if len(self._healing_ids) > 256:
                self._healing_ids.clear()
            self._healing_ids[required] = allowed
        return _keep_only(row, allowed)

    def _accept(self, st: _Active, token: int) -> None:
        if st.first_token_at is None:
            st.first_token_at = time.monotonic()
        if st.required:
            text = self.tokenizer.token_texts()[token] or ""
            st.required = st.required[len(text):] if st.required.startswith(text) else ""
        if token in st.stop_ids:
            return self._finish(st, "stop")
        st.generated.append(token)
        if st.lookup is not None:
            st.lookup.append(token)
        st.handle.tokens_generated = len(st.generated)
        st.pending = token
        shown = st.stops.feed(st.detok.push(token))
        if shown:
            st.text.append(shown)
            st.handle._push(shown)
        if st.stops.stopped:
            return self._finish(st, "stop")
        if len(st.generated) >= st.request.params.max_new_tokens:
            return self._finish(st, "length")

    def _finish(self, st: _Active, reason: str, error: ModelError | None = None) -> None:
        if not st.stops.stopped:
            rest = st.stops.feed(st.detok.flush())
            rest += "" if st.stops.stopped else st.stops.flush()
            if rest:
                st.text.append(rest)
                st.handle._push(rest)
        self._active.remove(st)
        self.cache.release(st.slot)
        if st.guide is not None:
            self.cache.release(st.guide.slot)
        self._completed += 1
        req = st.request
        now = time.monotonic()
        result = GenerationResult(
            text="".join(st.text), token_ids=list(st.generated), finish_reason=reason,
            prompt_tokens=len(req.prompt_ids), cached_tokens=st.cached,
            ttft_s=None if st.first_token_at is None else st.first_token_at - req.submitted,
            total_s=now - req.submitted, error=error)
        log.debug("request %d: %s, %d prompt (%d cached), %d generated", req.id, reason,
                  result.prompt_tokens, st.cached, result.generated_tokens)
        st.handle._finish(result)

    def _finish_unadmitted(self, handle: RequestHandle, reason: str,
                           error: ModelError | None = None) -> None:
        req = handle.request
        self._completed += 1
        handle._finish(GenerationResult(
            text="", token_ids=[], finish_reason=reason, prompt_tokens=len(req.prompt_ids),
            cached_tokens=0, ttft_s=None, total_s=time.monotonic() - req.submitted,
            error=error))

    def _fail_all(self, error: ModelError) -> None:
        for st in list(self._active):
            self._finish(st, "error", error)
        with self._cv:
            pending = list(self._waiting) + list(self._inbox)
            self._waiting.clear()
            self._inbox.clear()
        for handle in pending:
            self._finish_unadmitted(handle, "error", error)
