//! Keyset paging for the list RPCs: a page size (default 20, at most 100) and a page token,
//! the id of the last item of the previous page (ids are UUIDv7, so newest first is id order).

use super::error::ApiError;
use crate::domain::RunId;

const MAX_PAGE: u32 = 100;
const DEFAULT_PAGE: u32 = 20;

/// One page asked for.
pub(crate) struct Page {
    pub size: u32,
    /// Items before this id (the previous page's last).
    pub before: Option<RunId>,
}

impl Page {
    /// Reads `page_size` and `page_token`; a token that is not one of ours names its field.
    pub fn of(page_size: u32, page_token: &str) -> Result<Page, ApiError> {
        let size = match page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let before = match page_token.trim() {
            "" => None,
            t => Some(
                t.parse::<RunId>()
                    .map_err(|_| ApiError::field("page_token", "not a token from a previous page"))?,
            ),
        };
        Ok(Page { size, before })
    }

    /// The rows to ask the store for: one more than the page, to tell whether more follow.
    pub fn limit(&self) -> u32 {
        self.size + 1
    }

    /// Cuts `rows` to the page and returns the next page's token (empty after the last page).
    pub fn cut<T>(&self, rows: &mut Vec<T>, id: impl Fn(&T) -> String) -> String {
        let more = rows.len() > self.size as usize;
        rows.truncate(self.size as usize);
        match (more, rows.last()) {
            (true, Some(last)) => id(last),
            _ => String::new(),
        }
    }
}
