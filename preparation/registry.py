"""The step registry: each kind of feature step, declared in one place.

A kind's registration says everything about it: its name, its params (the factory's
keyword arguments: a pydantic model derived from the signature validates them and refuses
unknown ones), its pandas transform (what the factory returns, fitted offline and run
offline and online) and its row form (``row_form``: the fitted step as a plain function
over ``{column: value}`` rows, which scoring runs for a few records; see
``preparation.online``). A factory that needs the spec's entity key, timestamp or label
takes a keyword-only ``context``. ``reads`` and ``writes`` name the params holding column
names, so the label and the entity key can never be fed into, or overwritten by, a
feature step. A kind without a row form still works: its feature sets take the pandas
path online, slower, and the parity test (tests/unit/test_preparation_online.py), which
runs over every registered kind, says so.

Built-in kinds: extract (ratio, difference, date_parts, entity_aggregate), transform
(impute, one_hot, scale, log, filter, drop), select (select_k_best). Steps run in the
order the spec lists them; the role only documents the kind. Adding one::

    def _cap(frame: pd.DataFrame, upper: float) -> pd.DataFrame:
        return frame.clip(upper=upper)

    def cap_row_form(step: OnColumns) -> RowStep:          # optional: the fast online path
        upper = step.estimator_.kw_args["upper"]
        ...                                                 # rows changed in place

    @register("cap", reads=("columns",), row_form=cap_row_form)
    def cap(columns: Columns, upper: float) -> OnColumns:
        capper = FunctionTransformer(_cap, kw_args={"upper": upper},
                                     feature_names_out="one-to-one")
        return OnColumns(capper, columns)

    step = build_step(0, "cap", {"columns": ["amount"], "upper": 1e6}, StepContext())
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeAlias, get_type_hints

import pandas as pd
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    create_model,
)
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, OneHotEncoder, StandardScaler

from common.errors import InvalidInput
from preparation import online
from preparation.aggregates import EntityAggregate, Stat
from preparation.online import RowStep
from preparation.transformers import (
    DatePart,
    DateParts,
    Difference,
    DropColumns,
    KBestColumns,
    OnColumns,
    Op,
    Ratio,
    RowFilter,
    log1p_non_negative,
)

Role = Literal["extract", "transform", "select"]


@dataclass(frozen=True)
class StepContext:
    """What a step may need from its spec besides its own params."""

    entity_key: str | None = None
    timestamp: str | None = None
    label: str | None = None

    @property
    def carried(self) -> tuple[str, ...]:
        """Columns carried beside the features, never features themselves."""
        return tuple(c for c in (self.entity_key, self.timestamp, self.label) if c)

    @property
    def reserved(self) -> dict[str, str]:
        """Columns no step may read or write as a feature, with their role."""
        roles = {self.label: "label", self.entity_key: "entity key"}
        return {column: role for column, role in roles.items() if column}


RowForm: TypeAlias = Callable[[Any], RowStep | None]
"""A kind's row form: the fitted step as a row function, or None when this step holds
something the row functions do not model (the pandas path then runs)."""


@dataclass(frozen=True)
class Kind:
    """A registered kind: its factory, the params model, which params name columns, and
    its row form (None: the kind has none)."""

    name: str
    role: Role
    factory: Callable[..., Any]
    params: type[BaseModel]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    wants_context: bool
    row_form: RowForm | None = None


_KINDS: dict[str, Kind] = {}


def register(name: str, *, role: Role = "transform", reads: Sequence[str] = (),
             writes: Sequence[str] = (), row_form: RowForm | None = None,
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``factory`` as the step kind ``name``."""

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _KINDS:
            raise ValueError(f"step kind {name!r} is already registered")
        wants = "context" in inspect.signature(factory).parameters
        _KINDS[name] = Kind(name, role, factory, _params_model(name, factory),
                            tuple(reads), tuple(writes), wants, row_form)
        return factory

    return decorate


def known_kinds() -> list[str]:
    """Registered kind names, sorted."""
    return sorted(_KINDS)


