"""The gateways' links between a trace and MLflow's Prompt Registry and LoggedModels, against a real
MLflow server (PostgreSQL, S3 on moto) and the embedded sqlite store: what a user then sees in MLflow."""

from __future__ import annotations

import random
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, TraceState
from mlflow.utils.search_logged_model_utils import parse_filter_string
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from genai_mlflow import semconv as sc
from genai_mlflow.exporter import gateway as gw
from genai_mlflow.exporter import records
from genai_mlflow.exporter.gateway import GatewayError, RestGateway, StoreGateway
from genai_mlflow.exporter.records import LocalTrace, TraceTiming
from tests.exporter.test_records import PRICES, T0_MS, llm_attrs, make_span
from tests.mlflow_stack import MlflowStack
from tests.stack_fixtures import mlflow_env, mlflow_server

__all__ = ["mlflow_env", "mlflow_server"]


@dataclass
class Mlflow:
    """A gateway and MLflow's own client, on the same tracking (and registry) URI."""

    gateway: RestGateway | StoreGateway
    client: MlflowClient

    def experiment(self) -> str:
        return self.gateway.experiment_id(f"links_{uuid.uuid4().hex[:8]}", {})


@pytest.fixture(params=["sqlite", "server"])
def mlflow_at(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Mlflow:
    if request.param == "server":
        stack: MlflowStack = request.getfixturevalue("mlflow_env")
        uri = stack.tracking_uri
        gateway: RestGateway | StoreGateway = RestGateway(uri)
    else:
        monkeypatch.chdir(tmp_path)  # the default artifact root, ./mlruns
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        gateway = StoreGateway(uri)
    # What mlflow.genai.register_prompt and MlflowClient() use.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return Mlflow(gateway, MlflowClient(uri, uri))


@pytest.fixture
def server_gateway(mlflow_env: MlflowStack) -> RestGateway:
    return RestGateway(mlflow_env.tracking_uri)


def a_prompt(versions: int = 1) -> str:
    """A prompt of this test's own (tests share the server), with this many versions."""
    name = f"greeting_{uuid.uuid4().hex[:8]}"
    for n in range(1, versions + 1):
        mlflow.genai.register_prompt(name, f"Hello {{{{name}}}}, v{n}")
    return name


def a_plain_model(mlflow_at: Mlflow, experiment_id: str) -> str:
    """A registered model (not a prompt) with a version 1."""
    name = f"plain_{uuid.uuid4().hex[:8]}"
    logged = mlflow_at.client.create_logged_model(experiment_id)
    mlflow_at.client.create_registered_model(name)
    mlflow_at.client.create_model_version(name, logged.artifact_location, model_id=logged.model_id)
    return name


def land_trace(gateway: RestGateway | StoreGateway, experiment_id: str, run_id: str | None = None) -> str:
    """One LLM call as a whole trace, posted as the writer posts it; its OpenTelemetry trace id."""
    trace_id = uuid.uuid4().bytes
    span = make_span("chat gpt-4o-mini", 1, end_ms=300, attrs=llm_attrs(), kind=Span.SPAN_KIND_CLIENT)
    span.trace_id = trace_id
    request, _ = records.trace_request([LocalTrace(trace_id, [span], {"service.name": "ask-api"})], PRICES)
    gateway.post_traces(experiment_id, run_id, request)
    return trace_id.hex()


def traces(mlflow_at: Mlflow, experiment_id: str, **kwargs: Any) -> list[str]:
    found = mlflow_at.client.search_traces(locations=[experiment_id], include_spans=False, **kwargs)
    return [trace.info.trace_id for trace in found]


# ---------------------------------------------------------------------------------------------
# prompt_version_exists


def test_a_registered_prompt_version_exists(mlflow_at: Mlflow) -> None:
    name = a_prompt(versions=2)
    assert mlflow_at.gateway.prompt_version_exists(name, "1")
    assert mlflow_at.gateway.prompt_version_exists(name, "2")


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("prompt", "3"),  # a version it does not have
        ("prompt", "0"),
        ("prompt", "production"),  # an alias is not a version
        ("prompt", "-1"),
        ("prompt", ""),
        ("missing", "1"),
        ("a/b", "1"),  # a name no prompt can have
        ("", "1"),
    ],
)
def test_what_is_not_a_prompt_version(mlflow_at: Mlflow, name: str, version: str) -> None:
    prompt = a_prompt(versions=2)
    mlflow.genai.set_prompt_alias(prompt, alias="production", version=1)
    name = {"prompt": prompt, "missing": f"missing_{uuid.uuid4().hex[:8]}"}.get(name, name)
    assert not mlflow_at.gateway.prompt_version_exists(name, version)


