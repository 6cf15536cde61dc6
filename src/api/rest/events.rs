//! A job's journal as Server-Sent Events (`GET /api/v1/failover/{id}/events`): WatchFailover's
//! stream, with its no-gap, no-duplicate contract; `Last-Event-ID` is the journal sequence.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::envelope::{ErrorBody, Path, Query, RestError};
use super::views::{error_view, time, ErrorView};
use super::{Caller, Rest};
use crate::api::pb;

pub(super) fn routes() -> OpenApiRouter<Rest> {
    OpenApiRouter::new().routes(routes!(events))
}

/// `?after_sequence=` of the event stream (the `Last-Event-ID` header wins).
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Send the entries after this sequence (0: from the start).
    pub after_sequence: i64,
}

/// One journal entry, as an `entry` event's data.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EntryView {
    pub sequence: i64,
    pub at: Option<String>,
    /// e.g. step_started, step_completed, timer_set, run_finished.
    pub kind: String,
    pub step: String,
    pub phase: String,
    pub attempt: u32,
    /// The full record.
    #[schema(value_type = Object)]
    pub record: Value,
}

/// The `terminal` event's data: the job is finished.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TerminalView {
    /// completed, failed, cancelled, needs_operator.
    pub status: String,
    pub error: Option<ErrorView>,
    pub last_sequence: i64,
}

fn event_of(item: Result<pb::WatchEvent, tonic::Status>) -> Event {
    use pb::watch_event::Event as E;
    let event = match item {
        Ok(pb::WatchEvent {
            event: Some(E::Entry(e)),
        }) => Event::default()
            .event("entry")
            .id(e.sequence.to_string())
            .json_data(EntryView {
                sequence: e.sequence,
                at: time(&e.at),
                kind: e.kind,
                step: e.step,
                phase: e.phase,
                attempt: e.attempt,
                record: serde_json::from_str(&e.record_json).unwrap_or(Value::Null),
            }),
        Ok(pb::WatchEvent {
            event: Some(E::Terminal(t)),
        }) => Event::default().event("terminal").json_data(TerminalView {
            status: t.status,
            error: error_view(&t.error),
            last_sequence: t.last_sequence,
        }),
        Ok(pb::WatchEvent { event: None }) => return Event::default().comment("empty"),
        Err(status) => {
            let e = RestError::from(status);
            Event::default()
                .event("error")
                .json_data(serde_json::json!({"success": false, "error": e.message(), "error_code": e.error_code()}))
        }
    };
    event.unwrap_or_else(|_| Event::default().comment("unencodable"))
}

/// A job's journal as Server-Sent Events.
///
/// Every entry after `Last-Event-ID` (or `after_sequence`) as an `entry` event whose id is its
/// sequence, in order, once; then a `terminal` event, and the stream ends. Reconnecting with the last id seen leaves no gap and
/// no duplicate.
#[utoipa::path(get, path = "/api/v1/failover/{id}/events", tag = "failover",
    params(("id" = String, Path, description = "The job id"),
           ("Last-Event-ID" = Option<String>, Header, description = "The last sequence received"),
           EventsQuery),
    responses(
        (status = 200, description = "`entry` events (EntryView), then one `terminal` event (TerminalView)", content_type = "text/event-stream", body = String),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
    ))]
async fn events(
    State(rest): State<Rest>,
    caller: Caller,
    Path(job_id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, RestError> {
    let after_sequence = match caller.headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| RestError::field("Last-Event-ID", "must be a journal sequence (an integer)"))?,
        None => q.after_sequence,
    };
    let stream = rest
        .failover()
        .watch_failover(caller.request(pb::WatchFailoverRequest { job_id, after_sequence }))
        .await?
        .into_inner();
    let stop = rest.stop.clone().cancelled_owned();
    let events = stream.map(|item| Ok(event_of(item))).take_until(stop);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
