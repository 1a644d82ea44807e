"""SkyPilot provider, launch path: real ``sky.Task``/``sky.Resources`` checked by SkyPilot's own YAML
code, and SkyPilot's client API replaced only at the provider's seam (``_SkySDK``) by a recording
fake that answers with SkyPilot's own types (``StatusResponse``, ``sky.ClusterStatus``,
``sky.JobStatus``, ``sky.exceptions``).

SkyPilot fixes its catalog and state paths when ``sky`` is imported, so everything that needs sky runs
in ONE child interpreter (``child_main`` below) with HOME and SKY_RUNTIME_DIR pointing at a temporary
folder holding a hand-written catalog (``build_task`` validates the instance type and region against
it; nothing is downloaded). The child runs every scenario, each on its own provider and fake, and
prints plain data; each test asserts on its own scenario. Tests that need no sky run in-process.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import providers.skypilot as sp
from providers.base import LaunchFailed, LaunchRequest, Offer, PriceSource, RunState, TransientError
from providers.remote import bootstrap_script

REPO = Path(__file__).resolve().parent.parent
MARK = "@@SKY-LAUNCH@@"
ATTEMPT = "j0c0ffee.2"  # the store's attempt ids: "<job id>.<seq>"
CLUSTER = "tf-j0c0ffee-2"
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIA-secret-id-4711", "AWS_SECRET_ACCESS_KEY": "wJalr-secret-key-0815"}
SPEC = {"model": "tunefleet/tiny-llama", "method": "qlora", "resources": {"gpus": 1}}
SETUP_FAILED = sp.EXIT_SETUP_FAILED


def make_request(attempt_id: str = ATTEMPT) -> LaunchRequest:
    # AWS_ACCESS_KEY_ID is also (wrongly) in env: a secret's key must still never reach envs.
    return LaunchRequest(
        job_id="j0c0ffee", attempt_id=attempt_id, spec=SPEC, store_uri="s3://ckpt/j0c0ffee", gpus=1, cpus=4,
        log_path="/tmp/attempt.log", env={"TUNEFLEET_MODEL_CACHE": "/models", "AWS_ACCESS_KEY_ID": "from-env"},
        secrets=dict(SECRETS),
    )


# ---- the fake: stands in for _SkySDK, and nothing else ----
class FakeSDK:
    """Records every call; answers from ``answers[method]``: a value, an exception to raise, or a list
    of them consumed in order (the last one repeats)."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[Any, ...]] = []
        self.tasks: list[Any] = []

    def _answer(self, name: str, *args: Any) -> Any:
        self.calls.append((name, *args))
        answer = self.answers.get(name)
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def launch(self, task: Any, cluster: str, *, idle_minutes: int, timeout: float) -> str:
        self.tasks.append(task)
        return self._answer("launch", cluster, idle_minutes)

    def request_status(self, request_id: str, *, timeout: float) -> str | None:
        return self._answer("request_status", request_id)

    def get(self, request_id: str, *, timeout: float) -> Any:
        return self._answer("get", request_id)

    def status(self, cluster: str, *, timeout: float) -> Any:
        return self._answer("status", cluster)

    def job_status(self, cluster: str, job_id: int | None, *, timeout: float) -> dict[int | None, Any]:
        return self._answer("job_status", cluster, job_id)

    def down(self, cluster: str, *, timeout: float) -> None:
        return self._answer("down", cluster)

    def clusters(self, *, timeout: float) -> list[Any]:
        return self._answer("clusters")

    def cancel_request(self, request_id: str, *, timeout: float) -> None:
        return self._answer("cancel_request", request_id)


def status_response(cluster: str, status: Any, *, ever_up: bool = True, handle: Any = None) -> Any:
    """A cluster record as ``sky.get(sky.status(...))`` returns it (SkyPilot's own response model)."""
    from sky.schemas.api.responses import StatusResponse

    return StatusResponse.model_validate({
        "name": cluster, "launched_at": 1764300000, "handle": handle, "status": status, "autostop": 5,
        "to_down": True, "cluster_hash": "c0ffee", "cluster_ever_up": ever_up, "user_hash": "u1",
        "user_name": "tester", "workspace": "default", "is_managed": False, "nodes": 1,
    })


