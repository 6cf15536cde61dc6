//! Watching a run: every committed journal entry after a sequence number, in order and once,
//! then a terminal event. A client that reconnects with the last sequence it saw gets no gap
//! and no duplicate, because the stream is read back from the journal itself.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
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
const POLL_EXECUTING_HERE: Duration = Duration::from_secs(2);
const BATCH: u32 = 500;

/// Streams `run`'s journal after `after`, then its terminal event. The run must exist.
///
/// The history comes from the journal. After that, entries this process commits arrive through
/// the run's feed ([`Engine::watch_run`]) without a read; whenever what the feed holds does not
/// follow on from the last entry sent (a run driven elsewhere, or a feed that overflowed), the
/// journal is read instead.
///
/// The stream does its work as the response polls it: no task of its own, so an entry the feed
/// gets wakes the response directly, the client's pace holds it back, and a client gone drops
/// it.
pub fn watch(
    engine: Arc<Engine>,
    run: RunId,
    after: i64,
    correlation_id: String,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> WatchStream {
    let feed = engine.watch_run(run);
    // A run executing here may come with its whole journal: then nothing is read.
    let fed = feed.take_after(after);
    let watch = Watch {
        engine,
        feed,
        run,
        last: after,
        fed,
        poll_every: POLL,
        started: false,
        _slot: slot,
    };
    let events = futures::stream::unfold(
        (watch, correlation_id, Ending::No),
        |(mut w, correlation_id, ending)| async move {
            let (events, ending) = match ending {
                Ending::Ended => return None,
                Ending::After(end) => {
                    // Pending once: tonic sends the entries it holds as a frame of their own.
                    // The next poll comes at once and gives the event, then the stream's end.
                    tokio::task::yield_now().await;
                    (vec![Ok(end)], Ending::Ended)
                }
                Ending::No => match w.next().await {
                    Ok((entries, None)) => (entries.into_iter().map(Ok).collect(), Ending::No),
                    Ok((entries, Some(end))) if entries.is_empty() => (vec![Ok(end)], Ending::Ended),
                    Ok((entries, Some(end))) => (entries.into_iter().map(Ok).collect(), Ending::After(end)),
                    Err(e) => (vec![Err(e.into_status(&correlation_id))], Ending::Ended),
                },
            };
            Some((futures::stream::iter(events), (w, correlation_id, ending)))
        },
    );
    Box::pin(futures::StreamExt::flatten(events))
}

/// Where a watch stands with its terminal event.
///
/// The terminal event goes in a DATA frame of its own, a few dozen bytes, right before the
/// trailers that end the stream, rather than at the end of its batch's entries: h2 copies a
/// frame that small into its buffer with the trailers, and the [`super::cork`] keeps them in
/// one write. The client reads the stream's end with the event, so a client that drops the
/// stream on reading the event sends no RST_STREAM (why that matters: `cork`).
enum Ending {
    /// The run has not been seen ended.
    No,
    /// The entries of the last batch are out; this terminal event goes next, alone.
    After(pb::WatchEvent),
    /// The terminal event, or an error, was sent: the stream ends.
    Ended,
}

/// A watch between two batches of events.
struct Watch {
    engine: Arc<Engine>,
    feed: Arc<crate::engine::RunFeed>,
    run: RunId,
    /// The last entry sent.
    last: i64,
    /// Entries the feed gave and not yet sent.
    fed: Vec<JournalEntry>,
    poll_every: Duration,
    /// Whether a batch was sent already (the first goes without waiting).
    started: bool,
    /// One of the server's watch slots, given back when the stream goes.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The watch streams a server lets be open at once (`--max-watches`).
#[derive(Clone)]
pub struct WatchSlots {
    open: Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl WatchSlots {
    pub fn new(limit: usize) -> WatchSlots {
        WatchSlots {
            open: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
        }
    }

    /// A slot for one more stream, or RESOURCE_EXHAUSTED naming the limit.
    pub(crate) fn take(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.open.clone().try_acquire_owned().map_err(|_| {
            ApiError::ResourceExhausted(format!(
                "more than {} watch streams are open (--max-watches); close one or retry later",
                self.limit
            ))
        })
    }
}

impl Watch {
    /// The next entries to send, and the terminal event once the run has ended: once the first
    /// batch is out, waits for more (the feed, or the next poll), then takes what followed the
    /// last entry sent.
    async fn next(&mut self) -> Result<(Vec<pb::WatchEvent>, Option<pb::WatchEvent>), ApiError> {
        if self.started {
            self.wait().await;
        }
        self.started = true;
        let sent_before = self.last;
        let (entries, full) = match self.fed.first() {
            Some(first) if first.seq == self.last + 1 => (std::mem::take(&mut self.fed), false),
            _ => {
                let read = self.engine.journal(self.run, self.last, BATCH).await?;
                let full = read.len() as u32 == BATCH;
                (read, full)
            }
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in &entries {
            out.push(pb::WatchEvent {
                event: Some(Event::Entry(convert::entry(e))),
            });
            self.last = e.seq;
        }
        self.poll_every = next_poll(self.poll_every, self.last > sent_before);
        if full {
            // More to read at once.
            self.fed.clear();
            self.started = false;
            return Ok((out, None));
        }
        // Entries but no `run_finished` yet: wait for more. Otherwise (nothing new, or the run
        // just finished) look at the row to send the terminal event at once.
        let finished = entries
            .last()
            .is_some_and(|e| matches!(e.record, crate::domain::run::Record::RunFinished { .. }));
        if !entries.is_empty() && !finished {
            return Ok((out, None));
        }
        let terminal = |t| pb::WatchEvent {
            event: Some(Event::Terminal(t)),
        };
        // This process committed the end: the feed has the terminal state, no read needed.
        if let Some((seq, state)) = self.feed.finished().filter(|(seq, _)| *seq == self.last) {
            return Ok((out, Some(terminal(convert::terminal_of(state, *seq)))));
        }
        // The run row and its journal are committed together: once the row is terminal, every
        // entry up to its last_seq is readable.
        let row = self.engine.get_run(self.run).await?.ok_or(ApiError::NotFound {
            reason: "JOB_NOT_FOUND",
            message: format!("job {} not found", self.run),
        })?;
        let end = (row.status.is_terminal() && self.last >= row.last_seq).then(|| terminal(convert::terminal(&row)));
        Ok((out, end))
    }

    /// Waits until the feed holds entries after the last one sent, or until the next poll.
    async fn wait(&mut self) {
        // Whatever was committed meanwhile is in the feed already: no need to wait for it.
        self.fed = self.feed.take_after(self.last);
        while self.fed.is_empty() {
            let here = self.feed.executing_here();
            let poll = if here { POLL_EXECUTING_HERE } else { self.poll_every };
            let woken = tokio::select! {
                _ = self.feed.changed() => true,
                _ = tokio::time::sleep(poll) => false,
            };
            self.fed = self.feed.take_after(self.last);
            // A wake-up whose entries were taken already, while a driver here holds the run:
            // nothing can be in the journal that the feed did not get, so wait again rather
            // than read it. A poll, or the driver stopping, reads it.
            if !(self.fed.is_empty() && woken && here && self.feed.executing_here()) {
                break;
            }
        }
    }
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
