"""A REST client of Tern that is not ours: Python `requests` against /api/v1, as the seeds'
scripts would call it.

Checks, against a running server: the OpenAPI document (valid OpenAPI 3, and every operation it
lists is routed), readiness and every per-check VM route, network mappings CRUD, a whole test
failover followed over Server-Sent Events (resumed with Last-Event-ID: no gap, no duplicate),
idempotent starts, a cancel and its rollback, the error envelope of each error code, and on a
server with authentication the roles, 401/403 and the debug routes.

Usage: client.py CONFIG_JSON, where CONFIG_JSON is {"base": URL, "auth_base": URL, "tokens":
{"viewer": T, "operator": T}, "vms": {"test": ID, "cancel": ID, "mappings": ID}}.
"""
import json
import sys
import time
import uuid

import requests
from openapi_spec_validator import validate

NIL = "00000000-0000-4000-8000-000000000000"


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


def expect_error(resp, http, code):
    """The seeds' error envelope, with the HTTP status of its gRPC code."""
    body = resp.json()
    check(resp.status_code == http, f"{resp.request.method} {resp.url}: HTTP {resp.status_code}, wanted {http}: {body}")
    check(body["success"] is False, f"success false: {body}")
    check(body["error_code"] == code, f"error_code {code}: {body}")
    check(body["details"]["error_code"] == code, f"details.error_code: {body}")
    check(isinstance(body["error"], str) and body["error"], f"error message: {body}")
    return body


def events(base, job, last_event_id=None, headers=None):
    """The job's event stream to its end: [(id, event, data)]."""
    h = dict(headers or {})
    if last_event_id is not None:
        h["Last-Event-ID"] = str(last_event_id)
    out = []
    with requests.get(f"{base}/api/v1/failover/{job}/events", headers=h, stream=True, timeout=120) as r:
        check(r.status_code == 200, f"events: {r.status_code} {r.text[:300]}")
        check(r.headers["content-type"].startswith("text/event-stream"), r.headers["content-type"])
        ev = {}
        for line in r.iter_lines(decode_unicode=True):
            if line == "":
                if "event" in ev:
                    out.append((ev.get("id"), ev["event"], json.loads(ev["data"])))
                    if ev["event"] == "terminal":
                        break
                ev = {}
            elif line.startswith(":"):
                continue
            else:
                key, _, value = line.partition(":")
                ev[key] = value[1:] if value.startswith(" ") else value
    check(out and out[-1][1] == "terminal", f"the stream ended with a terminal event: {out[-3:]}")
    return out


