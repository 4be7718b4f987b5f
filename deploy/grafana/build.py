"""Generates Conveyor's Grafana dashboards (deploy/grafana/dashboards/*.json).

Built with grafana-foundation-sdk (a dev dependency); the JSON is committed and
tests/unit/test_dashboards.py checks that it equals what this script writes, so edit the
panels here, never the JSON. Every query reads the Prometheus datasource of uid
``conveyor-prometheus`` (deploy/grafana/provisioning/datasources/prometheus.yaml) and the
metric names of the project's contract (README, "Observability"). Usage::

    .venv/bin/python deploy/grafana/build.py           # (re)write the dashboards
    .venv/bin/python deploy/grafana/build.py --check   # exit 1 if a committed one differs
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="conveyor-prometheus")
RATE = "$__rate_interval"
VERSION = 'model_version=~"$model_version"'
SERVICE = 'service=~"$service"'
Panel = Any  # a panel builder of the SDK (timeseries, stat, state timeline)


def query(expr: str, legend: str = "", *, instant: bool = False) -> Dataquery:
    """A PromQL query of the Conveyor Prometheus."""
    built = Dataquery().expr(expr).datasource(DATASOURCE).legend_format(legend or "__auto")
    return built.instant() if instant else built.range()


def with_queries(panel: Panel, title: str, description: str, queries: Sequence[Dataquery]
                 ) -> Panel:
    """The panel with its title, description, datasource and queries (refIds A, B, ...)."""
    panel = panel.title(title).description(description).datasource(DATASOURCE)
    for ref, built in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(built.ref_id(ref))
    return panel


def graph(title: str, description: str, unit: str, *queries: Dataquery, span: int = 12
          ) -> Panel:
    """A time series panel."""
    panel = timeseries.Panel().unit(unit).span(span).height(8).fill_opacity(10)
    return with_queries(panel, title, description, queries)


def single(title: str, description: str, unit: str, *queries: Dataquery, span: int = 6
           ) -> Panel:
    """A stat panel (one number per series, the last value)."""
    return with_queries(stat.Panel().unit(unit).span(span).height(8), title, description,
                        queries)


def steps(*levels: tuple[float | None, str]) -> ThresholdsConfig:
    """Absolute thresholds: (value, colour) pairs, the first value None (-Infinity)."""
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=value, color=colour) for value, colour in levels])


def variable(name: str, label: str, source: str) -> QueryVariable:
    """A multi-value variable over a label's values; All means every value (regex .*)."""
    return (QueryVariable(name).label(label).datasource(DATASOURCE)
            .query(f"label_values({source}, {name})").multi(True).include_all(True)
            .all_value(".*").current(VariableOption(text="All", value="$__all", selected=True))
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))


def dashboard(uid: str, title: str, description: str, var: QueryVariable,
              rows: Sequence[tuple[str, Sequence[Panel]]]) -> Dashboard:
    """A Conveyor dashboard: its rows of panels, numbered in order."""
    built = (Dashboard(title).uid(uid).description(description).tags(["conveyor"])
             .refresh("30s").time("now-1h", "now").timezone("browser").with_variable(var))
    number = 0
    for row_title, panels in rows:
        number += 1
        built = built.with_row(Row(row_title).id(number))
        for panel in panels:
            number += 1
            built = built.with_panel(panel.id(number))
    return built


# -- Scoring -----------------------------------------------------------------------------


def scoring() -> Dashboard:
    """Traffic, latency percentiles per version, fallbacks, errors, batch sizes."""
    return dashboard(
        "conveyor-scoring", "Conveyor / Scoring",
        "The online scoring service: calls, answers per model version, latency, fallbacks.",
        variable("model_version", "Model version", "conveyor_scoring_answers_total"),
        [("Traffic", scoring_traffic()), ("Latency", scoring_latency()),
         ("Fallbacks and batching", scoring_fallbacks())])