def as_data(status: Any) -> list[Any]:
    return [status.state.value, status.exit_code, status.detail]


def names(sdk: FakeSDK) -> list[str]:
    return [c[0] for c in sdk.calls]


# ---- child side: scenarios that need sky (run by child_main, in a fresh interpreter) ----
SCENARIOS: dict[str, Callable[[], Any]] = {}


def scenario(fn: Callable[[], Any]) -> Callable[[], Any]:
    SCENARIOS[fn.__name__] = fn
    return fn


def _offers() -> dict[str, Offer]:
    p = sp.SkyPilotProvider(clouds=["aws", "lambda", "runpod"])
    return {o.offer_id: o for o in p.offers({"resources": {"gpus": 1}}, SimpleNamespace(vram_gb=10))}


def _launched(sdk: FakeSDK) -> tuple[sp.SkyPilotProvider, dict[str, Any]]:
    p = sp.SkyPilotProvider(sdk=sdk)  # type: ignore[arg-type]
    return p, p.launch(make_request(), _offers()["aws/us-east-1/g5.xlarge:spot"])


@scenario
def task() -> dict[str, Any]:
    import sky

    offers = _offers()
    picked = {
        "aws_spot": offers["aws/us-east-1/g5.xlarge:spot"],
        "lambda": offers["lambda/us-east-1/gpu_1x_a10"],
        # tunefleet's GPU name differs from SkyPilot's: the task must use SkyPilot's.
        "runpod_spot": replace(offers["runpod/US/1x_RTX4090_SECURE:spot"], gpu="GeForce RTX 4090 (tunefleet)"),
    }
    out: dict[str, Any] = {}
    p = sp.SkyPilotProvider()
    for key, offer in picked.items():
        built = p.build_task(make_request(), offer)
        config = built.to_yaml_config()
        back = sky.Task.from_yaml_config(copy.deepcopy(config))  # SkyPilot's own schema validation
        (res,) = list(back.resources)
        auto = res.autostop_config
        out[key] = {
            "price": offer.usd_per_hour,
            "types": [isinstance(built, sky.Task), all(isinstance(r, sky.Resources) for r in built.resources),
                      isinstance(back, sky.Task)],
            "config": config,
            "redacted_secrets": built.to_yaml_config(use_user_specified_yaml=True).get("secrets"),
            "secret_types": sorted({type(v).__name__ for v in built.secrets.values()}),
            "secret_strs": sorted({str(v) for v in built.secrets.values()}),
            "built_envs": dict(built.envs),
            "back": {
                "name": back.name, "setup": back.setup, "run": back.run, "envs": dict(back.envs),
                "secrets": {k: v.get_secret_value() for k, v in back.secrets.items()},
                "accelerators": res.accelerators, "use_spot": res.use_spot, "cloud": str(res.cloud),
                "region": res.region, "instance_type": res.instance_type, "max_hourly_cost": res.max_hourly_cost,
                "infra": res.infra.to_str(), "disk_size": res.disk_size,
                "autostop": [auto.enabled, auto.idle_minutes, auto.down] if auto else None,
            },
        }
    return out


@scenario
def launch() -> dict[str, Any]:
    import sky

    sdk = FakeSDK(launch="req-launch-1")
    p, handle = _launched(sdk)
    rebuilt = p.build_task(make_request(), _offers()["aws/us-east-1/g5.xlarge:spot"])
    (sent,) = sdk.tasks
    return {
        "handle": handle, "json": json.loads(json.dumps(handle)), "calls": sdk.calls,
        "is_task": isinstance(sent, sky.Task),
        "sent": sent.to_yaml_config(), "rebuilt": rebuilt.to_yaml_config(),
        "autodown_minutes": p.autodown_idle_minutes, "name_again": sp.cluster_name(ATTEMPT),
    }


