"""The models one worker serves, each in its current version, and the swap to a new version
without a failed request.

Each model has its own pipeline (card, preprocessing, TTA policies, precision, batcher queues,
admission costs); the worker's decode threads, model threads and admission are shared
(:class:`sota_serve.serving.pipeline.Pools`). A request holds its model's version while it runs
(:meth:`Models.use`): a new version is loaded and warmed up (every batch shape it will see) off
the event loop while the old one serves, then takes the new requests, and the old one is closed
once its last request has left. A version that fails to load, to verify or to fit the memory
bound leaves the serving one in place, and the index says why.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sota_serve.errors import ModelLoadError, ModelNotFoundError, SotaServeError
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import ModelPackage, read_card
from sota_serve.package.repository import Entry, is_repository, model_folder, scan
from sota_serve.serving.admission import Admission, ModelCost
from sota_serve.serving.batcher import BatchObserver
from sota_serve.serving.pipeline import Pipeline, Pools, TTAObserver
from sota_serve.serving.settings import Plan, Settings
from sota_serve.tta import CROPS_PER_IMAGE

log = logging.getLogger("sota_serve.models")

#: (model, version, resident bytes): a version's memory, 0 once it is closed
MemoryObserver = Callable[[str, str, int], None]
#: (the entry, its costs in admission) -> its pipeline, loaded and warmed up: blocking, run on
#: a thread (the front end's: it knows the settings, the plan, the shared threads, its metrics)
Build = Callable[[Entry, ModelCost], Pipeline]

#: what the runtime keeps per input pixel of its largest warm-up batch (activations in its
#: arenas), on top of the weights, for the estimate before a model is loaded. Measured on a CPU
#: (bench/results/repository.json): xresnet50 at 224 px, warmed up to 80 crops (ten-crop, 8
#: images), grew the worker by 1,114 MiB for a 98 MiB model.onnx, 265 bytes per input pixel;
#: the demo (64 px, its int8 file) by 34-55 MiB, where this estimates about 140. Deeper or
#: wider nets may need more: the check after the load holds them to the bound.
ACTIVATION_BYTES_PER_PIXEL = 300


def rss_bytes() -> int:
    """This process's resident memory."""
    import psutil  # the front ends' extra (http) brings it; a library user of Models may lack it

    return int(psutil.Process().memory_info().rss)


@dataclass(eq=False)
class Loaded:
    """One version of a model, loaded: its pipeline, and the requests it is serving."""

    entry: Entry
    pipeline: Pipeline
    #: how much the worker's resident memory grew while it loaded
    rss_bytes: int
    in_flight: int = 0
    retired: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        return self.entry.version

    @property
    def card(self) -> ModelCard:
        return self.pipeline.card


