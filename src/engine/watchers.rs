//! Who hears about a run's commits in this process: the watchers' feeds (each sent the
//! journal entries this process commits for its run), the runs this process executes now (so
//! a watch need not poll the journal for them), and the broadcast of finished runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Engine;
use crate::domain::run::{Record, RunState};
use crate::domain::{RunId, Timestamp};
use crate::store;

#[derive(Default)]
pub(super) struct Watchers {
    feeds: HashMap<RunId, Vec<std::sync::Weak<RunFeed>>>,
    /// Runs a driver of this process holds.
    executing: HashMap<RunId, ExecutingRun>,
}

/// A run a driver of this process holds.
struct ExecutingRun {
    /// How many drivers (a run re-claimed here while its old driver winds down has two for a
    /// moment).
    drivers: usize,
    correlation_id: Arc<str>,
    /// The run's whole journal, while this process knows it in full: a run submitted and
    /// started here, every entry since committed here. A watch starts from it without a read.
    /// None for a run claimed with a history, or once it grows past [`HISTORY_MAX`].
    history: Option<Vec<store::JournalEntry>>,
}

/// Most journal entries kept in memory for a run executing here.
const HISTORY_MAX: usize = 256;

/// One watcher's view of the transitions this process commits for a run (see
/// [`Engine::watch_run`]).
#[derive(Default)]
pub struct RunFeed {
    notify: tokio::sync::Notify,
    entries: Mutex<Vec<store::JournalEntry>>,
    /// The terminal state this process committed for the run, and its last sequence number.
    finished: std::sync::OnceLock<(i64, RunState)>,
    /// A driver of this process holds the run: every transition of it is committed here and
    /// reaches the feed, so a watcher need not poll the journal for it.
    executing_here: std::sync::atomic::AtomicBool,
}

impl RunFeed {
    /// Most entries held for a watcher that does not take them; past that it reads the journal.
    const MAX: usize = 1024;

    fn push(&self, run: RunId, first_seq: i64, records: &[Record], at: Timestamp, terminal: Option<&RunState>) {
        if let Some(state) = terminal {
            let _ = self.finished.set((first_seq + records.len() as i64 - 1, state.clone()));
        }
        if let Ok(mut e) = self.entries.lock() {
            if e.len() + records.len() > Self::MAX {
                e.clear();
            }
            e.extend(entries(run, first_seq, records, at));
        }
        self.notify.notify_one();
    }

    /// The terminal state this process committed for the run, with the run's last sequence
    /// number then (a terminal run's row never moves on), once it has.
    pub fn finished(&self) -> Option<&(i64, RunState)> {
        self.finished.get()
    }

    /// Whether a driver of this process holds the run now (it may stop at any time: the feed is
    /// woken when it does).
    pub fn executing_here(&self) -> bool {
        self.executing_here.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until this process commits something for the run, or stops driving it.
    pub async fn changed(&self) {
        self.notify.notified().await
    }

    /// The entries committed since the last call with a sequence number after `last`, in order
    /// (possibly with a gap, if more were committed than it holds: the caller checks that the
    /// first follows on from `last`).
    pub fn take_after(&self, last: i64) -> Vec<store::JournalEntry> {
        let mut taken = self
            .entries
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default();
        taken.retain(|e| e.seq > last);
        taken
    }
}

/// `records` as the journal entries they were committed as, from `first_seq` on.
fn entries(
    run: RunId,
    first_seq: i64,
    records: &[Record],
    at: Timestamp,
) -> impl Iterator<Item = store::JournalEntry> + '_ {
    records.iter().enumerate().map(move |(i, r)| store::JournalEntry {
        run_id: run,
        seq: first_seq + i as i64,
        record: r.clone(),
        at,
    })
}

/// Keeps a run registered as executing in this process until dropped (see
/// [`Engine::register_executing`]).
pub(crate) struct ExecutingGuard {
    engine: Arc<Engine>,
    run: RunId,
}

impl Drop for ExecutingGuard {
    fn drop(&mut self) {
        self.engine.count_executing(self.run, None);
    }
}

impl Engine {
    /// Runs this process finishes, as they are committed (in-process waiters, the bench).
    /// A lagging receiver misses ids; combine with [`Engine::wait_terminal`] when that matters.
    pub fn subscribe_finished(&self) -> tokio::sync::broadcast::Receiver<RunId> {
        self.finished.subscribe()
    }

    pub(crate) fn announce_finished(&self, run: RunId) {
        let _ = self.finished.send(run);
    }

