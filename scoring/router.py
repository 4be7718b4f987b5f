"""Which deployed model version answers a score request, and getting that answer in time.

The transport-free core of the scoring path: the gRPC servicer converts messages and calls
it. ``ModelRouter`` is a registry of deployed versions (name -> {version -> model}) whose
default is a chain of responsibility, champion -> previous -> older, mirroring
``ModelRegistry.chain()``. Each ``DeployedModel`` carries a ``CircuitBreaker`` over its
recent latency; ``route`` skips links whose circuit is open, sends a configured share of
requests to a canary and a copy to a shadow. ``answer`` runs the chosen link and, if it
raises or passes its share of the deadline, asks the next one: better wrong than late.

Every change (``deploy``, ``retire``, ``set_chain``, ``promote``, ``configure``,
``demote``) builds a new immutable routing state and swaps one reference, so a request
keeps the models it picked even while a new champion is put in front (hot swap). A
demoted version (monitoring found it degraded) is skipped like an open circuit that never
probes, so the next link answers and says it is a fallback. Example::

    router = ModelRouter("fraud")
    router.deploy(DeployedModel("v2", "m-1a", old.predict_proba, CircuitBreaker(0.005)))
    router.deploy(DeployedModel("v3", "m-2b", new.predict_proba, CircuitBreaker(0.005)))
    router.set_chain(["v3", "v2"])                 # champion v3, previous v2
    decision = router.route(request_key="C-42")    # or route("v2"): that version or NOT_FOUND
    reply = answer(decision, lambda m: m.predict(rows), deadline_s=0.020, executor=pool)
    reply.version, reply.fallback, reply.fallback_reason   # "v2", True, "v3 passed ..."

The deadline needs an executor: ``call(link)`` is submitted to it and waited for, so a
slow model is abandoned (it finishes in the background, its reply dropped) and the next
link answers. Without an executor the call runs inline and cannot be pre-empted: a late
reply is still the earliest one available, so it is returned, and its latency recorded
so the circuit opens for the requests that follow.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from common.errors import ConveyorError, InvalidInput, ModelNotFound, Status
from scoring.latency import CircuitBreaker, CircuitState, Clock, LatencySummary, ms

logger = logging.getLogger(__name__)

Predict = Callable[[Any], Any]
ALIASES = ("champion", "previous")


class FallbackKind(StrEnum):
    """Why a fallback answered (a metric label): the first cause, when there are several."""

    DEADLINE = "deadline"
    """A link passed its share of the deadline (or was not asked: no time left)."""
    CIRCUIT_OPEN = "circuit_open"
    """The first choice was skipped because its latency circuit is open."""
    ERROR = "error"
    """A link raised."""


class NoModelDeployed(ConveyorError):
    """Nothing to serve: the service is not ready."""

    status = Status.UNAVAILABLE

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"model {name} has no deployed version to serve")


class NoAnswer(ConveyorError):
    """Every link of the decision failed or ran out of time."""

    status = Status.UNAVAILABLE

    def __init__(self, failures: Sequence[str]):
        self.failures = list(failures)
        super().__init__(f"no model answered: {'; '.join(failures)}")


@dataclass(eq=False)
class DeployedModel:
    """One loaded model version: its predict callable and the breaker over its latency."""

    version: str
    model_id: str
    predict: Predict
    breaker: CircuitBreaker

    def latency(self) -> LatencySummary:
        """Count and percentiles of its recent latency."""
        return self.breaker.tracker.summary()


@dataclass(frozen=True)
class RouterConfig:
    """Canary and shadow traffic: a share of requests to a candidate, a copy to a shadow."""

    canary_version: str | None = None
    canary_share: float = 0.0
    shadow_version: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_share <= 1.0:
            raise InvalidInput(f"canary_share must be within [0, 1], got {self.canary_share}")


@dataclass(frozen=True)
class RouteDecision:
    """The link to ask first, the ones to ask next, the shadow to copy, and why.

    ``fallback`` is True when the primary is not the first choice (the champion's circuit
    is open); ``reason`` then says why. ``roles`` names each link's role by version
    (champion, previous, older, canary or named), for metrics.
    """

    primary: DeployedModel
    fallbacks: list[DeployedModel] = field(default_factory=list)
    shadow: DeployedModel | None = None
    reason: str = ""
    fallback: bool = False
    roles: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """The value, the version that gave it, whether it was a fallback and why.

    ``fallback_kind`` is the reason as a fixed label; ``role`` the answering link's role.
    """

    value: Any
    version: str
    fallback: bool
    fallback_reason: str | None
    latency_s: float
    fallback_kind: FallbackKind | None = None
    role: str = ""


@dataclass(frozen=True)
class ShadowResult:
    """What the shadow answered (never returned to the caller), or its error."""

    version: str
    value: Any
    error: str | None
    latency_s: float


@dataclass(frozen=True)
class ModelHealth:
    """One deployed version as ``ListModels`` shows it."""

    version: str
    model_id: str
    alias: str | None
    circuit: CircuitState
    circuit_reason: str | None
    latency: LatencySummary


@dataclass(frozen=True)
class _RoutingState:
    models: Mapping[str, DeployedModel]
    chain: tuple[DeployedModel, ...]
    config: RouterConfig
    demoted: Mapping[str, str] = field(default_factory=dict)
    """Versions monitoring found degraded, and why: never asked first."""


class ModelRouter:
    """Deployed versions of one model name, the serving chain, canary and shadow."""

    def __init__(
        self,
        name: str = "default",
        config: RouterConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self._state = _RoutingState({}, (), config or RouterConfig())
        self._write_lock = threading.Lock()  # writers only; readers take one reference
        self._rng = rng or random.Random()

    @property
    def ready(self) -> bool:
        """Whether there is a chain to serve by default."""
        return bool(self._state.chain)

    @property
    def config(self) -> RouterConfig:
        """The canary and shadow configuration in force."""
        return self._state.config

    def get(self, version: str) -> DeployedModel:
        """The deployed version (or alias champion/previous), else ``ModelNotFound``."""
        return _lookup(self._state, self.name, version)

    def chain(self) -> list[DeployedModel]:
        """The serving chain, champion first."""
        return list(self._state.chain)

    def versions(self) -> list[str]:
        """Every deployed version, in deployment order."""
        return list(self._state.models)

    def health(self) -> list[ModelHealth]:
        """Every deployed version with its alias, circuit and latency."""
        state = self._state
        return [_health(model, _alias_of(state, model)) for model in state.models.values()]

    def deploy(self, model: DeployedModel) -> None:
        """Make a loaded (and warmed-up) version routable; it joins the chain via set_chain."""
        self._change(lambda state: _with_model(state, model))

    def retire(self, version: str) -> DeployedModel:
        """Stop routing to a version; requests that already picked it still finish on it."""
        model = self.get(version)
        self._change(lambda state: _without_model(state, self.name, version))
        return model

    def set_chain(self, versions: Sequence[str]) -> None:
        """Replace the chain (champion first) in one swap; every version must be deployed."""
        self._change(lambda state: replace(state, chain=_links(state, self.name, versions)))

    def promote(self, version: str) -> None:
        """Put a deployed version in front; the old champion becomes previous."""
        chain = [version, *(m.version for m in self._state.chain if m.version != version)]
        self.set_chain(chain)

    def demote(self, version: str, reason: str) -> None:
        """Stop asking a degraded version first: the chain skips it like an open circuit
        that never probes (every answer is a fallback saying why) until ``restore``."""
        _deployed(self._state, self.name, version)
        self._change(lambda state: replace(state, demoted={**state.demoted, version: reason}))

    def restore(self, version: str) -> None:
        """Ask a demoted version again (a new promotion of it, say)."""
        self._change(lambda state: replace(
            state, demoted={v: r for v, r in state.demoted.items() if v != version}))

    def demoted(self) -> dict[str, str]:
        """The demoted versions and why."""
        return dict(self._state.demoted)

    def configure(self, config: RouterConfig) -> None:
        """Change canary and shadow; the versions it names must be deployed."""
        self._change(lambda state: _configured(state, self.name, config))

    def route(self, version: str | None = None, *, request_key: str | None = None) -> RouteDecision:
        """Choose who answers: the named version, else canary by share, else the chain.

        A named version (or alias) is served whatever its circuit says, with no fallbacks:
        the caller asked for that model, not for any answer. ``request_key`` (an entity or
        request id) makes the canary choice deterministic per key; without it the share is
        drawn from the router's random generator.
        """
        state = self._state  # one read: later swaps do not affect this decision
        if version is not None:
            primary = _lookup(state, self.name, version)
            return RouteDecision(primary, shadow=_shadow_for(state, primary),
                                 reason=f"named {version}", roles={primary.version: "named"})
        return self._canary(state, request_key) or _walk_chain(state, self.name)

    def _canary(self, state: _RoutingState, request_key: str | None) -> RouteDecision | None:
        config = state.config
        canary = state.models.get(config.canary_version or "")
        if canary is None or not _in_share(request_key, config.canary_share, self._rng):
            return None
        if canary.version in state.demoted or not canary.breaker.allow():
            return None
        rest = [link for link in state.chain if link is not canary]
        reason = f"canary {canary.version} (share {config.canary_share:g})"
        return _decision(state, canary, _fallback_order(rest, state.demoted), reason)

    def _change(self, change: Callable[[_RoutingState], _RoutingState]) -> None:
        with self._write_lock:
            self._state = change(self._state)


def answer(
    decision: RouteDecision,
    call: Callable[[DeployedModel], Any],
    deadline_s: float | None = None,
    *,
    executor: Executor | None = None,
    fallback_reserve_s: float | None = None,
    clock: Clock = time.perf_counter,
    on_shadow: Callable[[ShadowResult], None] | None = None,
) -> Answer:
    """Ask the decision's links in turn until one answers; record every latency.

    The primary may use ``deadline_s - fallback_reserve_s`` (by default half the
    deadline); the fallbacks share what is left, in order. A link that raises, or passes
    its time, is recorded against its breaker and the next link is asked. ``InvalidInput``
    is the request's fault, so it propagates at once. ``NoAnswer`` when no link answers.
    The shadow is called after the answer is known (on the executor when there is one)
    and its result goes to ``on_shadow`` only.
    """
    start = clock()
    links = [decision.primary, *decision.fallbacks]
    failures: list[str] = []
    kinds: list[FallbackKind] = []
    for index, link in enumerate(links):
        timeout = _time_for(index, start, deadline_s, fallback_reserve_s, clock)
        if timeout is not None and timeout <= 0:
            failures.append(f"{link.version} not asked: deadline spent")
            kinds.append(FallbackKind.DEADLINE)
            continue
        ok, value, failure, kind = _ask(link, call, timeout, executor, clock)
        if ok:
            _start_shadow(decision.shadow, call, executor, clock, on_shadow)
            return _answered(decision, link, value, index, failures, kinds, clock() - start)
        failures.append(failure)
        kinds.append(kind or FallbackKind.ERROR)
    raise NoAnswer(failures)


def key_fraction(key: str) -> float:
    """A stable number in [0, 1) for a key, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class _PastDeadline(Exception):
    """The link did not answer within its time."""