def test_a_models_version_is_not_a_prompt_version(mlflow_at: Mlflow) -> None:
    model = a_plain_model(mlflow_at, mlflow_at.experiment())
    assert mlflow_at.client.get_model_version(model, "1")  # it exists, as a model's version
    assert not mlflow_at.gateway.prompt_version_exists(model, "1")
    assert not mlflow_at.gateway.prompt_version_exists(model, "2")


def test_other_failures_are_errors_not_false() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it once closed
    with pytest.raises(GatewayError) as raised:
        RestGateway(f"http://127.0.0.1:{port}").prompt_version_exists("greeting", "1")
    assert raised.value.retryable


# ---------------------------------------------------------------------------------------------
# link_prompts


def test_linked_prompt_versions_find_the_trace(mlflow_at: Mlflow) -> None:
    name = a_prompt(versions=3)
    experiment_id = mlflow_at.experiment()
    trace_id = land_trace(mlflow_at.gateway, experiment_id)
    other = land_trace(mlflow_at.gateway, experiment_id)

    versions = [(name, "1"), (name, "2"), (name, "1")]  # a repeat, as a trace may load one twice
    mlflow_at.gateway.link_prompts(trace_id, versions)
    mlflow_at.gateway.link_prompts(trace_id, versions)  # a retry: nothing doubles

    for version in ("1", "2"):
        assert traces(mlflow_at, experiment_id, filter_string=f"prompt = '{name}/{version}'") == [
            f"tr-{trace_id}"
        ]
    assert traces(mlflow_at, experiment_id, filter_string=f"prompt = '{name}/3'") == []
    assert f"tr-{other}" in traces(mlflow_at, experiment_id)


def test_link_prompts_of_nothing_sends_nothing(mlflow_at: Mlflow) -> None:
    mlflow_at.gateway.link_prompts("0" * 32, [])  # no such trace: it would be a 404


def test_an_alias_is_not_linked(mlflow_at: Mlflow) -> None:
    trace_id = land_trace(mlflow_at.gateway, mlflow_at.experiment())
    with pytest.raises(GatewayError) as raised:
        mlflow_at.gateway.link_prompts(trace_id, [("greeting", "1"), ("greeting", "production")])
    assert not raised.value.retryable  # MLflow would answer 500, and a retry would not help


def test_a_missing_trace_is_not_retried(mlflow_at: Mlflow) -> None:
    name = a_prompt()
    with pytest.raises(GatewayError) as raised:
        mlflow_at.gateway.link_prompts(uuid.uuid4().hex, [(name, "1")])
    assert not raised.value.retryable
    assert gw._MISSING in str(raised.value)


# ---------------------------------------------------------------------------------------------
# add_prompt_experiment


def test_a_prompt_is_scoped_to_its_experiments(mlflow_at: Mlflow) -> None:
    name = a_prompt()
    first, second = mlflow_at.experiment(), mlflow_at.experiment()

    def experiment_ids() -> str:
        return str(mlflow_at.client.get_prompt(name).tags[gw._PROMPT_EXPERIMENTS])

    def listed_in(experiment_id: str) -> bool:
        found = mlflow_at.client.search_prompts(filter_string=f"experiment_id = '{experiment_id}'")
        return name in [prompt.name for prompt in found]

    assert not listed_in(first)
    mlflow_at.gateway.add_prompt_experiment(name, first)
    scoped = experiment_ids()
    assert f",{first}," in scoped and scoped.startswith(",") and scoped.endswith(",")
    mlflow_at.gateway.add_prompt_experiment(name, first)
    assert experiment_ids() == scoped

    mlflow_at.gateway.add_prompt_experiment(name, second)
    assert experiment_ids() == f"{scoped}{second},"
    assert listed_in(first) and listed_in(second)


def test_a_missing_prompt_is_not_scoped(mlflow_at: Mlflow) -> None:
    with pytest.raises(GatewayError) as raised:
        mlflow_at.gateway.add_prompt_experiment(f"missing_{uuid.uuid4().hex[:8]}", "0")
    assert not raised.value.retryable