def until_status(base, job, wanted, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = requests.get(f"{base}/api/v1/failover/{job}/status", timeout=30)
        check(r.status_code == 200, f"status: {r.text}")
        status = r.json()["status"]
        if status in wanted:
            return r.json()
        time.sleep(0.2)
    raise SystemExit(f"FAILED: job {job} never reached {wanted}")


def openapi(base):
    spec = requests.get(f"{base}/api/v1/openapi.json", timeout=30).json()
    validate(spec)
    check(spec["openapi"].startswith("3."), spec["openapi"])
    listed = requests.get(f"{base}/api/v1/debug/endpoints", timeout=30).json()["data"]
    documented = set()
    for path, item in spec["paths"].items():
        for method in ("get", "post", "put", "delete", "patch"):
            if method not in item:
                continue
            documented.add((method.upper(), path))
            url = base + path.replace("{job_id}", NIL).replace("{vm_id}", NIL).replace("{id}", NIL)
            # With ids that name nothing, every call is answered at once (an event stream too).
            resp = requests.request(method.upper(), url, json={}, timeout=30)
            check(resp.status_code != 405, f"{method} {path} is routed (405)")
            if resp.status_code == 404:
                check(resp.json()["error_code"] != "ROUTE_NOT_FOUND", f"{method} {path} is routed")
    check(documented == {(e["method"], e["path"]) for e in listed}, "debug/endpoints lists the document's operations")
    expect_error(requests.get(f"{base}/api/v1/nowhere", timeout=30), 404, "ROUTE_NOT_FOUND")
    print(f"openapi: valid, {len(documented)} operations, all routed")


def readiness(base, vm):
    r = requests.get(f"{base}/api/v1/failover/{vm}/readiness", timeout=30).json()
    check(r["success"] and r["is_valid"] and r["readiness_score"] == 100.0, f"readiness: {r}")
    names = {c["check_name"] for c in r["validation_result"]["checks"]}
    check({"VM Existence", "Active Jobs", "Sync Status", "Network Mappings", "Volume State"} <= names, names)
    same = requests.get(f"{base}/api/v1/vms/{vm}/failover-readiness", timeout=30).json()
    check(same["validation_result"]["checks"] == r["validation_result"]["checks"] or same["is_valid"], same)
    for route, check_name in [
        ("sync-status", "Sync Status"),
        ("volume-status", "Volume State"),
        ("network-mapping-status", "Network Mappings"),
    ]:
        body = requests.get(f"{base}/api/v1/vms/{vm}/{route}", timeout=30).json()
        check(body["success"] and body["check"]["check_name"] == check_name and body["is_valid"], f"{route}: {body}")
    volume = requests.get(f"{base}/api/v1/vms/{vm}/volume-status", timeout=30).json()["data"]
    check(volume["disks"] and volume["disks"][0]["boot"] and volume["disks"][0]["volume_id"] == volume["volume_id"], volume)
    active = requests.get(f"{base}/api/v1/vms/{vm}/active-jobs", timeout=30).json()
    check(active["has_active_jobs"] is False and active["data"] == [], active)
    config = requests.get(f"{base}/api/v1/vms/{vm}/configuration-check", timeout=30).json()["data"]
    check(config["vm"]["vm_id"] == vm and config["vm"]["cpu_count"] > 0 and config["vm"]["nics"], config)
    expect_error(requests.get(f"{base}/api/v1/failover/{NIL}/readiness", timeout=30), 404, "VM_NOT_FOUND")
    print("readiness: five checks pass; sync, volume, mapping, active-jobs and configuration routes agree")


def mappings(base, vm):
    url = f"{base}/api/v1/network-mappings"
    nets = [n["source_network"] for n in requests.get(f"{base}/api/v1/vms/{vm}", timeout=30).json()["data"]["nics"]]
    check(nets, "the VM has NICs")
    created = requests.post(
        url,
        json={"vm_id": vm, "source_network_name": nets[0], "destination_network_id": "net-rest-test",
              "destination_network_name": "Test Network", "is_test_network": True},
        timeout=30,
    )
    check(created.status_code == 200, created.text)
    mine = requests.get(f"{url}/{vm}", timeout=30).json()["data"]
    check({"vm_id": vm, "source_network_name": nets[0], "destination_network_id": "net-rest-test",
           "is_test_network": True} in mine, mine)
    replaced = requests.put(
        f"{url}/{vm}",
        json={"mappings": [
            {"source_network_name": nets[0], "destination_network_id": "net-prod-1", "is_test_network": False},
            {"source_network_name": nets[0], "destination_network_id": "net-test-1", "is_test_network": True},
        ]},
        timeout=30,
    )
    check(replaced.status_code == 200, replaced.text)
    mine = requests.get(f"{url}/{vm}", timeout=30).json()["data"]
    check(sorted(m["destination_network_id"] for m in mine) == ["net-prod-1", "net-test-1"], mine)
    everyone = requests.get(url, timeout=30).json()["data"]
    check(all(m in everyone for m in mine), "the list of all mappings holds the VM's")
    left = requests.delete(f"{url}/{vm}", params={"source_network_name": "no-such-network"}, timeout=30).json()["data"]
    check(len(left) == 2, left)
    gone = requests.delete(f"{url}/{vm}", timeout=30)
    check(gone.status_code == 200 and gone.json()["data"] == [], gone.text)
    check(requests.get(f"{url}/{vm}", timeout=30).json()["data"] == [], "all deleted")
    expect_error(requests.post(url, json={"source_network_name": "x"}, timeout=30), 400, "INVALID_ARGUMENT")
    expect_error(requests.get(f"{url}/{NIL}", timeout=30), 404, "VM_NOT_FOUND")
    bad = expect_error(
        requests.put(f"{url}/{vm}", json={"mappings": [{"vm_id": NIL, "source_network_name": "a"}]}, timeout=30),
        400, "INVALID_ARGUMENT")
    check(bad["details"]["field_violations"][0]["field"] == "mappings[0].vm_id", bad)
    print("network mappings: create, get, replace, list all, delete one and all")


def test_failover(base, vm):
    request_id = str(uuid.uuid4())
    body = {"vm_id": vm, "vm_name": "", "test_duration": "10m", "auto_cleanup": True,
            "notification_config": {"email": "ops@example.com", "page": True},
            "request_id": request_id}
    r = requests.post(f"{base}/api/v1/failover/test", json=body, timeout=30)
    check(r.status_code == 200, r.text)
    started = r.json()
    job = started["job_id"]
    check(started["success"] and started["data"]["job_type"] == "test" and started["data"]["created"], started)
    check(started["estimated_duration"] == "10m" and started["data"]["snapshot_protection"], started)
    check(r.headers["x-correlation-id"] == started["data"]["correlation_id"], "correlation header")
    # The same request id: the same job; with other fields: REQUEST_ID_REUSED.
    again = requests.post(f"{base}/api/v1/failover/test", json=body, timeout=30).json()
    check(again["job_id"] == job and again["data"]["created"] is False, again)
    by_header = dict(body, request_id="")
    again = requests.post(f"{base}/api/v1/failover/test", json=by_header, headers={"Idempotency-Key": request_id}, timeout=30)
    check(again.json()["job_id"] == job, again.text)
    reused = expect_error(requests.post(f"{base}/api/v1/failover/test", json=dict(body, test_duration="5m"), timeout=30),
                          409, "REQUEST_ID_REUSED")
    check(reused["details"]["job_id"] == job and "test_duration" in reused["details"]["fields"], reused)
    busy = expect_error(requests.post(f"{base}/api/v1/failover/test", json={"vm_id": vm}, timeout=30), 400, "VM_BUSY")
    check(job in busy["error"], busy)
    active = requests.get(f"{base}/api/v1/vms/{vm}/active-jobs", timeout=30).json()
    check(active["has_active_jobs"] and active["data"][0]["job_id"] == job, active)

    testing = until_status(base, job, {"testing"})
    check(testing["job_details"]["destination_vm_id"] and testing["job_details"]["cleanup_at"], testing)
    ended = requests.delete(f"{base}/api/v1/failover/test/{job}", timeout=30)
    check(ended.status_code == 200 and ended.json()["data"]["job_id"] == job, ended.text)
    again = requests.delete(f"{base}/api/v1/failover/test/{job}", timeout=30)
    check(again.status_code == 200, f"ending twice is accepted: {again.text}")

    stream = events(base, job)
    entries = [e for e in stream if e[1] == "entry"]
    seqs = [int(e[0]) for e in entries]
    check(seqs == list(range(1, len(seqs) + 1)), f"every entry once, in order: {seqs}")
    check([e[2]["sequence"] for e in entries] == seqs, "ids are the sequences")
    terminal = stream[-1][2]
    check(terminal["status"] == "completed" and terminal["last_sequence"] == seqs[-1], terminal)
    middle = seqs[len(seqs) // 2]
    resumed = events(base, job, last_event_id=middle)
    check([int(e[0]) for e in resumed if e[1] == "entry"] == seqs[middle:], "resumed after Last-Event-ID: no gap, no duplicate")
    resumed = events(base, job, last_event_id=seqs[-1])
    check([e[1] for e in resumed] == ["terminal"], f"resumed at the end: only the terminal event: {resumed}")

    detail = requests.get(f"{base}/api/v1/failover/jobs/{job}", timeout=30).json()["data"]
    check(detail["status"] == "completed" and detail["completed_at"], detail)
    phases = {(s["phase"], s["status"]) for s in detail["steps"]}
    check(("forward", "completed") in phases and ("teardown", "completed") in phases, phases)
    check([s["step_name"] for s in detail["steps"] if s["phase"] == "forward"][:2] == ["validation", "snapshot"], detail["steps"])
    listed = requests.get(f"{base}/api/v1/failover/jobs", params={"vm_id": vm, "type": "test", "status": "completed"}, timeout=30).json()
    check(listed["success"] and [j["job_id"] for j in listed["data"]] == [job] and listed["total"] == 1, listed)
    check(listed["data"][0]["steps"] == [], "lists leave steps out")
    status = requests.get(f"{base}/api/v1/failover/{job}/status", timeout=30).json()
    check(status["status"] == "completed" and status["progress"] == 100.0 and status["duration"] > 0, status)
    finished = expect_error(requests.post(f"{base}/api/v1/failover/{job}/cancel", json={"reason": "late"}, timeout=30),
                            400, "JOB_FINISHED")
    check(finished["details"]["correlation_id"], finished)
    expect_error(requests.post(f"{base}/api/v1/failover/{job}/resolve", json={"reason": "x", "resolved_by": "me"}, timeout=30),
                 400, "JOB_NOT_NEEDS_OPERATOR")
    print(f"test failover: {len(seqs)} journal entries streamed once each, teardown completed")
    return job


def cancel(base, vm):
    r = requests.post(f"{base}/api/v1/failover/test", json={"vm_id": vm, "test_duration": "10m", "auto_cleanup": True}, timeout=30)
    check(r.status_code == 200, r.text)
    job = r.json()["job_id"]
    until_status(base, job, {"testing"})
    cancelled = requests.post(f"{base}/api/v1/failover/{job}/cancel", json={"reason": "REST test: cancel during the hold"}, timeout=30)
    check(cancelled.status_code == 200, cancelled.text)
    terminal = events(base, job)[-1][2]
    check(terminal["status"] == "cancelled", terminal)
    detail = requests.get(f"{base}/api/v1/failover/jobs/{job}", timeout=30).json()["data"]
    rollback = [s for s in detail["steps"] if s["phase"] == "rollback"]
    check(detail["status"] == "cancelled" and rollback and all(s["status"] == "completed" for s in rollback), detail["steps"])
    check(requests.get(f"{base}/api/v1/vms/{vm}/active-jobs", timeout=30).json()["has_active_jobs"] is False, "VM free")
    print(f"cancel: rolled back ({len(rollback)} rollback steps completed)")


def live(base, vm):
    r = requests.post(f"{base}/api/v1/failover/live", json={"vm_id": vm, "notification_config": {"email": "ops@example.com"}}, timeout=30)
    check(r.status_code == 200, r.text)
    job = r.json()["job_id"]
    check(r.json()["data"]["job_type"] == "live" and r.json()["estimated_duration"] is None, r.json())
    expect_error(requests.delete(f"{base}/api/v1/failover/test/{job}", timeout=30), 400, "NOT_A_TEST_FAILOVER")
    terminal = events(base, job)[-1][2]
    check(terminal["status"] == "completed", terminal)
    detail = requests.get(f"{base}/api/v1/failover/jobs/{job}", timeout=30).json()["data"]
    check(detail["destination_vm_id"] and detail["network_mappings"], detail)
    print("live failover: completed; ending it as a test is NOT_A_TEST_FAILOVER")


def errors(base, vm):
    bad = expect_error(requests.post(f"{base}/api/v1/failover/test", json={"vm_id": vm, "auto_cleanup": True, "test_duration": "soon"}, timeout=30),
                       400, "INVALID_ARGUMENT")
    check(bad["details"]["field_violations"][0]["field"] == "test_duration", bad)
    bad = expect_error(requests.post(f"{base}/api/v1/failover/test", json={"vm_id": vm, "surprise": 1}, timeout=30), 400, "INVALID_ARGUMENT")
    check(bad["details"]["field_violations"][0]["field"] == "surprise", bad)
    bad = expect_error(requests.post(f"{base}/api/v1/failover/test", data="{not json", timeout=30), 400, "INVALID_ARGUMENT")
    bad = expect_error(requests.post(f"{base}/api/v1/failover/live", json={"vm_id": vm, "custom_config": {"cpu_count": [1]}}, timeout=30),
                       400, "INVALID_ARGUMENT")
    check(bad["details"]["field_violations"][0]["field"] == "custom_config[cpu_count]", bad)
    expect_error(requests.post(f"{base}/api/v1/failover/test", json={"vm_id": NIL}, timeout=30), 404, "VM_NOT_FOUND")
    expect_error(requests.get(f"{base}/api/v1/failover/jobs/{NIL}", timeout=30), 404, "JOB_NOT_FOUND")
    expect_error(requests.get(f"{base}/api/v1/failover/jobs", params={"status": "sleepy"}, timeout=30), 400, "INVALID_ARGUMENT")
    expect_error(requests.get(f"{base}/api/v1/failover/jobs", params={"page_size": "many"}, timeout=30), 400, "INVALID_ARGUMENT")
    expect_error(requests.get(f"{base}/api/v1/failover/{NIL}/events", headers={"Last-Event-ID": "x"}, timeout=30), 400, "INVALID_ARGUMENT")
    expect_error(requests.get(f"{base}/api/v1/failover/{NIL}/events", timeout=30), 404, "JOB_NOT_FOUND")
    expect_error(requests.post(f"{base}/api/v1/failover/{NIL}/resolve", json={"reason": "x", "resolved_by": "me"}, timeout=30), 404, "JOB_NOT_FOUND")
    print("errors: the envelope and HTTP status of each code")


def authenticated(base, tokens, vm):
    viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
    operator = {"Authorization": f"Bearer {tokens['operator']}"}
    r = requests.get(f"{base}/api/v1/failover/jobs", timeout=30)
    expect_error(r, 401, "UNAUTHENTICATED")
    check(r.headers.get("www-authenticate") == "Bearer", r.headers)
    expect_error(requests.get(f"{base}/api/v1/failover/jobs", headers={"Authorization": "Bearer tern_nope"}, timeout=30),
                 401, "UNAUTHENTICATED")
    check(requests.get(f"{base}/api/v1/failover/jobs", headers=viewer, timeout=30).status_code == 200, "a viewer lists")
    denied = expect_error(requests.post(f"{base}/api/v1/failover/test", json={"vm_id": vm}, headers=viewer, timeout=30),
                          403, "PERMISSION_DENIED")
    check("operator" in denied["error"], denied)
    expect_error(requests.post(f"{base}/api/v1/network-mappings", json={"vm_id": vm, "source_network_name": "a", "destination_network_id": "b"},
                               headers=operator, timeout=30), 403, "PERMISSION_DENIED")
    r = requests.post(f"{base}/api/v1/failover/test", json={"vm_id": NIL}, headers=operator, timeout=30)
    expect_error(r, 404, "VM_NOT_FOUND")
    check(requests.get(f"{base}/api/v1/debug/health", timeout=30).status_code == 200, "health needs no token")
    expect_error(requests.get(f"{base}/api/v1/debug/logs", timeout=30), 401, "UNAUTHENTICATED")
    expect_error(requests.get(f"{base}/api/v1/debug/endpoints", timeout=30), 401, "UNAUTHENTICATED")
    # What the lines hold is checked against a `tern server` process (tests/e2e/api/rest.rs).
    logs = requests.get(f"{base}/api/v1/debug/logs", params={"lines": 50}, headers=viewer, timeout=30)
    check(logs.status_code == 200 and len(logs.json()["data"]) <= 50, logs.text[:300])
    jobs = requests.get(f"{base}/api/v1/debug/failover-jobs", headers=viewer, timeout=30).json()
    check(jobs["success"] and "by_status" in jobs["data"], jobs)
    print("authentication: 401 with WWW-Authenticate, 403 by role, health open, logs for viewers")


def main(config):
    base, vms = config["base"], config["vms"]
    health = requests.get(f"{base}/api/v1/debug/health", timeout=30).json()
    check(health["status"] == "healthy" and health["services"][""] == "SERVING", health)
    openapi(base)
    readiness(base, vms["test"])
    mappings(base, vms["mappings"])
    errors(base, vms["test"])
    test_failover(base, vms["test"])
    cancel(base, vms["cancel"])
    live(base, vms["cancel"])
    authenticated(config["auth_base"], config["tokens"], vms["test"])
    print("REST client: all checks passed")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