class Models:
    def __init__(self, build: Build, admission: Admission, *, source: str, default: str | None = None,
                 memory_limit_bytes: int | None = None, explicit: bool = False,
                 on_memory: MemoryObserver | None = None, batch_sizes: tuple[int, int] = (32, 8),
                 resolve: Callable[[str], str] | None = None) -> None:
        """``source``: what SOTA_SERVE_MODEL names (a repository directory is scanned again on
        :meth:`load` and :meth:`poll`); ``default``: the model the plain routes answer (the
        first loaded when None); ``memory_limit_bytes``: the worker's resident memory above
        which a model is refused at load; ``explicit``: whether loading and unloading through
        the API is allowed (SOTA_SERVE_MODEL_CONTROL=explicit); ``on_memory``: told each
        version's memory when it is swapped in, and 0 when it is closed (the front end's metrics);
        ``batch_sizes``: images per plain and per TTA device call (the plan's), for the memory
        estimate; ``resolve``: a model-store tag to its directory (the front end's store)."""
        self.build, self.admission, self.source = build, admission, source
        self.default_name, self.memory_limit_bytes, self.explicit = default, memory_limit_bytes, explicit
        self.on_memory, self.batch_sizes, self.resolve = on_memory, batch_sizes, resolve
        self.current: dict[str, Loaded] = {}
        #: name -> why its last load failed (cleared by the next that succeeds)
        self.failed: dict[str, str] = {}
        self._loading: dict[str, asyncio.Task[Loaded]] = {}
        self._poll: asyncio.Task[None] | None = None
        self._lock = threading.Lock()

    @classmethod
    def serving(cls, settings: Settings, plan: Plan, admission: Admission, *, opener: Callable[[Entry], ModelPackage],
                observer: BatchObserver | None = None, on_tta: TTAObserver | None = None,
                on_memory: MemoryObserver | None = None, explicit: bool | None = None,
                resolve: Callable[[str], str] | None = None) -> Models:
        """A front end's models, as ``settings`` say, each built by :meth:`Pipeline.build` on the
        worker's shared threads from the package ``opener`` opens and checks (raising its typed
        error); ``explicit``: overrides SOTA_SERVE_MODEL_CONTROL; ``resolve``: as :class:`Models`."""
        pools = Pools.of(plan)

        def build(entry: Entry, cost: ModelCost) -> Pipeline:
            return Pipeline.build(opener(entry), settings, plan, admission, observer=observer, on_tta=on_tta,
                                  cost=cost, pools=pools)

        return cls(build, admission, source=settings.model, default=settings.default_model,
                   memory_limit_bytes=settings.memory_limit_bytes(plan), on_memory=on_memory,
                   batch_sizes=(plan.max_batch_size, plan.max_batch_size_tta), resolve=resolve,
                   explicit=settings.model_control == "explicit" if explicit is None else explicit)

    def __str__(self) -> str:
        """The models in service, for the logs: ``tiny-cnn:1`` (a model named by its card), or
        ``digits (tiny-cnn:2), wide (tiny-cnn:7)`` (named by its folder)."""
        return ", ".join(m.card.tag if m.name == m.card.name else f"{m.name} ({m.card.tag})"
                         for m in self.current.values())

    # --- lookups ---------------------------------------------------------------------------

    @property
    def default(self) -> Loaded:
        name = self.default_name or next(iter(self.current), None)
        if name is None or name not in self.current:
            raise ModelNotFoundError(f"no model {name!r} is loaded" if name else "no model is loaded")
        return self.current[name]

    def names(self) -> tuple[str, ...]:
        """The models in service, the default one first."""
        first = self.default.name if self.current else None
        return tuple(sorted(self.current, key=lambda n: n != first))

    def get(self, name: str | None = None, version: str | None = None) -> Loaded:
        """The serving version of ``name`` (None: the default model); raises ModelNotFoundError
        (404) naming what is served instead."""
        loaded = self.default if name is None else self.current.get(name)
        if loaded is None:
            served = ", ".join(repr(n) for n in self.names()) or "none"
            raise ModelNotFoundError(f"no model {name!r} here; this server serves {served}")
        if version is not None and version != loaded.version:
            raise ModelNotFoundError(f"model {loaded.name!r} has no version {version!r} in service;"
                                     f" version {loaded.version!r} is")
        return loaded

    @contextmanager
    def use(self, name: str | None = None, version: str | None = None) -> Iterator[Loaded]:
        """The serving version of a model, held for one request: a swap meanwhile sends new
        requests to the new version and closes this one once its requests have all left."""
        loaded = self.get(name, version)
        loaded.in_flight += 1
        try:
            yield loaded
        finally:
            loaded.in_flight -= 1
            if loaded.retired and loaded.in_flight == 0:
                self._close(loaded)

    # --- loading ---------------------------------------------------------------------------

    def load_all(self, entries: list[Entry]) -> None:
        """Load ``entries`` at start, in order, on this thread; raises the first one's error."""
        for entry in entries:
            self._swap_in(self._build(entry))

    async def load(self, name: str) -> Loaded:
        """Load the current version of ``name`` from the source (again, when it serves): off the
        event loop, warmed up, then swapped in. Raises ModelNotFoundError for a name the
        source lacks, ModelLoadError with the reason when it fails (the serving version, if
        any, stays)."""
        entry = self.find(name)
        running = self._loading.get(name)
        if running is not None:  # one load of a model at a time: a second request waits on the first
            return await asyncio.shield(running)
        task = asyncio.get_running_loop().create_task(self._load(entry))
        self._loading[name] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(name, None)
            else:
                task.add_done_callback(lambda _: self._loading.pop(name, None))

    async def _load(self, entry: Entry) -> Loaded:
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self._build, entry)
        except Exception as e:  # whatever the files do to the runtime, the version in service stays
            reason = str(e) if isinstance(e, SotaServeError) else f"{type(e).__name__}: {e}"
            self.failed[entry.name] = reason
            log.warning("model %s version %s not loaded, %s", entry.name, entry.version,
                        "the serving version stays" if entry.name in self.current else "nothing served under its name")
            raise ModelLoadError(f"model {entry.name!r} version {entry.version!r} not loaded: {reason}") from None
        self._swap_in(loaded)
        return loaded

    def _build(self, entry: Entry) -> Loaded:
        """On a thread: build the entry's pipeline, checking memory before and after."""
        self._check_room(entry)
        before = rss_bytes()
        cost = self.admission.model_cost(f"{entry.name}:{entry.version}")
        try:
            pipeline = self.build(entry, cost)
        except BaseException:
            self.admission.forget(cost)
            raise
        after = rss_bytes()
        loaded = Loaded(entry, pipeline, max(0, after - before))
        limit = self.memory_limit_bytes
        if limit is not None and after > limit:
            self._close(loaded)
            raise ModelLoadError(_memory_message(entry, after, limit, "after loading it"))
        return loaded

    def _check_room(self, entry: Entry) -> None:
        limit = self.memory_limit_bytes
        if limit is None:
            return
        need = rss_bytes() + self.expected_bytes(entry)
        if need > limit:
            raise ModelLoadError(_memory_message(entry, need, limit, "with it loaded"))

    def expected_bytes(self, entry: Entry) -> int:
        """About how much memory ``entry`` takes once loaded: its weights and the activations of
        its largest warm-up batch; for a new version of a model in service, at least what the
        version in service took (both are in memory until the swap)."""
        source = Path(entry.source)
        card = read_card(source)
        # the largest artifact: which one serves is chosen on loading (backend, precision); a
        # missing one is for opening the package to report
        weights = max((path.stat().st_size for a in card.artifacts.values() if (path := source / a.path).is_file()),
                      default=0) if source.is_dir() else source.stat().st_size
        k = max(CROPS_PER_IMAGE[p] for p in card.tta.policies())
        crops = max(self.batch_sizes[0], self.batch_sizes[1] * k)
        estimate = weights + ACTIVATION_BYTES_PER_PIXEL * crops * card.input.height * card.input.width
        serving = self.current.get(entry.name)
        return max(estimate, serving.rss_bytes) if serving is not None else estimate

    def _swap_in(self, loaded: Loaded) -> None:
        with self._lock:
            old = self.current.get(loaded.name)
            self.current[loaded.name] = loaded
            self.failed.pop(loaded.name, None)
        log.info("model %s version %s in service (%s, %.0f MiB)", loaded.name, loaded.version,
                 loaded.card.tag, loaded.rss_bytes / 2**20)
        if self.on_memory is not None:
            self.on_memory(loaded.name, loaded.version, loaded.rss_bytes)
        if old is not None:
            self._retire(old)

    def _retire(self, loaded: Loaded) -> None:
        loaded.retired = True
        if loaded.in_flight == 0:
            self._close(loaded)

    def _close(self, loaded: Loaded) -> None:
        loaded.pipeline.close()
        self.admission.forget(loaded.pipeline.cost)
        if self.on_memory is not None:
            self.on_memory(loaded.name, loaded.version, 0)
        log.info("model %s version %s unloaded", loaded.name, loaded.version)

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404, those in flight finish."""
        if name not in self.current:
            raise ModelNotFoundError(f"no model {name!r} is loaded")
        with self._lock:
            loaded = self.current.pop(name)
        if self.default_name == name:  # the plain routes move on to the first model left
            self.default_name = None
        self._retire(loaded)

    # --- the source ------------------------------------------------------------------------

    def find(self, name: str) -> Entry:
        """The entry of ``name`` in the source as it is on disk now."""
        root = Path(self.source)
        if is_repository(root):
            folder = root / name
            entry = model_folder(folder) if folder.is_dir() else None
        else:
            entry = next((e for e in scan(self.source, self.resolve) if e.name == name), None)
        if entry is None:
            raise ModelNotFoundError(f"no model {name!r} in {self.source}")
        return entry

    def changes(self) -> tuple[list[Entry], list[str]]:
        """(entries to load, names to unload) for the repository as it is on disk now: new
        models, new versions and versions replaced in place; models whose folder is gone."""
        root = Path(self.source)
        if not is_repository(root):
            return [], []
        on_disk = {e.name: e for e in scan_quietly(root)}
        to_load = [e for name, e in on_disk.items()
                   if name not in self.current
                   or (e.version, e.signature) != (self.current[name].version, self.current[name].entry.signature)]
        gone = [name for name in self.current if name not in on_disk]
        return to_load, gone

    def follow(self, every_s: float | None) -> None:
        """Start :meth:`poll` on the running event loop when ``every_s`` is set
        (SOTA_SERVE_MODEL_POLL_S); it runs as long as the loop."""
        if every_s is not None and self._poll is None:
            self._poll = asyncio.get_running_loop().create_task(self.poll(every_s))

    async def poll(self, every_s: float) -> None:
        """Follow the repository folder: load what changed, unload what is gone, every
        ``every_s`` seconds (SOTA_SERVE_MODEL_POLL_S). Failures are logged; the loop goes on."""
        failed_at: dict[str, tuple[str, int]] = {}
        while True:
            await asyncio.sleep(every_s)
            to_load, gone = self.changes()
            for entry in to_load:
                if failed_at.get(entry.name) == (entry.version, entry.signature):
                    continue  # the same files failed already: wait for new ones
                try:
                    await self.load(entry.name)
                    failed_at.pop(entry.name, None)
                except SotaServeError as e:
                    failed_at[entry.name] = (entry.version, entry.signature)
                    log.warning("%s", e)
            for name in gone:
                if len(self.current) > 1:  # the last model stays: an empty server serves nobody
                    await self.unload(name)

    def index(self) -> list[dict[str, Any]]:
        """The repository extension's index: every model the source holds and every loaded one,
        with its state (READY, UNAVAILABLE) and, for one that failed, the reason."""
        known: dict[str, dict[str, Any]] = {}
        root = Path(self.source)
        for entry in scan_quietly(root) if is_repository(root) else []:
            known[entry.name] = {"name": entry.name, "version": entry.version, "state": "UNAVAILABLE",
                                 "reason": "not loaded"}
        for name, reason in self.failed.items():
            known.setdefault(name, {"name": name, "version": ""}).update(state="UNAVAILABLE", reason=reason)
        for name, loaded in self.current.items():
            known[name] = {"name": name, "version": loaded.version, "state": "READY", "reason": ""}
        return list(known.values())


def scan_quietly(root: Path) -> list[Entry]:
    """The repository's entries, or none when it cannot be read now (a folder being renamed)."""
    try:
        return scan(str(root))
    except (OSError, SotaServeError) as e:
        log.warning("cannot read the model repository %s now: %s", root, e)
        return []


def _memory_message(entry: Entry, need: int, limit: int, when: str) -> str:
    return (f"model {entry.name!r} version {entry.version!r} does not fit: the worker would hold about"
            f" {need / 2**20:.0f} MiB {when}, above SOTA_SERVE_MEMORY_LIMIT_MB={limit / 2**20:.0f}; unload a model,"
            " or raise the bound where the machine has the memory")