@scenario
def launch_errors() -> dict[str, str]:
    import sky

    offer = _offers()["aws/us-east-1/g5.xlarge:spot"]
    raised = {
        "no_capacity": sky.exceptions.ResourcesUnavailableError("Failed to provision all launchable resources"),
        "unreachable": sky.exceptions.ApiServerConnectionError("http://127.0.0.1:46580"),
        "refused": ValueError("Invalid cluster name"),
    }
    out = {}
    for key, exc in raised.items():
        try:
            sp.SkyPilotProvider(sdk=FakeSDK(launch=exc)).launch(make_request(), offer)  # type: ignore[arg-type]
            out[key] = "no error"
        except Exception as err:  # noqa: BLE001
            out[key] = type(err).__name__
    return out


@scenario
def poll_pending() -> dict[str, Any]:
    sdk = FakeSDK(launch="req-1", request_status=["PENDING", "RUNNING"])
    p, handle = _launched(sdk)
    return {"polls": [as_data(p.poll(handle)), as_data(p.poll(handle))], "calls": names(sdk)}


@scenario
def poll_launch_failed() -> dict[str, Any]:
    import sky

    error = sky.exceptions.ResourcesUnavailableError(
        "Failed to provision all possible launchable resources. Relax the task's resource requirements")
    sdk = FakeSDK(launch="req-1", request_status="FAILED", get=error)
    p, handle = _launched(sdk)
    first = as_data(p.poll(handle))
    asked = len(sdk.calls)
    again = as_data(p.poll(handle))  # the end is kept: the cluster autodowns after
    cancelled = FakeSDK(launch="req-2", request_status="CANCELLED")
    q, other = _launched(cancelled)
    return {"first": first, "again": again, "calls_after_first": asked, "calls_after_again": len(sdk.calls),
            "get_asked": [c for c in sdk.calls if c[0] == "get"], "cancelled": as_data(q.poll(other))}


@scenario
def poll_running_then_lost() -> dict[str, Any]:
    import sky

    up = status_response(CLUSTER, sky.ClusterStatus.UP)
    sdk = FakeSDK(launch="req-1", request_status="SUCCEEDED", get=(7, SimpleNamespace(cluster_name=CLUSTER)),
                  status=[up, None], job_status={7: sky.JobStatus.RUNNING})
    p, handle = _launched(sdk)
    running = as_data(p.poll(handle))
    calls_running = list(sdk.calls)
    lost = as_data(p.poll(handle))  # the cluster vanished after it was up: spot reclaimed
    stopped_sdk = FakeSDK(launch="req-2", request_status="SUCCEEDED", get=(1, None),
                          status=[status_response(CLUSTER, sky.ClusterStatus.UP),
                                  status_response(CLUSTER, sky.ClusterStatus.STOPPED)],
                          job_status={1: sky.JobStatus.RUNNING})
    q, other = _launched(stopped_sdk)
    return {"running": running, "calls_running": calls_running, "lost": lost, "calls_lost": sdk.calls,
            "stopped": [as_data(q.poll(other)), as_data(q.poll(other))]}


@scenario
def poll_job_end() -> dict[str, Any]:
    import sky

    out = {}
    for status in (sky.JobStatus.SUCCEEDED, sky.JobStatus.FAILED, sky.JobStatus.FAILED_SETUP,
                   sky.JobStatus.SETTING_UP):
        sdk = FakeSDK(launch="req-1", request_status="SUCCEEDED", get=(2, None),
                      status=status_response(CLUSTER, sky.ClusterStatus.UP), job_status={2: status})
        p, handle = _launched(sdk)
        out[status.value] = as_data(p.poll(handle))
    autostopping = FakeSDK(launch="req-1", request_status="SUCCEEDED", get=(2, None),
                           status=status_response(CLUSTER, sky.ClusterStatus.AUTOSTOPPING),
                           job_status={2: sky.JobStatus.SUCCEEDED})
    p, handle = _launched(autostopping)
    out["AUTOSTOPPING+SUCCEEDED"] = as_data(p.poll(handle))
    return out


