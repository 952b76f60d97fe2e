"""The application's arguments (``serve run rayserve.app:app KEY=VALUE ...`` or a Serve config
file's ``args``): where the model is, how the model replicas and the ingress replicas in front
of them are placed and scaled, and any service setting by its field name (``device=cpu``, ``max_wait_s=5``: the ``SOTA_SERVE_*`` knobs of
sota_serve/serving/settings.py, without the prefix).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sota_serve.errors import SotaServeError
from sota_serve.serving.settings import Settings


class ArgsError(SotaServeError):
    """The application's arguments are wrong; the message names the argument."""


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: a package directory at the same path on every node, or a BentoML model-store tag present
    #: in each node's store (``sota-serve import``); each replica opens it, checking every
    #: artifact's sha256 against the card, and refuses to start on a mismatch
    model: str
    #: a fixed number of replicas; unset: autoscaling between min_replicas and max_replicas
    num_replicas: int | None = Field(default=None, ge=1)
    min_replicas: int = Field(default=1, ge=0)
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
    #: service settings by field name (Settings); these win over the nodes' SOTA_SERVE_* variables
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> AppArgs:
        if self.min_replicas > self.max_replicas:
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

    def deployment_options(self) -> dict[str, Any]:
        """``Deployment.options`` for these arguments."""
        settings = self.service_settings()
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            actor["num_gpus"] = self.gpus_per_replica
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            # requests go on to the replica, whose admission sheds with 503 + Retry-After
            # when its queue cannot drain in time; Ray's own bound (default 5) would queue
            # them in front of it instead. max_in_flight is admission's memory backstop.
            "max_ongoing_requests": settings.max_in_flight,
            # a replica that loads and warms up the model takes seconds; a stuck one is replaced
            "health_check_period_s": 5,
            "health_check_timeout_s": 30,
        }
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.target()}
        return options

    def ingress_options(self) -> dict[str, Any]:
        """``Deployment.options`` of the ingress: it holds every request the model replicas
        hold (their admission sheds, not a queue in front of the ingress)."""
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_ingress}
        if self.ingress_resources:
            actor["resources"] = dict(self.ingress_resources)
        model_replicas = self.num_replicas if self.num_replicas is not None else self.max_replicas
        return {
            "num_replicas": self.ingress_replicas,
            "ray_actor_options": actor,
            "max_ongoing_requests": self.service_settings().max_in_flight * model_replicas,
        }
