//! Search results kept for paging: a snapshot of the complete, ordered result of a search (or of
//! a `$everything`) at its first page, and the stored resources of one page.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::FhirContext;
use super::response::{apply_elements, entry_json};
use crate::fhir::FhirError;
use crate::fhir::search::SearchRequest;
use crate::fhir::storage;

/// Search result snapshots kept for paging.
const PAGE_CACHE_ENTRIES: usize = 512;
/// Ids held by all kept snapshots together (~100 bytes each): a `$everything` of a patient with
/// years of records is thousands of ids, and 512 of those held ~250 MiB in the 1M-resource
/// benchmark. The oldest snapshots go first; their `next` links then answer 410 Gone.
const PAGE_CACHE_MAX_IDS: usize = 250_000;
/// How long a search snapshot stays pageable.
const PAGE_TTL: Duration = Duration::from_secs(30 * 60);

/// A search's complete, ordered result at the time of the first page: later pages slice it, so
/// concurrent writes never shift entries between pages.
pub(super) struct Snapshot {
    pub(super) req: SearchRequest,
    pub(super) ids: Vec<String>,
    pub(super) created: Instant,
}

pub(super) fn remember(ctx: &FhirContext, snap: Arc<Snapshot>) -> String {
    let mut key = [0u8; 16];
    rand::fill(&mut key);
    let key = hex::encode(key);
    let mut pages = ctx.pages.lock().expect("page cache");
    pages.retain(|_, s| s.created.elapsed() < PAGE_TTL);
    let mut held: usize = pages.values().map(|s| s.ids.len()).sum::<usize>() + snap.ids.len();
    while !pages.is_empty() && (pages.len() >= PAGE_CACHE_ENTRIES || held > PAGE_CACHE_MAX_IDS) {
        let Some(oldest) = pages.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone())
        else {
            break;
        };
        if let Some(gone) = pages.remove(&oldest) {
            held -= gone.ids.len();
        }
    }
    pages.insert(key.clone(), snap);
    key
}

/// A stored resource as its serialised JSON.
pub(super) struct Loaded {
    rtype: String,
    id: String,
    json: String,
}

impl Loaded {
    /// The Bundle entry of this resource (`_elements` applied if asked for).
    pub(super) fn entry(self, base: &str, mode: &str, elements: &Option<Vec<String>>) -> String {
        let url = format!("{base}/{}/{}", self.rtype, self.id);
        match elements {
            None => entry_json(&url, &self.json, mode),
            Some(_) => {
                let v = serde_json::from_str::<Value>(&self.json).unwrap_or(Value::Null);
                entry_json(&url, &apply_elements(v, elements).to_string(), mode)
            }
        }
    }
}

/// The current versions of `keys` (deleted and unknown ones left out), in order.
pub(super) async fn load_resources(
    ctx: &FhirContext,
    keys: Vec<(String, String)>,
) -> Result<Vec<Loaded>, FhirError> {
    ctx.store
        .read(move |c| {
            let mut out = Vec::with_capacity(keys.len());
            for (rtype, id) in keys {
                if let Some(cur) = storage::read_current(c, &rtype, &id)?
                    && let Some(json) = cur.json
                    && !cur.deleted
                {
                    out.push(Loaded { rtype, id, json });
                }
            }
            Ok(out)
        })
        .await
        .map_err(Into::into)
}

/// `self`, `next` and `previous` links of one page of a snapshot.
pub(super) fn page_links(
    base: &str,
    key: &str,
    offset: usize,
    count: usize,
    total: usize,
) -> Vec<Value> {
    let url = |off: usize| format!("{base}?_getpages={key}&_getpagesoffset={off}&_count={count}");
    let mut links = vec![json!({"relation": "self", "url": url(offset)})];
    if offset + count < total {
        links.push(json!({"relation": "next", "url": url(offset + count)}));
    }
    if offset > 0 {
        links.push(json!({"relation": "previous", "url": url(offset.saturating_sub(count))}));
    }
    links
}
