//! The last lines of the process's log, in memory, for `GET /api/v1/debug/logs`: what `RUST_LOG`
//! lets through, as the JSON log formats it (one object a line). Nothing is kept on disk; what
//! the log never holds (secrets) is not here either.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

/// How many lines are kept.
pub const CAPACITY: usize = 2000;

/// The ring of recent lines (shared by the subscriber's layer and the readers).
#[derive(Clone, Default)]
pub struct Ring {
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl Ring {
    /// The process's ring, installed by [`super::init`] (empty when nothing was logged).
    pub fn global() -> Ring {
        static RING: OnceLock<Ring> = OnceLock::new();
        RING.get_or_init(Ring::default).clone()
    }

    /// The last `n` lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().skip(lines.len().saturating_sub(n)).cloned().collect()
    }

    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == CAPACITY {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}

/// One event's formatted line, pushed when the formatter is done with it.
pub struct Line {
    ring: Ring,
    buf: Vec<u8>,
}

impl std::io::Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        let text = text.trim_end();
        if !text.is_empty() {
            self.ring.push(text.to_string());
        }
    }
}

impl<'a> MakeWriter<'a> for Ring {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            ring: self.clone(),
            buf: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_oldest_first() {
        let ring = Ring::default();
        for i in 0..CAPACITY + 5 {
            let mut w = ring.make_writer();
            std::io::Write::write_all(&mut w, format!("{{\"n\":{i}}}\n").as_bytes()).unwrap();
        }
        let last = ring.last(3);
        assert_eq!(
            last,
            [CAPACITY + 2, CAPACITY + 3, CAPACITY + 4].map(|i| format!("{{\"n\":{i}}}"))
        );
        assert_eq!(ring.last(usize::MAX).len(), CAPACITY);
    }
}