def _lookup(state: _RoutingState, name: str, version: str) -> DeployedModel:
    if version in ALIASES and len(state.chain) > ALIASES.index(version):
        return state.chain[ALIASES.index(version)]
    try:
        return state.models[version]
    except KeyError:
        raise ModelNotFound(name, version) from None


def _links(state: _RoutingState, name: str, versions: Iterable[str]) -> tuple[DeployedModel, ...]:
    versions = list(versions)
    if len(set(versions)) != len(versions):
        raise InvalidInput(f"the chain names a version twice: {versions}")
    return tuple(_deployed(state, name, version) for version in versions)


def _deployed(state: _RoutingState, name: str, version: str) -> DeployedModel:
    if version not in state.models:  # aliases are not accepted where a version is meant
        raise ModelNotFound(name, version)
    return state.models[version]


def _with_model(state: _RoutingState, model: DeployedModel) -> _RoutingState:
    if model.version in state.models:
        raise InvalidInput(f"version {model.version} is already deployed; retire it first")
    return replace(state, models={**state.models, model.version: model})


def _without_model(state: _RoutingState, name: str, version: str) -> _RoutingState:
    model = _deployed(state, name, version)
    models = {v: m for v, m in state.models.items() if v != version}
    chain = tuple(link for link in state.chain if link is not model)
    config = state.config
    if version in (config.canary_version, config.shadow_version):
        logger.info("retiring %s also ends its canary or shadow traffic", version)
        config = _config_without(config, version)
    demoted = {v: r for v, r in state.demoted.items() if v != version}
    return _RoutingState(models, chain, config, demoted)


