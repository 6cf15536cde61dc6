//! Watching a run: every committed journal entry after a sequence number, in order and once,
//! then a terminal event. A client that reconnects with the last sequence it saw gets no gap
//! and no duplicate, because the stream is read back from the journal itself.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tonic::Status;

use super::convert;
use super::error::ApiError;
use super::pb;
use super::pb::watch_event::Event;
use crate::domain::RunId;
use crate::engine::Engine;
use crate::store::JournalEntry;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// How often an idle watch first looks at the journal when nothing told it to (then less often,
/// up to [`POLL_MAX`], while it finds nothing new). A run driven by this
/// process wakes its watchers as each transition commits ([`Engine::watch_run`]); the poll
/// covers runs driven by other processes. (The store's wake-up channel is not used: it hands
/// out one stored permit that a worker must get.)
const POLL: Duration = Duration::from_millis(100);
/// The longest wait between two polls: while a poll finds nothing new, the next waits twice as
/// long (a run asleep in its hold, or queued for a free slot, is not read ten times a second
/// for as long as it is watched); once one finds entries, polls are [`POLL`] apart again.
const POLL_MAX: Duration = Duration::from_secs(1);
/// The same while a driver of this process holds the run: its commits reach the feed, and the
/// feed is woken when the driver stops, so this is only a safety net.
const POLL_DRIVEN_HERE: Duration = Duration::from_secs(2);
const BATCH: u32 = 500;

/// Streams `run`'s journal after `after`, then its terminal event. The run must exist.
///
/// The history comes from the journal. After that, entries this process commits arrive through
/// the run's feed ([`Engine::watch_run`]) without a read; whenever what the feed holds does not
/// follow on from the last entry sent (a run driven elsewhere, or a feed that overflowed), the
/// journal is read instead.
pub fn watch(engine: Arc<Engine>, run: RunId, after: i64, correlation_id: String) -> WatchStream {
    let (tx, rx) = mpsc::channel(64);
    let store = engine.store.clone();
    let feed = engine.watch_run(run);
    tokio::spawn(async move {
        let mut last = after;
        // A run driven here may come with its whole journal: then nothing is read.
        let mut fed: Vec<JournalEntry> = feed.take_after(last);
        let mut poll_every = POLL;
        loop {
            let sent_before = last;
            let step = async {
                let (entries, full) = match fed.first() {
                    Some(first) if first.seq == last + 1 => (std::mem::take(&mut fed), false),
                    _ => {
                        let read = store.journal(run, last, BATCH).await?;
                        let full = read.len() as u32 == BATCH;
                        (read, full)
                    }
                };
                for e in &entries {
                    let ev = pb::WatchEvent {
                        event: Some(Event::Entry(convert::entry(e))),
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return Ok::<_, ApiError>(Some(false));
                    }
                    last = e.seq;
                }
                if full {
                    return Ok(None);
                }
                // Entries but no `run_finished` yet: wait for more. Otherwise (nothing new, or the
                // run just finished) look at the row to send the terminal event at once.
                let finished = entries
                    .last()
                    .is_some_and(|e| matches!(e.record, crate::engine::machine::Record::RunFinished { .. }));
                if !entries.is_empty() && !finished {
                    return Ok(None);
                }
                // This process committed the end: the feed has the terminal state, no read needed.
                if let Some((seq, state)) = feed.finished().filter(|(seq, _)| *seq == last) {
                    let ev = pb::WatchEvent {
                        event: Some(Event::Terminal(convert::terminal_of(state, *seq))),
                    };
                    let _ = tx.send(Ok(ev)).await;
                    return Ok(Some(true));
                }
                // The run row and its journal are committed together: once the row is terminal,
                // every entry up to its last_seq is readable.
                let row = store.get_run(run).await?.ok_or(ApiError::NotFound {
                    reason: "JOB_NOT_FOUND",
                    message: format!("job {run} not found"),
                })?;
                if row.status.is_terminal() && last >= row.last_seq {
                    let ev = pb::WatchEvent {
                        event: Some(Event::Terminal(convert::terminal(&row))),
                    };
                    let _ = tx.send(Ok(ev)).await;
                    return Ok(Some(true));
                }
                Ok(None)
            };
            match step.await {
                Ok(Some(_)) => return,
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.into_status(&correlation_id))).await;
                    return;
                }
            }
            poll_every = next_poll(poll_every, last > sent_before);
            // Whatever was committed meanwhile is in the feed already: no need to wait for it.
            fed = feed.take_after(last);
            while fed.is_empty() {
                let driven = feed.driven_here();
                let poll = if driven { POLL_DRIVEN_HERE } else { poll_every };
                let woken = tokio::select! {
                    _ = feed.changed() => true,
                    _ = tokio::time::sleep(poll) => false,
                    _ = tx.closed() => return,
                };
                fed = feed.take_after(last);
                // A wake-up whose entries were taken already, while a driver here holds the run:
                // nothing can be in the journal that the feed did not get, so wait again rather
                // than read it. A poll, or the driver stopping, reads it.
                if !(fed.is_empty() && woken && driven && feed.driven_here()) {
                    break;
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The wait before the next poll, after one that waited `every` and did (or did not) find
/// entries to send.
fn next_poll(every: Duration, found: bool) -> Duration {
    if found {
        POLL
    } else {
        (every * 2).min(POLL_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_back_off_while_nothing_new_is_found_and_return_once_something_is() {
        let mut every = POLL;
        let mut waits = Vec::new();
        for _ in 0..6 {
            every = next_poll(every, false);
            waits.push(every.as_millis());
        }
        assert_eq!(waits, [200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(next_poll(POLL_MAX, true), POLL);
        assert_eq!(next_poll(POLL, true), POLL);
    }
}