def scoring_traffic() -> list[Panel]:
    return [
        graph("Calls by method and status",
              "gRPC calls per second, by method and gRPC status code.", "reqps",
              query(f"sum by (method, code) (rate(conveyor_scoring_requests_total[{RATE}]))",
                    "{{method}} {{code}}"), span=8),
        graph("Answers by model version",
              "Rows answered per second, by the version that answered and its link "
              "(champion, previous, older, canary, named).", "reqps",
              query(f"sum by (model_version, link) (rate(conveyor_scoring_answers_total"
                    f"{{{VERSION}}}[{RATE}]))", "{{model_version}} ({{link}})"), span=8),
        graph("Errors by status",
              "Calls answered with a status other than OK, per second.", "reqps",
              query(f'sum by (method, code) (rate(conveyor_scoring_requests_total{{code!="OK"}}'
                    f"[{RATE}]))", "{{method}} {{code}}"), span=8),
    ]


def scoring_latency() -> list[Panel]:
    percentiles = [query(f"model_version:conveyor_scoring_latency_seconds:{p}_5m{{{VERSION}}}",
                         f"{{{{model_version}}}} {p}") for p in ("p50", "p95", "p99")]
    return [
        graph("Answer latency p50 / p95 / p99 per version",
              "Server-side latency of an answer over 5 minutes, per answering version "
              "(recording rules of deploy/prometheus/rules).", "s", *percentiles),
        graph("Call duration p99 by method",
              "Server time of a gRPC call, 99th percentile, by method.", "s",
              query("histogram_quantile(0.99, sum by (method, le) (rate("
                    f"conveyor_scoring_rpc_duration_seconds_bucket[{RATE}])))", "{{method}}")),
    ]


def scoring_fallbacks() -> list[Panel]:
    batch = [query(f"histogram_quantile({q}, sum by (model_version, le) (rate("
                   f"conveyor_scoring_batch_size_bucket{{{VERSION}}}[{RATE}])))",
                   f"{{{{model_version}}}} p{round(q * 100)}") for q in (0.5, 0.95)]
    return [
        graph("Fallbacks by reason",
              "Rows answered by a fallback model per second, by the version that answered "
              "and why the one in front did not (deadline, circuit_open, error).", "reqps",
              query(f"sum by (model_version, reason) (rate(conveyor_scoring_fallbacks_total"
                    f"{{{VERSION}}}[{RATE}]))", "{{model_version}} {{reason}}"), span=9),
        single("Fallback share (5 min)",
               "Share of all answers given by a fallback model over 5 minutes; the "
               "ConveyorScoringFallbackRateHigh alert fires above 5%.", "percentunit",
               query("sum(model_version_reason:conveyor_scoring_fallbacks:ratio_5m)",
                     "fallback share", instant=True),
               span=3).thresholds(steps((None, "green"), (0.05, "red"))),
        graph("Rows per predict call", "Micro-batch size per model version (p50, p95).",
              "short", *batch),
        graph("Degraded answers and dropped reports",
              "Answers given without the entity's online features (Redis unreachable), and "
              "ScoreServed reports dropped rather than slowing scoring, per second.", "reqps",
              query(f"sum(rate(conveyor_scoring_degraded_total[{RATE}]))",
                    "answered without online features"),
              query(f"sum(rate(conveyor_scoring_reports_dropped_total[{RATE}]))",
                    "ScoreServed reports dropped")),
    ]


# -- Pipeline ----------------------------------------------------------------------------


def pipeline() -> Dashboard:
    """Events through each stage, stage durations, failures, dead letters, queues."""
    return dashboard(
        "conveyor-pipeline", "Conveyor / Pipeline",
        "Events through the services, pipeline stage durations, failures and queues.",
        variable("service", "Service", "conveyor_events_handled_total"),
        [("Events", pipeline_events()), ("Durations", pipeline_durations()),
         ("Failures", pipeline_failures()), ("Queues", pipeline_queues())])


def by_service(metric: str, legend: str = "{{service}} {{event_type}}") -> Dataquery:
    """Per-second rate of a per-service event counter, by service and event type."""
    return query(f"sum by (service, event_type) (rate({metric}{{{SERVICE}}}[{RATE}]))", legend)


