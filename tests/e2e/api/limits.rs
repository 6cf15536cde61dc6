//! Hostile and careless inputs (issue 19's table): each is refused with INVALID_ARGUMENT naming
//! its field, in a reply short enough for any client, on both databases; lists page.

use tern::api::pb;
use tern::domain::limits::MAX_ID;
use tonic::Code;

use super::{api, api_serving, bad_fields, TestDb, FAST_RETRY};

/// The status of a refused request whose problems are exactly `fields`; the message stays short
/// whatever was sent.
fn refused(r: Result<impl Sized, tonic::Status>, fields: &[&str]) -> tonic::Status {
    let Err(e) = r else {
        panic!("accepted; expected INVALID_ARGUMENT on {fields:?}")
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert_eq!(bad_fields(&e), fields, "{}", e.message());
    assert!(e.message().len() < 2000, "a long reply: {} bytes", e.message().len());
    e
}

pub(super) async fn hostile_inputs_are_refused_naming_the_field(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let mut fo = a.fo.clone();
    let mut wf = a.wf.clone();
    let start = || a.test_request(&vm);

    // A NUL byte anywhere: PostgreSQL refuses it, so it never gets that far.
    let nul = fo
        .start_test_failover(pb::StartTestFailoverRequest {
            vm_id: "a\0b".into(),
            ..start()
        })
        .await;
    refused(nul, &["vm_id"]);
    let nul = fo
        .start_test_failover(pb::StartTestFailoverRequest {
            request_id: "r\0".into(),
            ..start()
        })
        .await;
    refused(nul, &["request_id"]);
    let nul = wf
        .submit_workflow(pb::SubmitWorkflowRequest {
            definition: "test-failover".into(),
            input_json: r#"{"vm_id": "a\u0000b"}"#.into(),
            ..Default::default()
        })
        .await;
    refused(nul, &["input_json.vm_id"]);
    let nul = fo.get_vm(pb::GetVmRequest { vm_id: "\0".into() }).await;
    refused(nul, &["vm_id"]);
    // Had one reached the database, its refusal is not "unavailable, retry".
    if let Err(e) = a.store.vm_record("a\0b").await {
        assert!(!e.is_retryable(), "{e}");
    }

    // Sizes: a 1 MB vm_id, 10,000 network mappings, a 100,000-character request id.
    let huge = "x".repeat(1 << 20);
    let e = refused(
        fo.start_test_failover(pb::StartTestFailoverRequest {
            vm_id: huge.clone(),
            ..start()
        })
        .await,
        &["vm_id"],
    );
    assert!(e.message().contains("more than the 200 allowed"), "{}", e.message());
    let many = (0..10_000).map(|i| (format!("net-{i}"), format!("dest-{i}"))).collect();
    refused(
        fo.start_live_failover(pb::StartLiveFailoverRequest {
            vm_id: vm.vm_id.clone(),
            network_mappings: many,
            ..Default::default()
        })
        .await,
        &["network_mappings"],
    );
    refused(
        wf.submit_workflow(pb::SubmitWorkflowRequest {
            definition: "crash-saga".into(),
            request_id: "r".repeat(100_000),
            ..Default::default()
        })
        .await,
        &["request_id"],
    );
    refused(
        fo.cancel_failover(pb::CancelFailoverRequest {
            job_id: huge.clone(),
            reason: String::new(),
        })
        .await,
        &["job_id"],
    );
    // A malformed job id is quoted back cut short.
    let e = refused(
        fo.get_failover(pb::GetFailoverRequest {
            job_id: "j".repeat(MAX_ID),
        })
        .await,
        &["job_id"],
    );
    assert!(e.message().contains('…'), "{}", e.message());

    // A typed definition's input is checked at submit, whichever service submits it.
    refused(
        wf.submit_workflow(pb::SubmitWorkflowRequest {
            definition: "test-failover".into(),
            input_json: "{}".into(),
            ..Default::default()
        })
        .await,
        &["input_json.vm_id"],
    );
    refused(
        wf.submit_workflow(pb::SubmitWorkflowRequest {
            definition: "live-failover".into(),
            input_json: r#"{"vm_id": "v", "custom_config": {"colour": "blue"}}"#.into(),
            ..Default::default()
        })
        .await,
        &["input_json.custom_config[colour]"],
    );
    refused(
        wf.submit_workflow(pb::SubmitWorkflowRequest {
            definition: "test-failover".into(),
            input_json: r#"{"vm_id": "v", "skip_snapshot": "yes"}"#.into(),
            ..Default::default()
        })
        .await,
        &["input_json.skip_snapshot"],
    );

    // UpsertVm: every field checked, none stored.
    let good = tern::api::convert::vm(&vm);
    let upsert = |v: pb::Vm| {
        let mut fo = a.fo.clone();
        async move { fo.upsert_vm(pb::UpsertVmRequest { vm: Some(v) }).await }
    };
    refused(
        upsert(pb::Vm {
            vm_id: huge.clone(),
            ..good.clone()
        })
        .await,
        &["vm.vm_id"],
    );
    refused(
        upsert(pb::Vm {
            cpu_count: u32::MAX,
            os_type: "beos".into(),
            ..good.clone()
        })
        .await,
        &["vm.cpu_count", "vm.os_type"],
    );
    let nic = pb::Nic {
        source_network: "VM Network".into(),
        ..Default::default()
    };
    refused(
        upsert(pb::Vm {
            nics: vec![nic; 10_000],
            ..good.clone()
        })
        .await,
        &["vm.nics"],
    );
    let stored = fo
        .get_vm(pb::GetVmRequest {
            vm_id: vm.vm_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored, good, "a refused upsert changed nothing");

    // ListVms pages: 25 more VMs, read 10 at a time, each once.
    for i in 0..25 {
        let v = pb::Vm {
            vm_id: format!("page-vm-{i:02}"),
            name: format!("page-{i}"),
            volume_id: format!("page-vol-{i}"),
            disks: Vec::new(),
            ..good.clone()
        };
        upsert(v).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = fo
            .list_vms(pb::ListVmsRequest {
                page_size: 10,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.vms.len() <= 10);
        seen.extend(page.vms.into_iter().map(|v| v.vm_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let total = a.store.vm_records().await.unwrap().len();
    assert_eq!(seen.len(), total);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "in vm_id order, no VM twice");
    assert!(total >= 25 + a.inv.vms.len());
}

/// The server's limits, each RESOURCE_EXHAUSTED naming the flag: message size, watch streams
/// open at once, calls per second of one principal.
pub(super) async fn limits_are_resource_exhausted_naming_the_limit(db: TestDb) {
    let a = api_serving(&db, None, FAST_RETRY, |store| tern::api::ServeOptions {
        auth: tern::api::auth::Authenticator::Principals {
            store,
            certificates: false,
        },
        limits: tern::api::gate::Limits {
            max_message_bytes: 4096,
            watches: 1,
            calls_per_second: 5,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // Principals are looked up at each call: one added now counts at once.
    let (row, token) = tern::api::auth::new_principal(
        "ci",
        tern::domain::auth::Role::Operator,
        tern::domain::auth::Credential::Token,
        tern::domain::Timestamp::now(),
    );
    a.store.add_principal(&row).await.unwrap();
    let token = token.unwrap();
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let authed = move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    };
    let mut fo =
        tern::api::pb::failover_service_client::FailoverServiceClient::with_interceptor(a.channel.clone(), authed);
    let exhausted = |e: tonic::Status, flag: &str| {
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(e.message().contains(flag), "{}", e.message());
        assert_eq!(super::reason(&e), "LIMIT_EXCEEDED");
    };

    let vm = a.vm("linux");
    let big = fo
        .start_test_failover(pb::StartTestFailoverRequest {
            vm_id: vm.vm_id.clone(),
            vm_name: "n".repeat(8000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    exhausted(big, "--max-message-size");

    let job = fo.start_test_failover(a.test_request(&vm)).await.unwrap().into_inner();
    let first = fo
        .watch_failover(pb::WatchFailoverRequest {
            job_id: job.job_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap();
    let second = fo
        .watch_failover(pb::WatchFailoverRequest {
            job_id: job.job_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap_err();
    exhausted(second, "--max-watches");
    drop(first);

    // Calls a second: a burst of twice the rate passes, then the bucket is empty.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut refused = None;
    for _ in 0..40 {
        if let Err(e) = fo.list_failovers(pb::ListFailoversRequest::default()).await {
            refused = Some(e);
            break;
        }
    }
    exhausted(refused.expect("the rate limit held"), "--rate-limit");
    // After a second or two the bucket has refilled; the dropped watch gave its slot back.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    fo.watch_failover(pb::WatchFailoverRequest {
        job_id: job.job_id.clone(),
        after_sequence: 0,
    })
    .await
    .unwrap();
}
