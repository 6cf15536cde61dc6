//! How the processes writing to one PostgreSQL schema share the commits: each counts the
//! others (by their writer connections' `application_name`) and runs its share of the
//! group-commit loops.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::store::group::WriteJob;

/// Group-commit loops committing at once, shared by every process writing to the same
/// database schema: while one batch waits for its commit (a network round trip, then the WAL
/// flush), the next is already being written. One process alone runs all three; with more,
/// each runs its share (at least one), so that several servers do not pile up more commits
/// in flight than the database can use: more would only split the same work into smaller
/// batches (docs/performance.md has the measurements).
pub(super) const WRITERS: usize = 3;
/// How often a process counts the processes writing to its schema (see [`WRITERS`]).
const PEERS_EVERY: Duration = Duration::from_secs(1);
/// The wait before a process's first count; each next wait is twice as long, up to
/// [`PEERS_EVERY`]. Processes started together (a fleet brought up at once) thus find one
/// another within a fraction of a second, rather than each committing with all its loops, in
/// small batches, for its whole first second.
pub(super) const PEERS_FIRST: Duration = Duration::from_millis(50);
/// How long a small batch waits for more jobs while other runs are committing too (see
/// [`crate::store::group::group_writer`]): fewer, larger commits; a lone workflow never waits.
/// A process running only its share of the loops lingers as much longer, so that its batches
/// stay as large as one server's, and also waits for more jobs for three quarters of the runs
/// its worker drives (see `SharedQueue::linger_until_now`). docs/performance.md has the
/// measurements that chose it.
pub(super) const LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// Keeps `active` (the writer loops of this process that may commit) at this process's share
/// of [`WRITERS`], from the processes whose writer connections are open on the same schema
/// (their names start with `writers_of_schema`). Should the count fail, the last share stays.
/// Ends once the store is gone (nobody can queue a job): dropping `active` then lets the loops
/// that were not to commit see the queue closed, and end too.
pub(super) async fn share_commits(
    pool: PgPool,
    writers_of_schema: String,
    active: tokio::sync::watch::Sender<usize>,
    queue: tokio::sync::mpsc::WeakSender<WriteJob>,
) {
    let mut every = PEERS_FIRST;
    loop {
        tokio::time::sleep(every).await;
        every = next_peers_wait(every);
        if queue.upgrade().is_none() {
            return;
        }
        let peers = sqlx::query_scalar::<_, i64>(
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity \
             WHERE datname = current_database() AND left(application_name, $2) = $1",
        )
        .bind(&writers_of_schema)
        .bind(writers_of_schema.chars().count() as i32)
        .fetch_one(&pool)
        .await;
        match peers {
            Ok(peers) => {
                let share = WRITERS.div_ceil(usize::try_from(peers).unwrap_or(1).max(1));
                active.send_if_modified(|n| std::mem::replace(n, share) != share);
            }
            Err(e) => tracing::debug!(error = %e, "counting the processes writing to this schema"),
        }
    }
}

/// The wait before the next count of the processes on a schema, after one of `every`.
fn next_peers_wait(every: Duration) -> Duration {
    (every * 2).min(PEERS_EVERY)
}

/// The start of the writer connections' `application_name` of every process on `schema`
/// (a process adds 12 characters of its own). PostgreSQL keeps 63 bytes of a name: a schema
/// name too long to fit is cut, with a hash of the whole name, so that two schemas never share
/// a prefix and no process's own part is cut off.
pub(super) fn writers_of_schema(schema: &str) -> String {
    const ROOM: usize = 63 - "tern-writer ".len() - 1 - 12;
    if schema.len() <= ROOM {
        format!("tern-writer {schema} ")
    } else {
        let hash = Uuid::new_v5(&Uuid::NAMESPACE_OID, schema.as_bytes())
            .simple()
            .to_string();
        // Schema names are ASCII (checked in `connect`): any byte is a character boundary.
        let keep = schema.get(..ROOM - 9).unwrap_or_default();
        format!("tern-writer {keep}~{} ", &hash[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::{next_peers_wait, writers_of_schema, PEERS_FIRST};

    #[test]
    fn a_new_process_counts_its_peers_soon_then_every_second() {
        let mut every = PEERS_FIRST;
        let mut waits = vec![every.as_millis()];
        for _ in 0..6 {
            every = next_peers_wait(every);
            waits.push(every.as_millis());
        }
        assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn writer_names_fit_in_an_application_name() {
        let own = "0123456789ab";
        assert_eq!(writers_of_schema("t_1"), "tern-writer t_1 ");
        let longest = "s".repeat(63);
        let other = format!("{}x", "s".repeat(62));
        for schema in ["public", "bench_0fdc45d0d5b14ee893014167752acb35", &longest, &other] {
            let name = format!("{}{own}", writers_of_schema(schema));
            assert!(name.len() <= 63, "{name} ({} bytes)", name.len());
            assert!(name.ends_with(own));
        }
        assert_ne!(writers_of_schema(&longest), writers_of_schema(&other));
        assert!(writers_of_schema(&longest).starts_with("tern-writer sss"));
    }
}