def pipeline_events() -> list[Panel]:
    return [
        graph("Events handled", "Events each service handled successfully, per second.",
              "ops", by_service("conveyor_events_handled_total"), span=9),
        single("Stage runs in the time range",
               "Successful runs of each pipeline stage (the handler of the event that drives "
               "it) over the dashboard's time range.", "short",
               query("sum by (stage) (increase("
                     "conveyor_pipeline_stage_duration_seconds_count[$__range]))", "{{stage}}",
                     instant=True), span=3),
        graph("Events published",
              "Events the services' handlers caused, confirmed by the broker, per second.",
              "ops", by_service("conveyor_events_published_total")),
    ]


def pipeline_durations() -> list[Panel]:
    mean = ("sum by (stage) (increase(conveyor_pipeline_stage_duration_seconds_sum[1h])) / "
            "sum by (stage) (increase(conveyor_pipeline_stage_duration_seconds_count[1h]))")
    return [
        graph("Stage duration (mean of the last hour's runs)",
              "A stage's duration is the successful handler run of the event that drives it "
              "(ingestion: SourceDataAvailable, preparation: RawDataExtracted, training: "
              "FeaturesGenerated or RetrainRequested, evaluation: CandidatesTrained, "
              "deployment: ModelReady in scoring), events caused included.", "s",
              query(mean, "{{stage}}")),
        graph("Handler duration p95", "95th percentile of handler duration by service and "
              "event type.", "s",
              query("histogram_quantile(0.95, sum by (service, event_type, le) (rate("
                    f"conveyor_handler_duration_seconds_bucket{{{SERVICE}}}[{RATE}])))",
                    "{{service}} {{event_type}}")),
    ]


def pipeline_failures() -> list[Panel]:
    return [
        graph("Failed attempts and retries",
              "Handler attempts that raised, and events sent to a retry delay, per second.",
              "ops", by_service("conveyor_events_failed_total", "failed {{service}} "
                                "{{event_type}}"),
              by_service("conveyor_events_retried_total", "retried {{service}} {{event_type}}"),
              span=8),
        graph("Dead-lettered events",
              "Events sent to a dead-letter queue per second (invalid, the input's fault, or "
              "out of attempts). `conveyor dlq list SERVICE` shows why.", "ops",
              by_service("conveyor_events_dead_lettered_total"), span=8),
        graph("Duplicate deliveries",
              "Redelivered events whose work was already done (acknowledged, not redone).",
              "ops", by_service("conveyor_events_duplicate_total"), span=8),
    ]


def pipeline_queues() -> list[Panel]:
    return [
        graph("Queue depth", "Messages waiting in each service's queue and retry delays.",
              "short", query(f'sum by (service, queue) (conveyor_queue_depth{{{SERVICE}, '
                             'queue!="dead"})', "{{service}} {{queue}}"), span=10),
        single("Dead letters waiting", "Messages in each service's dead-letter queue; the "
               "ConveyorDeadLetters alert fires on any.", "short",
               query(f'sum by (service) (conveyor_queue_depth{{{SERVICE}, queue="dead"}})',
                     "{{service}}", instant=True),
               span=7).thresholds(steps((None, "green"), (1, "red"))),
        single("Services up", "1 when Prometheus scrapes the service's /metrics.", "short",
               query(f'up{{job="conveyor", {SERVICE}}}', "{{service}}", instant=True),
               span=7).thresholds(steps((None, "red"), (1, "green"))),
    ]


# -- Models ------------------------------------------------------------------------------


def models() -> Dashboard:
    """Served per version, quality against outcomes vs evaluation, drift, champions."""
    return dashboard(
        "conveyor-models", "Conveyor / Models",
        "How each model version serves and how good it is: live quality from observed "
        "outcomes against evaluation, drift against the training reference, champions.",
        variable("model_version", "Model version", "conveyor_model_served_total"),
        [("Serving", models_serving()), ("Quality", models_quality()),
         ("Drift", models_drift())])