@scenario
def poll_errors() -> dict[str, Any]:
    import sky

    up = status_response(CLUSTER, sky.ClusterStatus.UP)
    cases = {
        "status_raises": dict(request_status="SUCCEEDED", get=(1, None), status=RuntimeError("boom")),
        "request_status_times_out": dict(request_status=TransientError("SkyPilot did not answer within 20 s")),
        "job_status_not_up": dict(request_status="SUCCEEDED", get=(1, None), status=up,
                                  job_status=sky.exceptions.ClusterNotUpError("cluster is not up")),
        "server_unreachable_on_get": dict(request_status="FAILED",
                                          get=sky.exceptions.ApiServerConnectionError("http://127.0.0.1:46580")),
    }
    out: dict[str, Any] = {}
    for key, answers in cases.items():
        p, handle = _launched(FakeSDK(launch="req-1", **answers))
        out[key] = as_data(p.poll(handle))
    # Not stuck: the next poll, SkyPilot reachable again, tells the truth.
    sdk = FakeSDK(launch="req-1", request_status="SUCCEEDED", get=(1, None), status=[RuntimeError("boom"), up],
                  job_status={1: sky.JobStatus.RUNNING})
    p, handle = _launched(sdk)
    out["recovers"] = [as_data(p.poll(handle)), as_data(p.poll(handle))]
    out["bad_handle"] = as_data(p.poll({"nope": 1}))
    return out


@scenario
def cancel() -> dict[str, Any]:
    import sky

    gone = sky.exceptions.ClusterDoesNotExist(f"Cluster {CLUSTER!r} does not exist.")
    # In flight: the launch request is cancelled, then the cluster downed; twice is fine.
    sdk = FakeSDK(launch="req-1", down=[None, gone])
    p, handle = _launched(sdk)
    p.cancel(handle)
    p.cancel(handle)
    in_flight = sdk.calls[1:]
    # Launched (a poll saw it succeed): nothing to cancel but the cluster.
    up = FakeSDK(launch="req-2", request_status="SUCCEEDED", get=(1, None),
                 status=status_response(CLUSTER, sky.ClusterStatus.UP), job_status={1: sky.JobStatus.RUNNING})
    q, other = _launched(up)
    q.poll(other)
    before = len(up.calls)
    q.cancel(other)
    launched = up.calls[before:]
    # SkyPilot unreachable: the daemon must retry, so it hears about it.
    broken = FakeSDK(launch="req-3", cancel_request=RuntimeError("api down"), down=RuntimeError("api down"))
    r, third = _launched(broken)
    try:
        r.cancel(third)
        unreachable = "no error"
    except Exception as exc:  # noqa: BLE001
        unreachable = type(exc).__name__
    release = FakeSDK(launch="req-4", down=gone)
    s, fourth = _launched(release)
    s.release(fourth)  # never raises
    return {"in_flight": in_flight, "launched": launched, "unreachable": unreachable,
            "unreachable_calls": names(broken)[1:], "release_calls": names(release)[1:]}


@scenario
def handle_for() -> dict[str, Any]:
    import sky

    launched = SimpleNamespace(launched_resources=sky.Resources(infra="aws/us-east-1", use_spot=True))
    sdk = FakeSDK(status=status_response(CLUSTER, sky.ClusterStatus.UP, handle=launched),
                  job_status={3: sky.JobStatus.RUNNING})
    p = sp.SkyPilotProvider(sdk=sdk)  # type: ignore[arg-type]
    found = p.handle_for(ATTEMPT)
    polled = as_data(p.poll(found)) if found else None
    missing = sp.SkyPilotProvider(sdk=FakeSDK(status=None)).handle_for(ATTEMPT)  # type: ignore[arg-type]
    down = FakeSDK(status=RuntimeError("api down"))
    unreachable = sp.SkyPilotProvider(sdk=down).handle_for(ATTEMPT)  # type: ignore[arg-type]
    return {"found": found, "calls": sdk.calls, "polled": polled, "missing": missing, "unreachable": unreachable}


@scenario
def real_seam_without_server() -> Any:
    """The real seam, no stand-in: with no API server running, SkyPilot's api_status answers [] (it
    never starts one); the seam says it does not know the request."""
    return sp._SkySDK().request_status("tf-no-such-request", timeout=30.0)