# ---------------------------------------------------------------------------------------------
# logged_model_id


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("v1.2.3", "app-v1_2_3"),
        ('it\'s 2.0 "beta"', "app-it_s_2_0__beta_"),
        ("release/2024:01 50%", "app-release_2024_01_50_"),
        ("1.0.0+build.7-rc", "app-1_0_0+build_7-rc"),
        ("ünïcode-版本", "app-ünïcode-版本"),
        ("x') OR ('1'='1", "app-x___OR___1___1"),
    ],
)
def test_one_ready_logged_model_per_app_version(mlflow_at: Mlflow, version: str, name: str) -> None:
    experiment_id = mlflow_at.experiment()
    model_id = mlflow_at.gateway.logged_model_id(experiment_id, version)
    assert mlflow_at.gateway.logged_model_id(experiment_id, version) == model_id
    # Another process finds it in MLflow.
    assert (
        type(mlflow_at.gateway)(mlflow_at.gateway.tracking_uri).logged_model_id(experiment_id, version)
        == model_id
    )

    model = mlflow_at.client.get_logged_model(model_id)
    assert model.status == LoggedModelStatus.READY
    assert model.tags[sc.GENAI_MLFLOW_APP_VERSION] == version
    assert model.name == name
    assert model.model_type == "genai_app"
    assert model.experiment_id == experiment_id
    assert [m.model_id for m in mlflow_at.client.search_logged_models([experiment_id])] == [model_id]


def test_versions_that_share_a_name_keep_their_own_model(mlflow_at: Mlflow) -> None:
    experiment_id = mlflow_at.experiment()
    dotted = mlflow_at.gateway.logged_model_id(experiment_id, "v1.2")
    underscored = type(mlflow_at.gateway)(mlflow_at.gateway.tracking_uri).logged_model_id(
        experiment_id, "v1_2"
    )
    assert dotted != underscored
    names = {mlflow_at.client.get_logged_model(m).name for m in (dotted, underscored)}
    assert names == {"app-v1_2"}
    # Each version is per experiment.
    assert mlflow_at.gateway.logged_model_id(mlflow_at.experiment(), "v1.2") != dotted


def test_a_model_left_pending_is_made_ready(mlflow_at: Mlflow) -> None:
    experiment_id = mlflow_at.experiment()
    pending = mlflow_at.client.create_logged_model(
        experiment_id, name="app-v3", tags={sc.GENAI_MLFLOW_APP_VERSION: "v3"}
    )
    assert mlflow_at.gateway.logged_model_id(experiment_id, "v3") == pending.model_id
    assert mlflow_at.client.get_logged_model(pending.model_id).status == LoggedModelStatus.READY


# ---------------------------------------------------------------------------------------------
# link_trace_to_model


@pytest.mark.parametrize("state", ["OK", "ERROR"])
def test_a_landed_trace_is_linked_to_its_model_and_keeps_the_rest(mlflow_at: Mlflow, state: str) -> None:
    experiment_id = mlflow_at.experiment()
    run_id = mlflow_at.gateway.create_run(experiment_id, "call", T0_MS, {})
    trace_id = land_trace(mlflow_at.gateway, experiment_id, run_id)
    before = mlflow_at.client.get_trace(f"tr-{trace_id}")
    model_id = mlflow_at.gateway.logged_model_id(experiment_id, "v1.2.3")

    for _ in range(2):  # a retry changes nothing
        mlflow_at.gateway.link_trace_to_model(
            experiment_id, trace_id, TraceTiming(T0_MS, 300, state), model_id
        )

    after = mlflow_at.client.get_trace(f"tr-{trace_id}")
    assert after.info.trace_metadata[gw._MODEL_ID] == model_id
    assert after.info.state == TraceState(state)
    assert (after.info.request_time, after.info.execution_duration) == (T0_MS, 300)
    assert len(after.data.spans) == len(before.data.spans) == 1
    assert after.data.spans[0].attributes == before.data.spans[0].attributes
    assert (after.info.request_preview, after.info.response_preview) == ("What is 2+2?", "4")
    assert (
        after.info.token_usage
        == before.info.token_usage
        == {
            "input_tokens": 12,
            "output_tokens": 3,
            "total_tokens": 15,
        }
    )
    assert after.info.cost == before.info.cost
    assert after.info.tags == before.info.tags
    assert traces(mlflow_at, experiment_id, run_id=run_id) == [f"tr-{trace_id}"]
    assert traces(mlflow_at, experiment_id, model_id=model_id) == [f"tr-{trace_id}"]