def _config_without(config: RouterConfig, version: str) -> RouterConfig:
    if config.canary_version == version:
        config = replace(config, canary_version=None, canary_share=0.0)
    if config.shadow_version == version:
        config = replace(config, shadow_version=None)
    return config


def _configured(state: _RoutingState, name: str, config: RouterConfig) -> _RoutingState:
    for version in (config.canary_version, config.shadow_version):
        if version is not None:
            _deployed(state, name, version)
    return replace(state, config=config)


def _walk_chain(state: _RoutingState, name: str) -> RouteDecision:
    if not state.chain:
        raise NoModelDeployed(name)
    skipped: list[str] = []
    for index, link in enumerate(state.chain):
        if link.version in state.demoted:
            skipped.append(f"{_alias(index)} {link.version} skipped: demoted "
                           f"({state.demoted[link.version]})")
        elif link.breaker.allow():
            rest = _fallback_order(state.chain[index + 1 :], state.demoted)
            reason = "; ".join([*skipped, f"{_alias(index)} {link.version}"])
            return _decision(state, link, rest, reason, fallback=index > 0)
        else:
            skipped.append(
                f"{_alias(index)} {link.version} skipped: circuit {link.breaker.describe()}")
    reason = "; ".join([*skipped, "every circuit is open: asking the chain in order"])
    return _decision(state, state.chain[0], list(state.chain[1:]), reason)