def child_main() -> None:
    results: dict[str, Any] = {}
    for name, fn in SCENARIOS.items():
        try:
            results[name] = {"ok": fn()}
        except BaseException:  # noqa: BLE001 - reported to the test that owns the scenario
            results[name] = {"error": traceback.format_exc()[-4000:]}
    print(MARK + json.dumps(results, default=repr))


# ---- parent side ----
@pytest.fixture(scope="module")
def sky_results(tmp_path_factory) -> dict[str, Any]:
    from tests.skypilot_catalog import sample_rows, write_catalog

    home = tmp_path_factory.mktemp("skyhome")
    write_catalog(home, sample_rows())
    env = {**os.environ, "HOME": str(home), "SKY_RUNTIME_DIR": str(home), "PYTHONPATH": str(REPO)}
    env.pop("SKYPILOT_API_SERVER_ENDPOINT", None)
    code = "from tests.test_skypilot_launch import child_main; child_main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next((x for x in proc.stdout.splitlines() if x.startswith(MARK)), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[len(MARK):])


def result(results: dict[str, Any], name: str) -> Any:
    got = results[name]
    assert "error" not in got, got.get("error")
    return got["ok"]


@pytest.mark.slow
def test_task_is_real_and_survives_skypilots_yaml_round_trip(sky_results):
    out = result(sky_results, "task")
    expected = {
        "aws_spot": ({"A10G": 1}, True, "AWS", "us-east-1", "g5.xlarge", "aws/us-east-1"),
        "lambda": ({"A10": 1}, False, "Lambda", "us-east-1", "gpu_1x_a10", "lambda/us-east-1"),
        "runpod_spot": ({"RTX4090": 1}, True, "RunPod", "US", "1x_RTX4090_SECURE", "runpod/US"),
    }
    for key, (accelerators, spot, cloud, region, instance, infra) in expected.items():
        got = out[key]
        back = got["back"]
        assert got["types"] == [True, True, True], key
        assert (back["accelerators"], back["use_spot"], back["cloud"], back["region"], back["instance_type"],
                back["infra"]) == (accelerators, spot, cloud, region, instance, infra), key
        assert got["config"]["resources"]["infra"] == infra
        assert got["config"]["resources"]["accelerators"] == accelerators
        assert got["price"] < back["max_hourly_cost"] <= got["price"] * 1.1, key
        assert back["autostop"] == [True, 5, True], key  # autodown: a lost daemon leaks no cluster
        assert back["run"] == bootstrap_script()  # the one bootstrap, shared with Vast
        assert back["setup"] is None
        assert back["envs"]["TUNEFLEET_PACKAGE"] == "tunefleet[train,s3]"  # no wheel in this request
        assert back["name"] == ATTEMPT and back["disk_size"] == 256


@pytest.mark.slow
def test_envs_carry_the_job_and_secrets_go_only_through_skypilots_secret_channel(sky_results):
    got = result(sky_results, "task")["aws_spot"]
    envs = got["back"]["envs"]
    assert envs["TUNEFLEET_JOB_ID"] == "j0c0ffee" and envs["TUNEFLEET_ATTEMPT_ID"] == ATTEMPT
    assert envs["TUNEFLEET_STORE"] == "s3://ckpt/j0c0ffee" and json.loads(envs["TUNEFLEET_SPEC_JSON"]) == SPEC
    assert envs["TUNEFLEET_MODEL_CACHE"] == "/models"
    assert got["built_envs"] == envs
    assert not set(SECRETS) & set(envs)  # a secret's key never in envs, even if the request's env has it
    for value in SECRETS.values():
        assert value not in json.dumps(envs)
        # Nowhere in the task but its secrets: not in setup, run, name or resources.
        assert value not in json.dumps({k: v for k, v in got["config"].items() if k != "secrets"})
    # SkyPilot keeps secrets as pydantic SecretStr (masked when printed) ...
    assert got["secret_types"] == ["SecretStr"] and got["secret_strs"] == ["**********"]
    # ... and the round trip keeps the real values: to_yaml_config() does NOT redact (it is what
    # sky.launch sends to the API server); only the user-facing form redacts.
    assert got["back"]["secrets"] == SECRETS
    assert got["config"]["secrets"] == SECRETS
    assert got["redacted_secrets"] == {k: "<redacted>" for k in SECRETS}