def test_a_trace_in_another_experiment_than_its_model_is_found_by_the_model(mlflow_at: Mlflow) -> None:
    models_experiment, traces_experiment = mlflow_at.experiment(), mlflow_at.experiment()
    trace_id = land_trace(mlflow_at.gateway, traces_experiment)
    model_id = mlflow_at.gateway.logged_model_id(models_experiment, "v9")
    mlflow_at.gateway.link_trace_to_model(
        traces_experiment, trace_id, TraceTiming(T0_MS, 300, "OK"), model_id
    )
    assert traces(mlflow_at, traces_experiment, model_id=model_id) == [f"tr-{trace_id}"]


# ---------------------------------------------------------------------------------------------
# The requests each call makes on a server


@dataclass
class Sent:
    calls: list[tuple[str, str]]

    def __call__(self) -> list[tuple[str, str]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def sent(server_gateway: RestGateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sent]:
    record = Sent([])
    call = server_gateway.request

    def counted(method: str, endpoint: str, **kwargs: Any) -> Any:
        record.calls.append((method, endpoint.removeprefix("/api/2.0/mlflow/")))
        return call(method, endpoint, **kwargs)

    monkeypatch.setattr(server_gateway, "request", counted)
    yield record


def test_the_fewest_requests(
    server_gateway: RestGateway, sent: Sent, mlflow_env: MlflowStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_env.tracking_uri)
    gateway = server_gateway
    name = a_prompt()
    experiment_id = gateway.experiment_id(f"links_{uuid.uuid4().hex[:8]}", {})
    trace_id = land_trace(gateway, experiment_id)
    sent()

    assert gateway.prompt_version_exists(name, "1")
    assert sent() == [("GET", "model-versions/get")]
    assert not gateway.prompt_version_exists("a/b", "1") and not gateway.prompt_version_exists(name, "v1")
    assert sent() == []

    gateway.link_prompts(trace_id, [(name, "1"), (name, "1")])
    assert sent() == [("POST", "traces/link-prompts")]

    gateway.add_prompt_experiment(name, experiment_id)
    assert sent() == [("GET", "registered-models/get"), ("POST", "registered-models/set-tag")]
    gateway.add_prompt_experiment(name, experiment_id)
    assert sent() == [("GET", "registered-models/get")]

    model_id = gateway.logged_model_id(experiment_id, "v1.2.3")
    assert sent() == [
        ("POST", "logged-models/search"),
        ("POST", "logged-models"),
        ("PATCH", f"logged-models/{model_id}"),
    ]
    assert gateway.logged_model_id(experiment_id, "v1.2.3") == model_id
    assert sent() == []  # known in this process

    gateway.link_trace_to_model(experiment_id, trace_id, TraceTiming(T0_MS, 100, "OK"), model_id)
    assert sent() == [("POST", "/api/3.0/mlflow/traces")]


# ---------------------------------------------------------------------------------------------
# The pure parts


def test_the_version_filter_matches_exactly_what_mlflow_parses() -> None:
    rng = random.Random(7)
    alphabet = [*"av1.-_/:%'\"\\`() ,;=\n\té版😀", "AND", " IN ", "--", "/*", "''", "\\'"]
    for _ in range(3000):
        version = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        (comparison,) = parse_filter_string(gw._version_filter(version))
        value: Any = comparison.value  # a tuple for IN
        assert comparison.entity.key == sc.GENAI_MLFLOW_APP_VERSION
        assert value == (version,)


def test_model_names_are_valid_and_bounded() -> None:
    from mlflow.utils.validation import _validate_logged_model_name

    for version in ("v1.2.3", "'\"/:.%", "", "x" * 1000, "a\nb"):
        name = gw._model_name(version)
        _validate_logged_model_name(name)
        assert name.startswith("app-") and len(name) <= 4 + gw._MODEL_NAME_CHARS


@pytest.mark.parametrize(
    ("before", "after"),
    [("", ",5,"), (",0,", ",0,5,"), (",0,1,", ",0,1,5,"), ("0,1", ",0,1,5,"), (",15,", ",15,5,")],
)
def test_experiment_ids_are_written_as_mlflow_writes_them(before: str, after: str) -> None:
    assert gw._with_experiment(before, "5") == after
    assert gw._with_experiment(after, "5") is None


def test_times_in_json() -> None:
    assert gw._timestamp_json(1_764_235_800_123) == "2025-11-27T09:30:00.123Z"
    assert gw._timestamp_json(5) == "1970-01-01T00:00:00.005Z"
    assert gw._duration_json(300) == "0.300s"
    assert gw._duration_json(61_005) == "61.005s"
