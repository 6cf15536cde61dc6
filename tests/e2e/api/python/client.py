"""A Python gRPC client of Tern, generated from proto/ with grpcio-tools.

Runs a test failover with a 2-second auto-cleanup through FailoverService, follows it with
WatchFailover to the end, and checks the job, the error details of a bad request and the
correlation id metadata, and the documented limits (a NUL byte, a 1 MB vm_id, 10,000 network
mappings, 100 jobs a page, a 5 MiB message). Usage: client.py ENDPOINT VM_ID (stubs on PYTHONPATH).
"""
import sys

import grpc
from tern.v1 import failover_pb2, failover_pb2_grpc


def main(endpoint: str, vm_id: str) -> None:
    channel = grpc.insecure_channel(endpoint)
    stub = failover_pb2_grpc.FailoverServiceStub(channel)

    # A bad duration is INVALID_ARGUMENT naming the field.
    try:
        stub.StartTestFailover(
            failover_pb2.StartTestFailoverRequest(vm_id=vm_id, auto_cleanup=True, test_duration="soon")
        )
        raise SystemExit("a bad test_duration was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        assert "test_duration" in e.details(), e.details()

    # The limits the proto documents, each refused naming its field, in a short reply.
    too_much = [
        ("vm_id", failover_pb2.StartTestFailoverRequest(vm_id="a\0b")),
        ("vm_id", failover_pb2.StartTestFailoverRequest(vm_id="x" * (1 << 20))),
        ("request_id", failover_pb2.StartTestFailoverRequest(vm_id=vm_id, request_id="r" * 201)),
        (
            "network_mappings",
            failover_pb2.StartTestFailoverRequest(
                vm_id=vm_id, network_mappings={f"net-{i}": f"dest-{i}" for i in range(10_000)}
            ),
        ),
    ]
    for field, request in too_much:
        try:
            stub.StartTestFailover(request)
            raise SystemExit(f"an over-limit {field} was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert e.details().startswith(field + ":"), e.details()
            assert len(e.details()) < 2000, len(e.details())
    page = stub.ListFailovers(failover_pb2.ListFailoversRequest(page_size=100_000))
    assert len(page.jobs) <= 100
    # A message over the server's size limit (4 MiB): RESOURCE_EXHAUSTED naming the flag.
    try:
        stub.StartTestFailover(failover_pb2.StartTestFailoverRequest(vm_id="x" * (5 << 20)))
        raise SystemExit("a 5 MiB request was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert "--max-message-size" in e.details(), e.details()

    job, call = stub.StartTestFailover.with_call(
        failover_pb2.StartTestFailoverRequest(
            vm_id=vm_id, auto_cleanup=True, test_duration="2s", request_id="python-1"
        ),
        metadata=[("x-correlation-id", "python-corr-1")],
    )
    headers = dict(call.initial_metadata())
    assert headers.get("x-correlation-id") == "python-corr-1", headers
    assert job.created and job.job_type == "test", job
    again = stub.StartTestFailover(
        failover_pb2.StartTestFailoverRequest(vm_id=vm_id, auto_cleanup=True, test_duration="2s", request_id="python-1")
    )
    assert again.job_id == job.job_id and not again.created

    seqs = []
    terminal = None
    for ev in stub.WatchFailover(failover_pb2.WatchFailoverRequest(job_id=job.job_id, after_sequence=0)):
        if ev.HasField("entry"):
            seqs.append(ev.entry.sequence)
            print(f"  #{ev.entry.sequence:<3} {ev.entry.kind:<22} {ev.entry.step}")
        else:
            terminal = ev.terminal
    assert terminal is not None and terminal.status == "completed", terminal
    assert seqs == list(range(1, terminal.last_sequence + 1)), seqs

    done = stub.GetFailover(failover_pb2.GetFailoverRequest(job_id=job.job_id))
    assert done.status == "completed" and done.progress_percent == 100, done
    assert all(s.status == "completed" for s in done.steps), done.steps
    assert done.correlation_id == "python-corr-1"
    print(f"python client: job {done.job_id} completed, {len(done.steps)} steps, {len(seqs)} journal entries")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