@pytest.mark.slow
def test_launch_submits_the_built_task_on_the_attempts_cluster_and_returns_a_json_handle(sky_results):
    out = result(sky_results, "launch")
    assert out["handle"] == {"cluster": CLUSTER, "request_id": "req-launch-1", "cloud": "aws", "spot": True}
    assert out["json"] == out["handle"]
    assert out["calls"] == [["launch", CLUSTER, out["autodown_minutes"]]]  # submit only: nothing waited on
    assert out["name_again"] == CLUSTER
    assert out["is_task"]
    assert out["sent"] == out["rebuilt"]  # same envs, secrets, resources, setup and run
    assert out["sent"]["envs"]["TUNEFLEET_ATTEMPT_ID"] == ATTEMPT


@pytest.mark.slow
def test_launch_errors_map_to_the_error_tree(sky_results):
    assert result(sky_results, "launch_errors") == {
        "no_capacity": "NoCapacity", "unreachable": "TransientError", "refused": "LaunchFailed"}


@pytest.mark.slow
def test_poll_a_launch_in_flight_is_pending_and_nothing_else_is_asked(sky_results):
    out = result(sky_results, "poll_pending")
    assert [p[0] for p in out["polls"]] == ["pending", "pending"]
    assert out["calls"] == ["launch", "request_status", "request_status"]


@pytest.mark.slow
def test_poll_a_failed_launch_is_exited_with_the_setup_failure_code(sky_results):
    out = result(sky_results, "poll_launch_failed")
    state, code, detail = out["first"]
    assert (state, code) == ("exited", SETUP_FAILED)
    assert code not in (0, 1, 2, 75)  # not any code the payload itself uses
    assert "setup/launch failed" in detail and "ResourcesUnavailableError" in detail
    assert "Failed to provision" in detail
    assert out["get_asked"] == [["get", "req-1"]]
    assert out["again"] == out["first"] and out["calls_after_again"] == out["calls_after_first"]
    assert out["cancelled"][:2] == ["exited", SETUP_FAILED] and "cancelled" in out["cancelled"][2]


@pytest.mark.slow
def test_poll_up_and_running_is_running_and_a_vanished_or_stopped_cluster_is_lost(sky_results):
    out = result(sky_results, "poll_running_then_lost")
    assert out["running"][0] == "running"
    assert out["calls_running"][1:] == [["request_status", "req-1"], ["get", "req-1"], ["status", CLUSTER],
                                        ["job_status", CLUSTER, 7]]
    assert out["lost"][0] == "lost" and out["lost"][1] is None
    assert out["calls_lost"][len(out["calls_running"]):] == [["status", CLUSTER]]  # the launch is not asked again
    assert [s[0] for s in out["stopped"]] == ["running", "lost"]


@pytest.mark.slow
def test_poll_a_finished_job_is_exited_with_its_code(sky_results):
    out = result(sky_results, "poll_job_end")
    assert out["SUCCEEDED"][:2] == ["exited", 0]
    assert out["FAILED"][0] == "exited" and out["FAILED"][1] not in (None, 0, SETUP_FAILED)
    assert out["FAILED_SETUP"][:2] == ["exited", SETUP_FAILED]
    assert out["SETTING_UP"][0] == "pending"
    assert out["AUTOSTOPPING+SUCCEEDED"][:2] == ["exited", 0]


@pytest.mark.slow
def test_poll_sdk_errors_are_unknown_never_raised(sky_results):
    out = result(sky_results, "poll_errors")
    for key in ("status_raises", "request_status_times_out", "job_status_not_up", "server_unreachable_on_get"):
        assert out[key][0] == "unknown", (key, out[key])
    assert "RuntimeError" in out["status_raises"][2] and "boom" in out["status_raises"][2]
    assert [s[0] for s in out["recovers"]] == ["unknown", "running"]
    assert out["bad_handle"][0] == "unknown"