def models_serving() -> list[Panel]:
    return [
        graph("Scores served per version",
              "Scores reported to monitoring (ScoreServed) per second, by answering version.",
              "reqps", query(f"sum by (model_version) (rate(conveyor_model_served_total"
                             f"{{{VERSION}}}[{RATE}]))", "{{model_version}}"), span=8),
        graph("Serving latency p95 per version",
              "95th percentile of the serving time reported with the scores.", "s",
              query("histogram_quantile(0.95, sum by (model_version, le) (rate("
                    f"conveyor_model_serving_latency_seconds_bucket{{{VERSION}}}[{RATE}])))",
                    "{{model_version}}"), span=8),
        statetimeline.Panel().title("Champion history").description(
            "Which version was the champion (1) over time.").datasource(DATASOURCE)
        .span(8).height(8).with_target(query(
            f"max by (model_version) (conveyor_model_champion{{{VERSION}}})",
            "{{model_version}}").ref_id("A")),
    ]


def models_quality() -> list[Panel]:
    return [
        graph("Live quality against evaluation",
              "Accuracy, precision, recall and F1 from observed outcomes over the sliding "
              "window (live) and on the evaluation part (evaluation).", "percentunit",
              query(f"max by (model_version, metric) (conveyor_model_quality{{{VERSION}}})",
                    "{{model_version}} {{metric}} live"),
              query("max by (model_version, metric) (conveyor_model_quality_expected"
                    f"{{{VERSION}}})", "{{model_version}} {{metric}} evaluation"), span=10),
        graph("Live minus evaluation",
              "Negative when the model does worse live than at evaluation; the "
              "ConveyorAccuracyDrop alert fires below -0.05 for accuracy.", "percentunit",
              query(f"model_version_metric:conveyor_model_quality:gap{{{VERSION}}}",
                    "{{model_version}} {{metric}}"), span=8),
        single("Degradations (last hour)",
               "ModelDegraded events (accuracy or latency) emitted in the last hour.", "short",
               query("sum by (model_version, reason) (increase(conveyor_model_degraded_total"
                     f"{{{VERSION}}}[1h]))", "{{model_version}} {{reason}}", instant=True),
               span=6),
    ]


def models_drift() -> list[Panel]:
    drift = steps((None, "green"), (0.1, "orange"), (0.2, "red"))
    return [
        graph("Feature drift (PSI)", "Population stability index of each input feature "
              "against the training reference: 0.1 warn, 0.2 alert.", "short",
              query(f"max by (model_version, feature) (conveyor_feature_drift_psi{{{VERSION}}})",
                    "{{model_version}} {{feature}}")).thresholds(drift),
        graph("Feature drift (KS statistic)", "Two-sample Kolmogorov-Smirnov statistic of "
              "each input feature against the training reference.", "short",
              query(f"max by (model_version, feature) (conveyor_feature_drift_ks{{{VERSION}}})",
                    "{{model_version}} {{feature}}")),
        graph("Prediction drift (PSI)", "PSI of the scores against the model's predictions "
              "on the training reference.", "short",
              query(f"max by (model_version) (conveyor_prediction_drift_psi{{{VERSION}}})",
                    "{{model_version}}"), span=16).thresholds(drift),
        single("Drift detections (last hour)", "DriftDetected events emitted in the last "
               "hour, by level (warn, alert).", "short",
               query("sum by (model_version, level) (increase(conveyor_drift_detected_total"
                     f"{{{VERSION}}}[1h]))", "{{model_version}} {{level}}", instant=True),
               span=8),
    ]


DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "scoring": scoring, "pipeline": pipeline, "models": models,
}


def render(name: str) -> str:
    """The JSON of one dashboard, keys sorted, as committed."""
    encoded = JSONEncoder(sort_keys=True).encode(DASHBOARDS[name]().build())
    return json.dumps(json.loads(encoded), indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str]) -> int:
    """Write every dashboard, or with ``--check`` report the ones that differ."""
    stale = []
    for name in DASHBOARDS:
        path = DASHBOARDS_DIR / f"{name}.json"
        text = render(name)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    for path in stale:
        print(f"{path} differs from what deploy/grafana/build.py generates", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
