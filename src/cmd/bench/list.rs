//! The ListFailovers scenario: a page of jobs out of many seeded ones.

use super::*;

/// Seeds `n` finished failover jobs (and their runs, pinned to the real failover definitions)
/// straight into the database: half test, half live; 1% testing, 10% failed, the rest
/// completed; spread over 1,000 VMs. Ids sort like UUIDv7 by creation (x in the leading digits).
pub(super) async fn seed_jobs(
    backend: &str,
    url: &str,
    args: &BenchArgs,
    schema: Option<&str>,
    catalog: &tern::workflow::Catalog,
    n: usize,
) -> Result<(), BenchError> {
    let n = n as i64;
    let def = |name: &str| {
        catalog
            .get(name)
            .ok_or_else(|| BenchError::Setup(format!("no embedded definition {name}")))
    };
    let (test, live) = (def(tern::api::TEST_FAILOVER)?, def(tern::api::LIVE_FAILOVER)?);
    let defs_sql = "INSERT INTO definitions (hash, name, source, created_at) VALUES ($1, $2, $3, 0), ($4, $5, $6, 0) \
                    ON CONFLICT (hash) DO NOTHING";
    let (runs_sql, jobs_sql) = match backend {
        "sqlite" => (
            "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x < $1 - 1) \
             INSERT INTO runs (id, definition, definition_hash, correlation_id, status, display_status, state, input, \
             context, last_seq, created_at, updated_at, completed_at) \
             SELECT printf('%08x-0000-7000-8000-%012x', x, x), CASE x % 2 WHEN 0 THEN $2 ELSE $4 END, \
             CASE x % 2 WHEN 0 THEN $3 ELSE $5 END, 'seeded', 'completed', 'completed', '{\"state\":\"completed\"}', \
             '{}', '{}', 1, x, x, x FROM c",
            "INSERT INTO failover_jobs (job_id, vm_id, vm_name, job_type, status, correlation_id, created_at, \
             updated_at, completed_at) SELECT id, 'vm-' || (created_at % 1000), 'pgtest' || (created_at % 1000), \
             CASE created_at % 2 WHEN 0 THEN 'test' ELSE 'live' END, \
             CASE WHEN created_at % 100 = 0 THEN 'testing' WHEN created_at % 10 = 1 THEN 'failed' ELSE 'completed' END, \
             'seeded', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z' \
             FROM runs WHERE correlation_id = 'seeded'",
        ),
        _ => (
            "INSERT INTO runs (id, definition, definition_hash, correlation_id, status, display_status, state, input, \
             context, last_seq, created_at, updated_at, completed_at) \
             SELECT (lpad(to_hex(x), 8, '0') || '-0000-7000-8000-' || lpad(to_hex(x), 12, '0'))::uuid, \
             CASE x % 2 WHEN 0 THEN $2 ELSE $4 END, CASE x % 2 WHEN 0 THEN $3 ELSE $5 END, 'seeded', 'completed', \
             'completed', '{\"state\":\"completed\"}'::jsonb, '{}'::jsonb, '{}'::jsonb, 1, x, x, x \
             FROM generate_series(0, $1 - 1) AS x",
            "INSERT INTO failover_jobs (job_id, vm_id, vm_name, job_type, status, correlation_id, created_at, \
             updated_at, completed_at) SELECT id::text, 'vm-' || (created_at % 1000), 'pgtest' || (created_at % 1000), \
             CASE created_at % 2 WHEN 0 THEN 'test' ELSE 'live' END, \
             CASE WHEN created_at % 100 = 0 THEN 'testing' WHEN created_at % 10 = 1 THEN 'failed' ELSE 'completed' END, \
             'seeded', now(), now(), now() FROM runs WHERE correlation_id = 'seeded'",
        ),
    };
    macro_rules! seed {
        ($pool:expr) => {{
            let pool = $pool;
            sqlx::query(defs_sql)
                .bind(&test.hash)
                .bind(&test.name)
                .bind(&test.source)
                .bind(&live.hash)
                .bind(&live.name)
                .bind(&live.source)
                .execute(&pool)
                .await
                .map_err(store::StoreError::from)?;
            sqlx::query(runs_sql)
                .bind(n)
                .bind(&test.name)
                .bind(&test.hash)
                .bind(&live.name)
                .bind(&live.hash)
                .execute(&pool)
                .await
                .map_err(store::StoreError::from)?;
            sqlx::query(jobs_sql)
                .execute(&pool)
                .await
                .map_err(store::StoreError::from)?;
            sqlx::query("ANALYZE")
                .execute(&pool)
                .await
                .map_err(store::StoreError::from)?;
        }};
    }
    match backend {
        "sqlite" => seed!(sqlx::SqlitePool::connect(url).await.map_err(store::StoreError::from)?),
        _ => {
            let opts: sqlx::postgres::PgConnectOptions = args
                .postgres_url
                .parse()
                .map_err(|e: sqlx::Error| BenchError::Setup(e.to_string()))?;
            let opts = opts.options([("search_path", schema.unwrap_or("public"))]);
            seed!(sqlx::PgPool::connect_with(opts)
                .await
                .map_err(store::StoreError::from)?)
        }
    }
    Ok(())
}

/// ListFailovers through the gRPC API over `n` seeded jobs: each filter a user would use, and
/// a page deep in the list by its page token; 100 calls each, p50 and p99.
pub(super) async fn list_failovers(
    backend: &str,
    args: &BenchArgs,
    dir: &std::path::Path,
) -> Result<Vec<String>, BenchError> {
    let n = args.list_runs;
    let (store, schema, url) = backend_store(backend, args, dir).await?;
    let mut h = Harness::start(store.clone(), 4).await?;
    let seeded = Instant::now();
    seed_jobs(backend, &url, args, schema.as_deref(), &h.engine.catalog, n).await?;
    let seed_secs = seeded.elapsed().as_secs_f64();
    h.serve_api().await?;
    let channel = h
        .channel
        .clone()
        .ok_or_else(|| BenchError::Setup("no API channel".into()))?;
    let mut client = FailoverServiceClient::new(channel);
    let req = |status: &str, job_type: &str, vm: &str| pb::ListFailoversRequest {
        status: status.into(),
        job_type: job_type.into(),
        vm_id: vm.into(),
        page_size: 50,
        page_token: String::new(),
    };
    // A page token 100 pages into the whole list.
    let mut deep = req("", "", "");
    for _ in 0..100 {
        deep.page_token = client.list_failovers(deep.clone()).await?.into_inner().next_page_token;
    }
    let mut lines = Vec::new();
    for (name, r) in [
        ("no filter", req("", "", "")),
        ("status=failed", req("failed", "", "")),
        ("status=testing", req("testing", "", "")),
        ("job_type=live", req("", "live", "")),
        ("vm_id=vm-7", req("", "", "vm-7")),
        ("page 101", deep),
    ] {
        let mut lat = Vec::with_capacity(100);
        let mut got = 0;
        for _ in 0..100 {
            let t = Instant::now();
            got = client.list_failovers(r.clone()).await?.into_inner().jobs.len();
            lat.push(t.elapsed());
        }
        lat.sort();
        lines.push(format!(
            "{:<22} {:<8} {n:>7} jobs (seeded in {seed_secs:.1} s)  {name:<15} {got:>3} per page  p50 {:>6.2} ms  p99 {:>6.2} ms (target p99 < 50 ms)",
            "ListFailovers gRPC",
            backend,
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
        ));
    }
    h.stop.cancel();
    drop_schema(args, schema).await;
    Ok(lines)
}