@pytest.mark.slow
def test_cancel_downs_the_cluster_and_is_idempotent(sky_results):
    out = result(sky_results, "cancel")
    assert out["in_flight"] == [["cancel_request", "req-1"], ["down", CLUSTER], ["cancel_request", "req-1"],
                                ["down", CLUSTER]]  # the second down finds no cluster: fine
    assert out["launched"] == [["down", CLUSTER]]
    assert out["unreachable"] == "TransientError"
    assert out["unreachable_calls"] == ["cancel_request", "down"]  # a failed cancel does not skip the down
    assert out["release_calls"] == ["cancel_request", "down"]


@pytest.mark.slow
def test_handle_for_finds_the_attempts_cluster(sky_results):
    out = result(sky_results, "handle_for")
    assert out["found"] == {"cluster": CLUSTER, "request_id": None, "cloud": "aws", "spot": True}
    assert out["calls"][0] == ["status", CLUSTER]
    assert out["polled"][0] == "running"
    assert out["calls"][-1] == ["job_status", CLUSTER, None]  # no job id known: the cluster's last job
    assert out["missing"] is None
    assert out["unreachable"] == {"cluster": CLUSTER, "request_id": None, "cloud": None, "spot": False}


@pytest.mark.slow
def test_real_seam_reports_an_unknown_request_without_starting_a_server(sky_results):
    assert result(sky_results, "real_seam_without_server") is None


# ---- no sky needed ----
VAST_OFFER = Offer(
    provider="skypilot", offer_id="vast/US/1x_RTX4090:spot", gpu="RTX4090", gpu_count=1, vram_gb=24.0,
    usd_per_hour=0.31, interruptible=True, region="US", price_source=PriceSource.CATALOG,
    extra=(("cloud", "vast"), ("instance_type", "1x_RTX4090"), ("accelerator", "RTX4090")),
)


def test_vast_through_skypilot_is_refused_with_the_reason():
    sdk = FakeSDK(launch="req-1")
    p = sp.SkyPilotProvider(sdk=sdk)  # type: ignore[arg-type]
    for call in (p.launch, p.build_task):
        with pytest.raises(LaunchFailed) as info:
            call(make_request(), VAST_OFFER)
        text = str(info.value)
        assert "SkyPilot 0.14.1" in text and "different GPU" in text
        assert "tunefleet rents Vast directly" in text
    assert sdk.calls == [] and sdk.tasks == []


def test_the_fake_has_the_seams_signatures():
    public = [n for n, f in vars(sp._SkySDK).items() if callable(f) and not n.startswith("_")]
    assert sorted(public) == sorted(n for n, f in vars(FakeSDK).items() if callable(f) and not n.startswith("_"))
    for name in public:
        assert inspect.signature(getattr(FakeSDK, name)) == inspect.signature(getattr(sp._SkySDK, name)), name


def test_cluster_names_are_deterministic_and_distinct():
    assert sp.cluster_name(ATTEMPT) == CLUSTER == sp.cluster_name(ATTEMPT)
    made = {sp.cluster_name(a) for a in (ATTEMPT, "j0c0ffee.3", "J0C0FFEE.2", "j0c0ffee-2", "x" * 80 + ".1")}
    assert len(made) == 5
    assert all(len(n) <= 60 and n.startswith("tf-") for n in made)


def test_deadline_returns_raises_or_gives_up():
    assert sp._deadline(lambda: 42, 5.0, "answer") == 42
    with pytest.raises(ValueError, match="bad"):
        sp._deadline(lambda: (_ for _ in ()).throw(ValueError("bad")), 5.0, "error")
    release = threading.Event()
    try:
        with pytest.raises(TransientError, match="did not answer"):
            sp._deadline(release.wait, 0.05, "hung")
    finally:
        release.set()


def test_map_state_without_a_cluster_after_a_successful_launch_is_lost():
    status = sp.map_state(launch=sp.LAUNCH_SUCCEEDED, cluster=None)
    assert status.state is RunState.LOST


