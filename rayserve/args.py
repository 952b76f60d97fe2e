"""The application's arguments (``serve run rayserve.app:app KEY=VALUE ...`` or a Serve config
file's ``args``): where the model is, how the model replicas and the ingress replicas in front
of them are placed and scaled, and any service setting by its field name (``device=cpu``, ``max_wait_s=5``: the ``SOTA_SERVE_*`` knobs of
sota_serve/serving/settings.py, without the prefix).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sota_serve.errors import SotaServeError
from sota_serve.serving.settings import Settings

log = logging.getLogger("ray.serve.sota_serve")

#: model replicas by default where the cluster holds them: with one, losing its node is an outage
DEFAULT_REPLICAS = 2
#: a node's resources by name ("CPU", "GPU", custom ones), as Ray reports them
Resources = Mapping[str, float]


class ArgsError(SotaServeError):
    """The application's arguments are wrong; the message names the argument."""


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: what SOTA_SERVE_MODEL takes (docs/models.md): a package directory at the same path on every
    #: node (or a list of them, or a repository directory), or a BentoML model-store tag present
    #: in each node's store (``sota-serve import``); each replica opens it, checking every
    #: artifact's sha256 against the card, and refuses to start on a mismatch
    model: str
    #: a fixed number of replicas; unset: autoscaling between min_replicas and max_replicas
    num_replicas: int | None = Field(default=None, ge=1)
    #: unset: two where the cluster holds them (and max_replicas allows), else one (:meth:`fit`)
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    #: ongoing requests per replica that autoscaling aims at; unset: the replica's work in
    #: hand (:meth:`target`)
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    #: CPUs Ray reserves per replica; the replica's decode and model threads are sized to it
    cpus_per_replica: float = Field(default=1.0, gt=0)
    #: GPUs per replica (1 on GPU nodes: a replica owns its device); 0 runs on the CPU
    gpus_per_replica: float = Field(default=0.0, ge=0)
    #: ingress replicas (the HTTP contract, forwarding to the model replicas): each is light,
    #: an event loop that parses requests and awaits the model replicas' answers
    ingress_replicas: int = Field(default=1, ge=1)
    #: CPUs Ray reserves per ingress replica
    cpus_per_ingress: float = Field(default=0.1, ge=0)
    #: custom Ray resources an ingress replica takes, to place it: one that only the head node
    #: declares (``ray start --head --resources '{"ingress": 100}'`` with ``{"ingress": 1}``
    #: here) keeps the ingress off the workers, so losing a worker loses no request's ingress
    #: (a request in flight on a lost ingress replica gets Ray's 500). Unset: anywhere.
    ingress_resources: dict[str, float] = Field(default_factory=dict)
    #: requests Ray sends to one model replica at a time; unset: twice its work in hand
    #: (:meth:`target`), so a batch runs while the next one fills. More wait in Ray's router
    #: at the ingress, bodies not yet sent, where max_queued_requests bounds them
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    #: requests each ingress replica's router holds for the model replicas when all of them
    #: have max_ongoing_requests; one more is answered 503 + Retry-After at once, before its
    #: body goes to a model replica. Unset: max_ongoing_requests (one more replica's worth)
    max_queued_requests: int | None = Field(default=None, ge=1)
    #: refuse a placement the cluster's nodes cannot hold (:func:`placement_problem`); false
    #: where nodes join after the application is deployed (KubeRay's workers, an autoscaler)
    check_placement: bool = True
    #: service settings by field name (Settings); these win over the nodes' SOTA_SERVE_* variables
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> AppArgs:
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self

    @classmethod
    def parse(cls, args: dict[str, Any]) -> AppArgs:
        """From the flat ``KEY=VALUE`` form (or a config file's mapping): keys that are not this model's fields are settings."""
        own = {k: v for k, v in args.items() if k in cls.model_fields}
        settings = {**own.pop("settings", {}), **{k: v for k, v in args.items() if k not in cls.model_fields}}
        unknown = sorted(set(settings) - set(Settings.model_fields) - {"model"})
        if unknown:
            raise ArgsError(f"unknown argument(s) {', '.join(unknown)}: give one of {', '.join(cls.model_fields)}"
                            f" or a service setting ({', '.join(sorted(Settings.model_fields))})")
        try:
            parsed = cls(**own, settings=settings)
            parsed.service_settings()  # refuse a bad setting here, not on every replica
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ArgsError(f"invalid application arguments: {problems}") from None
        return parsed

    def service_settings(self) -> Settings:
        return Settings(**self.replica_settings())

    def replica_settings(self) -> dict[str, Any]:
        """What the replica's settings are made from (the rest from its node's SOTA_SERVE_*
        variables): the given ones, the device from the GPUs it owns, and its threads sized
        to the CPUs Ray reserves for it rather than to the whole node."""
        cpus = max(1, int(self.cpus_per_replica))
        gpu = self.gpus_per_replica > 0
        sized: dict[str, Any] = {
            "device": "cuda" if gpu else "cpu",
            "workers": 1,  # Ray's replicas are the processes
            # as Settings.plan sizes them per core: two decode threads per core on a CPU, one
            # single-threaded model call per core; a GPU replica runs one call at a time
            "decode_threads": cpus if gpu else 2 * cpus,
            "model_threads": 1 if gpu else cpus,
            "threads": 1,
        }
        return {**sized, **self.settings, "model": self.model}

    def target(self) -> float:
        """Autoscaling's target of ongoing requests per replica (unless given): the requests a
        replica works on without queueing, those on its decode threads plus one full device
        batch per model thread. At that load its queue drains in about one batch time, far
        under admission's bound (max_wait_s, 10 s by default) at which it sheds with 503, so
        Ray adds replicas well before any replica sheds."""
        if self.target_ongoing_requests is not None:
            return self.target_ongoing_requests
        settings = self.service_settings()  # its threads are set; the device is the replica's
        batch = settings.batch_size("cuda" if self.gpus_per_replica else "cpu")
        assert settings.decode_threads and settings.model_threads
        return float(settings.decode_threads + settings.model_threads * batch)

    def replica_limit(self) -> int:
        """Requests Ray sends to one model replica at a time (``max_ongoing_requests``)."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return min(self.service_settings().max_in_flight, math.ceil(2 * self.target()))

    def queue_limit(self) -> int:
        """Requests an ingress replica's router holds while every model replica is at its limit."""
        return self.max_queued_requests if self.max_queued_requests is not None else self.replica_limit()

    def deployment_options(self) -> dict[str, Any]:
        """``Deployment.options`` for these arguments (after :meth:`fit`, which settles
        min_replicas)."""
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            actor["num_gpus"] = self.gpus_per_replica
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            # a replica gets what it works on (plus a batch filling); the rest wait in the
            # router at the ingress, bounded there, so a request over the bound is answered
            # 503 before its body travels on. The replica's own admission still sheds what it
            # holds when its queue cannot drain within max_wait_s (costly TTA requests).
            "max_ongoing_requests": self.replica_limit(),
            "max_queued_requests": self.queue_limit(),
            # a replica that loads and warms up the model takes seconds; a stuck one is replaced
            "health_check_period_s": 5,
            "health_check_timeout_s": 30,
        }
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {"min_replicas": self.initial_replicas(),
                                             "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.target()}
        return options

    def ingress_options(self) -> dict[str, Any]:
        """``Deployment.options`` of the ingress: it has room for every request the model
        replicas and its router's queue hold, so that shedding happens at that queue."""
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_ingress}
        if self.ingress_resources:
            actor["resources"] = dict(self.ingress_resources)
        model_replicas = self.num_replicas if self.num_replicas is not None else self.max_replicas
        return {
            "num_replicas": self.ingress_replicas,
            "ray_actor_options": actor,
            "max_ongoing_requests": self.service_settings().max_in_flight * model_replicas,
        }

    # --- placement ------------------------------------------------------------------------

    def initial_replicas(self) -> int:
        """Model replicas at the start: num_replicas, else min_replicas, else the default."""
        if self.num_replicas is not None:
            return self.num_replicas
        return self.min_replicas if self.min_replicas is not None else min(DEFAULT_REPLICAS, self.max_replicas)

    def demands(self, model_replicas: int) -> list[tuple[str, dict[str, float]]]:
        """What each replica asks Ray for, by kind: the ingress replicas and ``model_replicas``."""
        model = {"CPU": self.cpus_per_replica, "GPU": self.gpus_per_replica}
        ingress = {"CPU": self.cpus_per_ingress, **self.ingress_resources}
        return ([("ingress replica", _nonzero(ingress))] * self.ingress_replicas
                + [("model replica", _nonzero(model))] * model_replicas)

    def fit(self, nodes: Sequence[Resources] | None) -> AppArgs:
        """These arguments for a cluster whose live nodes have ``nodes`` (None: not known).

        Unless min_replicas or num_replicas is given, two model replicas where the cluster
        holds them, else one (a warning says that losing its node is then an outage). Raises
        ArgsError, in one line, when the replicas asked for cannot all be placed: Ray would
        leave the rest pending for good and every request would wait (two one-CPU model
        replicas and the ingress on a 2-CPU machine)."""
        if not self.check_placement:
            nodes = None  # nodes join later: what is there now says nothing
        settled = self
        if self.num_replicas is None and self.min_replicas is None:
            replicas = self.initial_replicas()
            problem = placement_problem(self.demands(replicas), nodes) if nodes is not None and replicas > 1 else None
            if problem:
                log.warning("%s; serving with one model replica: losing its node stops the service", problem)
                replicas = 1
            settled = self.model_copy(update={"min_replicas": replicas})
        if nodes is not None:
            problem = placement_problem(settled.demands(settled.initial_replicas()), nodes)
            if problem:
                raise ArgsError(f"{problem}; ask for fewer or smaller replicas (num_replicas, min_replicas,"
                                " cpus_per_replica, cpus_per_ingress), or check_placement=false where nodes"
                                " join later")
        return settled