def _decision(state: _RoutingState, primary: DeployedModel, fallbacks: list[DeployedModel],
              reason: str, *, fallback: bool = False) -> RouteDecision:
    """A chain or canary decision with the links' roles and the shadow."""
    return RouteDecision(primary, fallbacks, _shadow_for(state, primary), reason, fallback,
                         _roles(state, primary))


def _fallback_order(
    links: Iterable[DeployedModel], demoted: Mapping[str, str] | None = None
) -> list[DeployedModel]:
    """Healthy links first, in chain order; the others last (demoted ones at the very end),
    as a last resort."""
    demoted = demoted or {}
    return sorted(links, key=lambda link: (link.version in demoted,
                                           link.breaker.state is not CircuitState.CLOSED))


def _alias(index: int) -> str:
    return ALIASES[index] if index < len(ALIASES) else f"older #{index - 1}"


def _alias_of(state: _RoutingState, model: DeployedModel) -> str | None:
    index = next((i for i, link in enumerate(state.chain) if link is model), None)
    if index is not None:
        return _alias(index)
    config = state.config
    return {config.canary_version: "canary", config.shadow_version: "shadow"}.get(model.version)


def _health(model: DeployedModel, alias: str | None) -> ModelHealth:
    breaker = model.breaker
    circuit = breaker.state
    return ModelHealth(
        model.version, model.model_id, alias, circuit, breaker.reason, model.latency()
    )


def _in_share(request_key: str | None, share: float, rng: random.Random) -> bool:
    if share <= 0.0:
        return False
    fraction = rng.random() if request_key is None else key_fraction(request_key)
    return fraction < share


def _shadow_for(state: _RoutingState, primary: DeployedModel) -> DeployedModel | None:
    shadow = state.models.get(state.config.shadow_version or "")
    return None if shadow is primary else shadow


def _time_for(
    index: int, start: float, deadline_s: float | None, reserve_s: float | None, clock: Clock
) -> float | None:
    if deadline_s is None:
        return None
    left = deadline_s - (clock() - start)
    if index > 0:
        return left
    return left - (deadline_s / 2 if reserve_s is None else reserve_s)