# ---- the task SkyPilot would run, run in a machine that is really somewhere else ----
_BUILD_TASK = r"""
import json, sys
from tests.test_skypilot_launch import FakeSDK, _offers
import providers.skypilot as sp
from providers.base import LaunchRequest
request = LaunchRequest(**json.loads(open(sys.argv[1]).read()))
sdk = FakeSDK(launch="req-1")
sp.SkyPilotProvider(sdk=sdk).launch(request, _offers()["aws/us-east-1/g5.xlarge:spot"])
config = sdk.tasks[0].to_yaml_config()  # what sky.launch sends to the API server
print("@@TASK@@" + json.dumps({"run": config.get("run"), "setup": config.get("setup"),
                               "envs": config.get("envs"), "secrets": config.get("secrets")}))
"""


@pytest.mark.slow
def test_the_task_skypilot_runs_installs_the_shipped_wheel_and_trains_in_a_sandbox(tmp_path):
    """The SkyPilot stand-in: the provider's real ``sky.Task`` (built in a fresh interpreter on the
    project's catalog) is run as a cluster would run it, its ``run`` with its ``envs`` and
    ``secrets``, in a sandbox that has the dependencies but not tunefleet, against S3 on moto. The
    bootstrap installs the wheel the daemon shipped, the payload fetches its staged input, trains
    and commits its final adapter."""
    import yaml

    from infra.credentials import for_attempt
    from infra.storage import open_store
    from jobs.inputs import stage
    from jobs.spec import load_job_file
    from providers.remote import bootstrap_env, build_bundle
    from tests.s3_fixtures import aws_env, new_bucket, running_moto
    from tests.sandbox import Sandbox
    from tests.skypilot_catalog import sample_rows, write_catalog
    from tests.test_cli import EXAMPLE

    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["datasets"][0]["path"] = str((EXAMPLE.parent / doc["datasets"][0]["path"]).resolve())
    doc.update(max_steps=6, save_steps=3)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    with running_moto() as endpoint, aws_env(AWS_ACCESS_KEY_ID="AKIATUNEFLEETDAEMON02", AWS_SECRET_ACCESS_KEY="d",
                                             AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint):
        uri = f"s3://{new_bucket(endpoint)}/runs"
        store = open_store(uri)
        spec = stage({**load_job_file(tmp_path / "job.yaml").to_payload_dict(),
                      "checkpoint": {"store": uri, "keep": 2}}, store)
        creds = for_attempt(uri, "jsky", trusted_host=True, on_premises=False)
        request = {"job_id": "jsky", "attempt_id": "jsky.1", "spec": spec, "store_uri": uri, "gpus": 1, "cpus": 1,
                   "log_path": "-", "secrets": {**creds.env, **bootstrap_env(store, build_bundle())}}
        (tmp_path / "request.json").write_text(json.dumps(request))
        home = tmp_path / "skyhome"
        write_catalog(home, sample_rows())
        env = {**os.environ, "HOME": str(home), "SKY_RUNTIME_DIR": str(home), "PYTHONPATH": str(REPO)}
        env.pop("SKYPILOT_API_SERVER_ENDPOINT", None)
        built = subprocess.run([sys.executable, "-c", _BUILD_TASK, str(tmp_path / "request.json")], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=120)
        line = next((x for x in built.stdout.splitlines() if x.startswith("@@TASK@@")), None)
        assert line is not None, built.stderr[-3000:]
        task = json.loads(line[len("@@TASK@@"):])
        assert task["run"] == bootstrap_script() and not task["setup"]
        assert "TUNEFLEET_WHEEL_URL" in task["secrets"] and "TUNEFLEET_WHEEL_URL" not in task["envs"]

        cluster = Sandbox(tmp_path / "cluster")
        proc = cluster.start(["bash", "-c", task["run"]], {**task["envs"], **task["secrets"]}, tmp_path / "run.log")
        assert proc.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
        final = store.final("jsky")
        assert final is not None and final.meta["attempt_id"] == "jsky.1" and final.meta["step"] == 6
        log = (tmp_path / "run.log").read_text()
        assert "installing tunefleet-" in log and "sha256" in log and "verified" in log