def kind_of(name: str) -> Kind:
    """The registered kind; ``InvalidInput`` listing the known kinds if there is none."""
    if name not in _KINDS:
        raise InvalidInput(f"unknown kind; known kinds: {', '.join(known_kinds())}")
    return _KINDS[name]


def step_name(index: int, kind: str) -> str:
    """The name of a spec's step in its scikit-learn pipeline: ``3_one_hot``."""
    return f"{index}_{kind}"


def row_form_of(name: str, step: Any) -> RowStep | None:
    """The row form of the fitted pipeline step ``name`` (``step_name``), by its kind's
    registration; None when it has none. A step of no registered kind is the placeholder
    of a spec without steps."""
    found = _KINDS.get(name.partition("_")[2])
    if found is None:
        return online.identity_row_form(step)
    return None if found.row_form is None else found.row_form(step)


def step_label(index: int, kind: str) -> str:
    """How errors name a step: ``steps[3] (one_hot)``."""
    return f"steps[{index}] ({kind})"


@contextmanager
def naming_step(label: str) -> Iterator[None]:
    """Prefix any ``InvalidInput`` raised inside with the step's label."""
    try:
        yield
    except InvalidInput as err:
        raise InvalidInput(f"{label}: {err}") from err


def build_step(index: int, kind: str, params: Mapping[str, Any], context: StepContext) -> Any:
    """An unfitted transformer for one step; errors name the step index, kind and param."""
    with naming_step(step_label(index, kind)):
        found = kind_of(kind)
        values = _validate(found, params)
        _check_reserved(found, values, context)
        extra = {"context": context} if found.wants_context else {}
        return found.factory(**values, **extra)


def _params_model(name: str, factory: Callable[..., Any]) -> type[BaseModel]:
    hints = get_type_hints(factory, include_extras=True)
    fields: dict[str, Any] = {
        p.name: (hints[p.name], ... if p.default is p.empty else p.default)
        for p in inspect.signature(factory).parameters.values() if p.name != "context"
    }
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return create_model(f"{name}_params", __config__=config, **fields)


def _validate(kind: Kind, params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return dict(kind.params.model_validate(params))
    except ValidationError as err:
        known = ", ".join(kind.params.model_fields) or "none"
        raise InvalidInput(f"{_describe(err)} (known params: {known})") from None


def _describe(err: ValidationError) -> str:
    # Name the param, not pydantic's deeper location: it holds union tags like "str".
    problems = [f"param '{e['loc'][0] if e['loc'] else '(all)'}': {e['msg']}{_got(e)}"
                for e in err.errors()]
    return "; ".join(dict.fromkeys(problems))


def _got(error: Any) -> str:
    value = error.get("input")
    scalar = isinstance(value, str | int | float) and error["type"] != "extra_forbidden"
    return f" (got {value!r})" if scalar else ""


def _check_reserved(kind: Kind, values: Mapping[str, Any], context: StepContext) -> None:
    for param in (*kind.reads, *kind.writes):
        for column in _names(values.get(param)):
            if column in context.reserved:
                role = context.reserved[column]
                raise InvalidInput(
                    f"param '{param}' names '{column}', the spec's {role}: never a feature"
                )


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(values)) != len(values):
        raise ValueError(f"repeats a value: {list(values)}")
    return values


def _time_window(window: int | str) -> int | str:
    if isinstance(window, str) and not (re.search("[a-zA-Z]", window)
                                        and pd.Timedelta(window) > pd.Timedelta(0)):
        raise ValueError(f"{window!r} is not a positive duration such as '24h' or '7d'")
    return window


Column: TypeAlias = Annotated[str, Field(min_length=1)]
Columns: TypeAlias = Annotated[list[Column], Field(min_length=1)]
Window: TypeAlias = Annotated[PositiveInt | str, AfterValidator(_time_window)]
Stats: TypeAlias = Annotated[tuple[Stat, ...], Field(min_length=1), AfterValidator(_unique)]
Parts: TypeAlias = Annotated[tuple[DatePart, ...], Field(min_length=1), AfterValidator(_unique)]
Conditions: TypeAlias = Annotated[
    dict[str, Annotated[dict[Op, Any], Field(min_length=1)]], Field(min_length=1)]