def _ask(
    link: DeployedModel,
    call: Callable[[DeployedModel], Any],
    timeout: float | None,
    executor: Executor | None,
    clock: Clock,
) -> tuple[bool, Any, str, FallbackKind | None]:
    """Run one link; (True, value, "", None) or (False, None, why it gave no answer, kind)."""
    began = clock()
    try:
        value = _run(link, call, timeout, executor)
    except _PastDeadline:
        link.breaker.record_timeout(clock() - began)
        failure = f"{link.version} passed its deadline of {ms(timeout or 0.0)}"
        return False, None, failure, FallbackKind.DEADLINE
    except InvalidInput:
        raise
    except Exception as exc:  # any fault of the model is answered by the next link
        logger.warning("model %s failed", link.version, exc_info=True)
        link.breaker.record_failure(_error(exc))
        return False, None, f"{link.version} raised {_error(exc)}", FallbackKind.ERROR
    link.breaker.record(clock() - began)
    return True, value, "", None


def _run(
    link: DeployedModel,
    call: Callable[[DeployedModel], Any],
    timeout: float | None,
    executor: Executor | None,
) -> Any:
    if executor is None:
        return call(link)
    future = executor.submit(call, link)
    try:
        return future.result(timeout=timeout)  # no waiter objects, unlike futures.wait
    except TimeoutError as exc:
        if future.done() and not future.cancelled() and future.exception() is exc:
            raise  # the call's own TimeoutError (a socket's, say), not the wait's
        future.cancel()  # frees the worker if it has not started; else its reply is dropped
        raise _PastDeadline from None


def _roles(state: _RoutingState, primary: DeployedModel) -> dict[str, str]:
    """Each link's role: its place in the chain, or canary."""
    roles = {link.version: _chain_role(index) for index, link in enumerate(state.chain)}
    if state.config.canary_version and primary.version == state.config.canary_version:
        roles[primary.version] = "canary"
    return roles


def _chain_role(index: int) -> str:
    return ALIASES[index] if index < len(ALIASES) else "older"


def _kind_of(decision: RouteDecision, kinds: Sequence[FallbackKind]) -> FallbackKind:
    """The first cause of a fallback: the open circuit that skipped the first choice,
    else the first link's failure."""
    if decision.fallback:
        return FallbackKind.CIRCUIT_OPEN
    return kinds[0] if kinds else FallbackKind.ERROR


def _answered(
    decision: RouteDecision,
    link: DeployedModel,
    value: Any,
    index: int,
    failures: list[str],
    kinds: Sequence[FallbackKind],
    latency_s: float,
) -> Answer:
    reasons = ([decision.reason] if decision.fallback else []) + failures
    fallback = decision.fallback or index > 0
    kind = _kind_of(decision, kinds) if fallback else None
    return Answer(value, link.version, fallback, "; ".join(reasons) or None, latency_s,
                  kind, decision.roles.get(link.version, ""))


def _start_shadow(
    shadow: DeployedModel | None,
    call: Callable[[DeployedModel], Any],
    executor: Executor | None,
    clock: Clock,
    on_shadow: Callable[[ShadowResult], None] | None,
) -> None:
    if shadow is None:
        return
    if executor is None:
        _shadow(shadow, call, clock, on_shadow)
    else:
        executor.submit(_shadow, shadow, call, clock, on_shadow)


def _shadow(
    shadow: DeployedModel,
    call: Callable[[DeployedModel], Any],
    clock: Clock,
    on_shadow: Callable[[ShadowResult], None] | None,
) -> None:
    """Ask the shadow; whatever happens stays here, the caller has its answer already."""
    began, value, error = clock(), None, None
    try:
        value = call(shadow)
    except Exception as exc:
        error = _error(exc)
    latency = clock() - began
    if error is None:
        shadow.breaker.record(latency)
    else:
        shadow.breaker.record_failure(error)
    _report_shadow(on_shadow, ShadowResult(shadow.version, value, error, latency))


def _report_shadow(on_shadow: Callable[[ShadowResult], None] | None, result: ShadowResult) -> None:
    if on_shadow is None:
        return
    try:
        on_shadow(result)
    except Exception:  # recording a shadow must never disturb serving
        logger.exception("recording the shadow result of %s failed", result.version)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