def placement_problem(demands: Sequence[tuple[str, Mapping[str, float]]], nodes: Sequence[Resources]) -> str | None:
    """Why Ray cannot place every replica of ``demands`` ((kind, resources) each) on ``nodes``
    (each node's total resources), or None when it can. Each replica is a Ray actor that
    must fit whole on one node: placed largest first, each on the first node with room."""
    free = [dict(node) for node in nodes]
    for _, need in sorted(demands, key=lambda d: sum(d[1].values()), reverse=True):
        node = next((n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in need.items())), None)
        if node is None:
            return _unplaceable(demands, nodes)
        for k, v in need.items():
            node[k] = node.get(k, 0.0) - v
    return None


def _unplaceable(demands: Sequence[tuple[str, Mapping[str, float]]], nodes: Sequence[Resources]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for kind, need in demands:
        key = (kind, _resources(need))
        counts[key] = counts.get(key, 0) + 1
    asked = " and ".join(f"{n} {kind}{'s' if n > 1 else ''} of {need}" for (kind, need), n in counts.items())
    names = sorted({k for _, need in demands for k in need})
    have = ", ".join(_resources({k: node.get(k, 0.0) for k in names}) for node in nodes) or "none"
    return f"the cluster cannot hold {asked}: its {len(nodes)} live node(s) have {have}"


def _nonzero(resources: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if v}


def _resources(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}" if resources else "{}"