@register("impute", reads=("columns",), row_form=online.impute_row_form)
def impute(columns: Columns,
           strategy: Literal["mean", "median", "most_frequent", "constant"] = "mean",
           fill_value: float | str | None = None) -> OnColumns:
    """SimpleImputer; an all-missing column is kept (filled) rather than dropped."""
    imputer = SimpleImputer(strategy=strategy, fill_value=fill_value, keep_empty_features=True)
    return OnColumns(imputer, columns)


@register("one_hot", reads=("columns",), row_form=online.one_hot_row_form)
def one_hot(columns: Columns) -> OnColumns:
    """OneHotEncoder; a category unseen at fit encodes as all zeros."""
    return OnColumns(OneHotEncoder(handle_unknown="ignore", sparse_output=False), columns)


@register("scale", reads=("columns",), row_form=online.scale_row_form)
def scale(columns: Columns, method: Literal["standard", "minmax"] = "standard") -> OnColumns:
    """StandardScaler or MinMaxScaler."""
    return OnColumns(StandardScaler() if method == "standard" else MinMaxScaler(), columns)


@register("log", reads=("columns",), row_form=online.log_row_form)
def log(columns: Columns) -> OnColumns:
    """log1p in place; negative values are refused."""
    return OnColumns(FunctionTransformer(log1p_non_negative, feature_names_out="one-to-one"),
                     columns)


@register("ratio", role="extract", reads=("a", "b"), writes=("name",),
          row_form=online.ratio_row_form)
def ratio(a: Column, b: Column, name: Column, fill: float = 0.0) -> Ratio:
    """``name = a / b``, ``fill`` where ``b`` is 0."""
    return Ratio(a, b, name, fill)


@register("difference", role="extract", reads=("a", "b"), writes=("name",),
          row_form=online.difference_row_form)
def difference(a: Column | Columns, b: Column | Columns, name: Column) -> Difference:
    """``name = sum(a) - sum(b)``."""
    return Difference(a, b, name)


@register("date_parts", role="extract", reads=("column",),
          row_form=online.date_parts_row_form)
def date_parts(column: Column, parts: Parts = ("hour", "dayofweek", "month"),
               keep: bool = False) -> DateParts:
    """Calendar parts of a timestamp column, in UTC; the column is dropped unless ``keep``."""
    return DateParts(column, parts, keep)


@register("entity_aggregate", role="extract", reads=("column",),
          row_form=online.entity_aggregate_row_form)
def entity_aggregate(column: Column, window: Window, stats: Stats = ("count", "sum", "mean"),
                     *, context: StepContext) -> EntityAggregate:
    """Per entity-key statistics of ``column`` over the past rows (see preparation.aggregates)."""
    if context.entity_key is None:
        raise InvalidInput("needs the spec's entity_key")
    if isinstance(window, str) and context.timestamp is None:
        raise InvalidInput(f"param 'window': {window!r} is a time window; it needs the "
                           "spec's timestamp")
    return EntityAggregate(context.entity_key, column, window, stats, context.timestamp)


@register("select_k_best", role="select", row_form=online.select_k_best_row_form)
def select_k_best(k: PositiveInt | Literal["all"],
                  score_func: Literal["chi2", "mutual_info"] = "chi2",
                  *, context: StepContext) -> KBestColumns:
    """SelectKBest on every feature column; needs the spec's label."""
    if context.label is None:
        raise InvalidInput("needs the spec's label to score features")
    return KBestColumns(k, score_func, context.label, context.carried)


@register("filter", row_form=online.filter_row_form)
def filter_rows(query: str | None = None, where: Conditions | None = None) -> RowFilter:
    """Row filter, offline only (fit and offline transform); online rows are never dropped."""
    if (query is None) == (where is None):
        raise InvalidInput("param 'query' or 'where': give exactly one of them")
    return RowFilter(query, where)


@register("drop", row_form=online.drop_row_form)
def drop(columns: Columns) -> DropColumns:
    """Drop columns."""
    return DropColumns(columns)