    /// A feed for watching `run`: each time this process commits a transition of it, the new
    /// journal entries are handed to the feed and it is woken (a stored permit, so none is
    /// missed). Runs driven by other processes are not seen here, so a watcher keeps reading
    /// the journal as well, often unless the feed says the run is executing here
    /// ([`RunFeed::executing_here`]). Dropping the feed ends the registration.
    pub fn watch_run(&self, run: RunId) -> Arc<RunFeed> {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if w.feeds.len() >= 1024 {
            w.feeds.retain(|_, feeds| {
                feeds.retain(|f| f.strong_count() > 0);
                !feeds.is_empty()
            });
        }
        let feed = Arc::new(RunFeed::default());
        if let Some(d) = w.executing.get(&run) {
            feed.executing_here.store(true, std::sync::atomic::Ordering::SeqCst);
            // The whole journal so far, so the watch starts without reading it.
            if let (Some(history), Ok(mut entries)) = (&d.history, feed.entries.lock()) {
                entries.clone_from(history);
            }
        }
        w.feeds.entry(run).or_default().push(Arc::downgrade(&feed));
        feed
    }

    /// Registers `run` as executing in this process until the guard is dropped (the driver ends,
    /// panics or is aborted, or a run handed over never reaches one); its watchers' feeds are
    /// told both ways. `journal` is the run's journal so far when it is known (a run submitted
    /// and started here: the guard is then taken at the hand-over, before the submit answers,
    /// and passed to the driver), else empty.
    pub(crate) fn register_executing(
        self: &Arc<Self>,
        run: &store::RunRow,
        journal: Vec<store::JournalEntry>,
    ) -> ExecutingGuard {
        let whole = journal.len() as i64 == run.last_seq
            && journal
                .iter()
                .enumerate()
                .all(|(i, e)| e.seq == i as i64 + 1 && e.run_id == run.id);
        self.count_executing(
            run.id,
            Some(ExecutingRun {
                drivers: 1,
                correlation_id: Arc::from(run.correlation_id.as_str()),
                history: whole.then_some(journal),
            }),
        );
        ExecutingGuard {
            engine: self.clone(),
            run: run.id,
        }
    }

    /// The correlation id of a run a driver of this process holds now (known without a read).
    pub fn executing_correlation_id(&self, run: RunId) -> Option<Arc<str>> {
        let w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        w.executing.get(&run).map(|d| d.correlation_id.clone())
    }

    /// One more driver of `run` here, or one fewer (None).
    fn count_executing(&self, run: RunId, starts: Option<ExecutingRun>) {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        let here = match (starts, w.executing.get_mut(&run)) {
            (Some(_), Some(d)) => {
                // A second driver claimed the run: what the first knew may be behind.
                d.drivers += 1;
                d.history = None;
                true
            }
            (Some(new), None) => {
                w.executing.insert(run, new);
                true
            }
            (None, Some(d)) if d.drivers > 1 => {
                d.drivers -= 1;
                true
            }
            (None, _) => {
                w.executing.remove(&run);
                false
            }
        };
        for feed in w
            .feeds
            .get(&run)
            .into_iter()
            .flatten()
            .filter_map(std::sync::Weak::upgrade)
        {
            feed.executing_here.store(here, std::sync::atomic::Ordering::SeqCst);
            if !here {
                feed.notify.notify_one();
            }
        }
    }

    /// Hands the entries just committed for `run` (from `first_seq` on) to its watchers, and
    /// the state committed with them when it is terminal.
    pub(crate) fn committed(
        &self,
        run: RunId,
        first_seq: i64,
        records: &[Record],
        at: Timestamp,
        terminal: Option<&RunState>,
    ) {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = w.executing.get_mut(&run) {
            let follows = |h: &Vec<store::JournalEntry>| {
                h.last().map(|e| e.seq + 1) == Some(first_seq) && h.len() + records.len() <= HISTORY_MAX
            };
            match &mut d.history {
                Some(h) if follows(h) => h.extend(entries(run, first_seq, records, at)),
                Some(_) => d.history = None,
                None => {}
            }
        }
        if w.feeds.is_empty() {
            return;
        }
        let feeds = match terminal {
            Some(_) => w.feeds.remove(&run).unwrap_or_default(),
            None => w.feeds.get(&run).cloned().unwrap_or_default(),
        };
        drop(w);
        for feed in feeds.iter().filter_map(std::sync::Weak::upgrade) {
            feed.push(run, first_seq, records, at, terminal);
        }
    }
}
