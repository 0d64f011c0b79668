//! The site IT status page on the admin listener (`GET /` and `/status`): one server-rendered HTML
//! page, no script, no external asset (inline CSS), refreshed by the browser every 30 s.
//!
//! Two halves, tested apart: [`gather`] / [`store_figures`] collect the figures (counts, sizes,
//! states — never a name, an identifier or a clinical value: the admin listener is
//! unauthenticated), and [`render`] turns a [`SiteStatus`] into HTML, escaping every value.

use std::fmt::Write as _;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{Store, StoreError};
use crate::sync::api::ChannelStatus;

const DAY_MS: i64 = 86_400_000;

/// Everything the page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteStatus {
    pub version: String,
    pub tenant_id: String,
    pub site_id: String,
    pub generated_at_ms: i64,
    pub uptime_secs: u64,
    pub shutting_down: bool,
    pub disk: Option<Disk>,
    /// `Err`: the store did not answer (the text of the error, which carries no data).
    pub store: Result<StoreFigures, String>,
}

/// The filesystem holding the state folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    pub total_bytes: u64,
    /// Available to the (unprivileged) service user.
    pub free_bytes: u64,
    pub used_bytes: u64,
    /// The critical floor in bytes (`storage.critical_free`: below it images are refused and
    /// `/readyz` fails).
    pub min_free_bytes: u64,
    /// The high and low watermarks of used space, in bytes (eviction runs between them).
    pub high_watermark_bytes: u64,
    pub low_watermark_bytes: u64,
    /// What the space gate makes of it (normal, above the high watermark, images refused, …).
    pub pressure: &'static str,
}

/// Figures read from the store in one read transaction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoreFigures {
    /// Database file plus its WAL.
    pub db_bytes: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Start of the current UTC day: "today" below means since then.
    pub day_start_ms: i64,
    /// Distinct studies with at least one instance received today.
    pub studies_today: u64,
    pub instances_today: u64,
    /// FHIR resource versions written today (creates, updates, deletes; local or pulled), per
    /// resource type, most first.
    pub fhir_today: Vec<(String, u64)>,
    pub channels: Vec<ChannelView>,
    pub open_conflicts: u64,
}

/// One sync channel: the queue as the store holds it, the link as the agent last reported it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChannelView {
    pub queue: ChannelStatus,
    /// `None`: the agent never reported on this channel.
    pub agent: Option<AgentReport>,
}

/// What `hms-edge-agent` last wrote to `status.<channel>`. Its `last_error` text is not carried:
/// an upstream error message may quote resource content (`hms-edge status` shows it to root).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentReport {
    pub link_up: bool,
    pub last_success_ms: Option<i64>,
    pub has_error: bool,
    pub sent: u64,
    pub bytes_sent: u64,
}

impl AgentReport {
    fn from_json(v: &serde_json::Value) -> AgentReport {
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        AgentReport {
            link_up: v.get("link").and_then(|l| l.as_str()) == Some("up"),
            last_success_ms: v
                .get("last_success_ms")
                .and_then(serde_json::Value::as_i64)
                .filter(|t| *t > 0),
            has_error: v.get("last_error").is_some_and(|e| !e.is_null()),
            sent: num("sent"),
            bytes_sent: num("bytes_sent"),
        }
    }
}

/// Start of the UTC day holding `now_ms`.
pub fn utc_day_start(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(DAY_MS)
}

/// Reads every store figure of the page in one read transaction (`now_ms` decides "today").
pub fn store_figures(
    conn: &Connection,
    root: &Path,
    now_ms: i64,
) -> Result<StoreFigures, StoreError> {
    let (db_bytes, blobs, blob_bytes) = Store::sizes(conn, root)?;
    let day_start_ms = utc_day_start(now_ms);
    let (studies_today, instances_today) = match first_instance_since(conn, day_start_ms)? {
        None => (0, 0),
        Some(first) => conn.query_row(
            "SELECT count(DISTINCT se.study_uid), count(*)
             FROM dicom_instances i JOIN dicom_series se ON se.series_uid = i.series_uid
             WHERE i.pk >= ?1 AND i.received_at >= ?2",
            params![first, day_start_ms],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?,
    };
    let mut stmt = conn.prepare_cached(
        "SELECT rtype, count(*) AS n FROM fhir_history WHERE last_updated >= ?1
         GROUP BY rtype ORDER BY n DESC, rtype",
    )?;
    let fhir_today = stmt
        .query_map([day_start_ms], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut channels = Vec::new();
    for queue in crate::sync::outbox::status(conn)? {
        let key = format!("status.{}", queue.kind);
        let agent = Store::kv_get(conn, crate::sync::internal::STATE_NS, &key)?
            .and_then(|(v, _)| serde_json::from_slice::<serde_json::Value>(&v).ok())
            .map(|v| AgentReport::from_json(&v));
        channels.push(ChannelView { queue, agent });
    }
    let open_conflicts = crate::sync::outbox::open_conflicts(conn)?;
    Ok(StoreFigures {
        db_bytes,
        blobs,
        blob_bytes,
        day_start_ms,
        studies_today,
        instances_today,
        fhir_today,
        channels,
        open_conflicts,
    })
}

/// The first `dicom_instances.pk` received at or after `since_ms`, found by bisection on the
/// rowid: rows are inserted by the single store writer, stamped with the time of their
/// transaction, so `received_at` grows with `pk` (a wall clock stepped back can misplace the
/// boundary by the rows of that step; the count below still filters on `received_at`). This keeps
/// the page at ~20 point reads however many instances the box holds, without an extra index.
fn first_instance_since(conn: &Connection, since_ms: i64) -> Result<Option<i64>, StoreError> {
    let at_or_after = |pk: i64| -> Result<Option<(i64, i64)>, StoreError> {
        Ok(conn
            .prepare_cached(
                "SELECT pk, received_at FROM dicom_instances WHERE pk >= ?1 ORDER BY pk LIMIT 1",
            )?
            .query_row([pk], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    };
    let Some((mut lo, mut hi)) =
        conn.query_row("SELECT min(pk), max(pk) FROM dicom_instances", [], |r| {
            Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
        })?
    else {
        return Ok(None);
    };
    match at_or_after(hi)? {
        Some((_, t)) if t >= since_ms => {}
        _ => return Ok(None),
    }
    // Invariant: the first row at or after `hi` is recent enough; `lo` only moves past rows
    // that are not. The predicate is monotonic in the pk because `received_at` is.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match at_or_after(mid)? {
            Some((_, t)) if t >= since_ms => hi = mid,
            _ => lo = mid + 1,
        }
    }
    Ok(at_or_after(lo)?.map(|(pk, _)| pk))
}

/// Gathers the page's figures from a running daemon.
pub async fn gather(d: &crate::server::Daemon) -> SiteStatus {
    let config = d.config();
    let now = crate::store::now_ms();
    let root = d.store.root().to_owned();
    let store =
        d.store.read(move |c| store_figures(c, &root, now)).await.map_err(|e| e.to_string());
    SiteStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        tenant_id: config.site.tenant_id.clone(),
        site_id: config.site.site_id.clone(),
        generated_at_ms: now,
        uptime_secs: d.started.elapsed().as_secs(),
        shutting_down: d.shutdown.is_cancelled(),
        disk: disk(d.store.root(), &d.store.space().policy()),
        store,
    }
}

/// Sizes of the filesystem holding `path`, and where they stand against the space policy.
pub fn disk(path: &Path, policy: &crate::store::space::SpacePolicy) -> Option<Disk> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = s.fragment_size() as u64;
    let total_bytes = s.blocks() as u64 * frag;
    let free_bytes = s.blocks_available() as u64 * frag;
    let space = crate::store::space::Space { total: total_bytes, free: free_bytes };
    Some(Disk {
        total_bytes,
        free_bytes,
        used_bytes: total_bytes.saturating_sub(s.blocks_free() as u64 * frag),
        min_free_bytes: policy.critical_free.bytes_of(total_bytes),
        high_watermark_bytes: policy.high_watermark.bytes_of(total_bytes),
        low_watermark_bytes: policy.low_watermark.bytes_of(total_bytes),
        pressure: policy.pressure(space).as_str(),
    })
}

// ---- rendering --------------------------------------------------------------------------------

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// 93784 s → "1d 2h 3m".
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

/// `2026-11-30 13:06:15 UTC` (seconds are enough for people).
pub fn human_time(ms: i64) -> String {
    let iso = crate::fhir::date::format_instant(ms);
    let (date, time) = iso.split_once('T').unwrap_or((&iso, ""));
    format!("{date} {} UTC", time.get(..8).unwrap_or(time))
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

const CSS: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f3f5f7;color:#1c2530}\
header{background:#17324d;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}\
header p{margin:4px 0 0;color:#c9d6e3;font-size:13px}\
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px;padding:16px 24px}\
section{background:#fff;border-radius:6px;padding:12px 16px;box-shadow:0 1px 2px #0002}\
section.wide{grid-column:1/-1}h2{font-size:16px;margin:0 0 8px;color:#17324d}\
table{border-collapse:collapse;width:100%;font-size:14px}\
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e3e8ee}td.n,th.n{text-align:right}\
.big{font-size:28px;font-weight:600;margin:0}.ok{color:#0a7d32}.bad{color:#b3261e}.warn{color:#9a6700}\
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:13px}\
.badge.ok{background:#0a7d32;color:#fff}.badge.bad{background:#b3261e;color:#fff}\
.badge.warn{background:#9a6700;color:#fff}.bar{height:10px;background:#e3e8ee;border-radius:5px}\
.bar>div{height:10px;border-radius:5px;background:#2f6fa7}.muted{color:#5b6b7b;font-size:13px}\
footer{padding:0 24px 16px;color:#5b6b7b;font-size:12px}";

/// Renders the page. Every value goes through [`escape`].
pub fn render(s: &SiteStatus) -> String {
    let e = |t: &str| escape(t);
    let when = human_time(s.generated_at_ms);
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"30\">\
         <title>hms-edge status: {site}</title><style>{CSS}</style></head><body>\
         <header><h1>hms-edge &middot; {site}</h1><p>tenant {tenant} &middot; version {version} \
         &middot; generated {when}</p></header><main>",
        site = e(&s.site_id),
        tenant = e(&s.tenant_id),
        version = e(&s.version),
        when = e(&when),
    );

    // Service health.
    let (store_badge, store_text) = match &s.store {
        Ok(_) => ("ok", "open".to_string()),
        Err(err) => ("bad", format!("not answering: {err}")),
    };
    let (state_badge, state_text) =
        if s.shutting_down { ("warn", "shutting down") } else { ("ok", "serving") };
    let _ = write!(
        h,
        "<section id=\"health\"><h2>Service</h2><table>\
         <tr><th>hms-edged</th><td><span class=\"badge {state_badge}\">{state}</span></td></tr>\
         <tr><th>Uptime</th><td id=\"uptime\">{uptime}</td></tr>\
         <tr><th>Version</th><td>{version}</td></tr>\
         <tr><th>Encrypted store</th><td><span id=\"store-state\" class=\"badge {store_badge}\">{store}</span></td></tr>",
        state = e(state_text),
        uptime = e(&human_duration(s.uptime_secs)),
        version = e(&s.version),
        store = e(&store_text),
    );
    if let Ok(f) = &s.store {
        for ch in &f.channels {
            let (badge, text, detail) = match &ch.agent {
                None => ("warn", "no report", "from hms-edge-agent yet".to_string()),
                Some(a) => {
                    let last = a.last_success_ms.map_or("never".to_string(), human_time);
                    let err = if a.has_error { "; last round failed" } else { "" };
                    (
                        if a.link_up && !a.has_error { "ok" } else { "bad" },
                        if a.link_up { "link up" } else { "link down" },
                        format!("last success {last}{err}"),
                    )
                }
            };
            let _ = write!(
                h,
                "<tr><th>Sync {kind}</th><td><span class=\"badge {badge}\">{text}</span> \
                 <span class=\"muted\">{detail}</span></td></tr>",
                kind = e(&ch.queue.kind),
                text = e(text),
                detail = e(&detail),
            );
        }
    }
    h.push_str("</table></section>");

    // Today.
    if let Ok(f) = &s.store {
        let _ = write!(
            h,
            "<section id=\"today\"><h2>Today <span class=\"muted\">(since {day})</span></h2>\
             <p class=\"big\" id=\"studies-today\">{studies}</p>\
             <p id=\"instances-today\">{instances} received over DICOM</p>\
             <p id=\"fhir-today\">{fhir} written</p>",
            day = e(&human_time(f.day_start_ms)),
            studies = e(&plural(f.studies_today, "study", "studies")),
            instances = e(&plural(f.instances_today, "instance", "instances")),
            fhir = e(&plural(
                f.fhir_today.iter().map(|(_, n)| n).sum(),
                "FHIR resource version",
                "FHIR resource versions"
            )),
        );
        if !f.fhir_today.is_empty() {
            h.push_str(
                "<table id=\"fhir-by-type\"><tr><th>FHIR type</th><th class=\"n\">written today</th></tr>",
            );
            for (t, n) in &f.fhir_today {
                let _ = write!(
                    h,
                    "<tr><td>{t}</td><td class=\"n\" data-type=\"{t}\">{n}</td></tr>",
                    t = e(t),
                );
            }
            h.push_str("</table>");
        }
        h.push_str("</section>");
    }

    // Disk and store sizes.
    h.push_str("<section id=\"disk\"><h2>Disk</h2>");
    match &s.disk {
        Some(d) => {
            // The bar is what the service user can no longer use (reserved blocks included).
            let pct = if d.total_bytes == 0 {
                0.0
            } else {
                100.0 - d.free_bytes as f64 * 100.0 / d.total_bytes as f64
            };
            let low = d.free_bytes < d.min_free_bytes;
            let _ = write!(
                h,
                "<div class=\"bar\"><div style=\"width:{pct:.0}%\"></div></div>\
                 <table><tr><th>State folder filesystem</th><td class=\"n\">{total}</td></tr>\
                 <tr><th>Used</th><td class=\"n\">{used}</td></tr>\
                 <tr><th>Free</th><td class=\"n {cls}\" id=\"disk-free\">{free} ({free_pct:.0}%)</td></tr>\
                 <tr><th>Free space required (/readyz; images refused below)</th><td class=\"n\">{min}</td></tr>\
                 <tr><th>Eviction (high / low watermark of used space)</th><td class=\"n\">{high} / {low}</td></tr>\
                 <tr><th>Disk state</th><td class=\"{pcls}\" id=\"disk-pressure\">{pressure}</td></tr>",
                high = e(&human_bytes(d.high_watermark_bytes)),
                low = e(&human_bytes(d.low_watermark_bytes)),
                pressure = e(d.pressure),
                pcls = if d.pressure == "normal" {
                    "ok"
                } else if low {
                    "bad"
                } else {
                    "warn"
                },
                total = e(&human_bytes(d.total_bytes)),
                used = e(&human_bytes(d.used_bytes)),
                free = e(&human_bytes(d.free_bytes)),
                min = e(&human_bytes(d.min_free_bytes)),
                free_pct = 100.0 - pct,
                cls = if low { "bad" } else { "ok" },
            );
        }
        None => h.push_str("<p class=\"bad\">cannot read the filesystem size</p><table>"),
    }
    if let Ok(f) = &s.store {
        let _ = write!(
            h,
            "<tr><th>Database (SQLCipher + WAL)</th><td class=\"n\" id=\"db-size\">{db}</td></tr>\
             <tr><th>Image files</th><td class=\"n\" id=\"blobs\">{blobs}, {bytes}</td></tr>",
            db = e(&human_bytes(f.db_bytes)),
            blobs = e(&plural(f.blobs, "file", "files")),
            bytes = e(&human_bytes(f.blob_bytes)),
        );
    }
    h.push_str("</table></section>");

    // Sync queues.
    if let Ok(f) = &s.store {
        h.push_str(
            "<section id=\"sync\" class=\"wide\"><h2>Upstream sync</h2><table>\
             <tr><th>Channel</th><th class=\"n\">Pending</th><th class=\"n\">In flight</th>\
             <th class=\"n\">Parked</th><th class=\"n\">Oldest unsynced</th><th>Link</th>\
             <th>Last success</th><th class=\"n\">Sent</th><th class=\"n\">Bytes sent</th></tr>",
        );
        for ch in &f.channels {
            let q = &ch.queue;
            let oldest = q
                .oldest_age_ms
                .map_or("-".to_string(), |ms| human_duration((ms.max(0) / 1000) as u64));
            let (link, last, sent, bytes) = match &ch.agent {
                None => ("-".to_string(), "-".to_string(), "-".to_string(), "-".to_string()),
                Some(a) => (
                    if a.link_up { "up" } else { "down" }.to_string(),
                    a.last_success_ms.map_or("never".to_string(), human_time),
                    a.sent.to_string(),
                    human_bytes(a.bytes_sent),
                ),
            };
            let _ = write!(
                h,
                "<tr id=\"queue-{kind}\"><td>{kind}</td><td class=\"n\">{pending}</td>\
                 <td class=\"n\">{leased}</td><td class=\"n {pcls}\">{parked}</td>\
                 <td class=\"n\">{oldest}</td><td>{link}</td><td>{last}</td>\
                 <td class=\"n\">{sent}</td><td class=\"n\">{bytes}</td></tr>",
                kind = e(&q.kind),
                pending = q.pending,
                leased = q.leased,
                parked = q.parked,
                pcls = if q.parked > 0 { "bad" } else { "" },
                oldest = e(&oldest),
                link = e(&link),
                last = e(&last),
                sent = e(&sent),
                bytes = e(&bytes),
            );
        }
        let parked: u64 = f.channels.iter().map(|c| c.queue.parked).sum();
        let _ = write!(
            h,
            "</table><p><span id=\"parked\" class=\"{pcls}\">{parked}</span> &middot; \
             <span id=\"conflicts\" class=\"{ccls}\">{conflicts}</span> \
             <span class=\"muted\">(details: <code>hms-edge sync parked</code>, \
             <code>hms-edge sync conflicts --open</code>)</span></p></section>",
            pcls = if parked > 0 { "bad" } else { "ok" },
            parked = e(&plural(parked, "parked change", "parked changes")),
            ccls = if f.open_conflicts > 0 { "bad" } else { "ok" },
            conflicts = e(&plural(f.open_conflicts, "open conflict", "open conflicts")),
        );
    }

    h.push_str(
        "</main><footer>Counts only: this page shows no patient data. Prometheus metrics at \
         <code>/metrics</code>; readiness at <code>/readyz</code>. Refreshes every 30 s.</footer>\
         </body></html>\n",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain (unencrypted, in-memory) database with the store's schema.
    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        for m in crate::store::MIGRATIONS {
            c.execute_batch(m).unwrap();
        }
        c
    }

    fn add_instance(c: &Connection, pk: i64, study: &str, received_at: i64) {
        c.execute(
            "INSERT OR IGNORE INTO dicom_patients (pk, patient_id, patient_name, birth_date, sex)
             VALUES (1, 'P', 'N', '', '')",
            [],
        )
        .unwrap();
        c.execute(
            "INSERT OR IGNORE INTO dicom_studies (study_uid, patient_pk, study_date, study_time,
                 accession_number, study_id, study_description, referring_physician, created_at)
             VALUES (?1, 1, '', '', '', '', '', '', 0)",
            [study],
        )
        .unwrap();
        c.execute(
            "INSERT OR IGNORE INTO dicom_series VALUES (?1, ?2, 'CT', 1, '', 0)",
            [format!("{study}.1"), study.to_owned()],
        )
        .unwrap();
        let blob = format!("b{pk}");
        c.execute(
            "INSERT INTO blobs (id, size, sha256, created_at) VALUES (?1, 100, 'h', 0)",
            [&blob],
        )
        .unwrap();
        c.execute(
            "INSERT INTO dicom_instances (pk, sop_uid, version, series_uid, sop_class_uid,
               transfer_syntax, size, dataset_sha256, blob, calling_ae, received_at)
             VALUES (?1, ?2, 1, ?3, 'c', 't', 100, 'h', ?4, 'AE', ?5)",
            params![pk, format!("sop{pk}"), format!("{study}.1"), blob, received_at],
        )
        .unwrap();
    }

    const NOW: i64 = 1_790_000_000_000; // 2026-09-21T14:13:20Z
    const DAY: i64 = 1_789_948_800_000; // its UTC midnight

    #[test]
    fn utc_day_start_is_midnight() {
        assert_eq!(utc_day_start(NOW), DAY);
        assert_eq!(utc_day_start(DAY), DAY);
        assert_eq!(utc_day_start(DAY - 1), DAY - DAY_MS);
    }

    #[test]
    fn counts_only_todays_instances_and_their_studies() {
        let c = db();
        let dir = tempfile::tempdir().unwrap();
        // Yesterday: 3 instances of study A; today: 2 more of A, 1 of B, 1 of C; pk gaps.
        add_instance(&c, 1, "A", DAY - 3000);
        add_instance(&c, 2, "A", DAY - 2000);
        add_instance(&c, 5, "A", DAY - 1);
        add_instance(&c, 9, "A", DAY);
        add_instance(&c, 10, "A", DAY + 5);
        add_instance(&c, 14, "B", DAY + 10);
        add_instance(&c, 15, "C", NOW - 1);
        let f = store_figures(&c, dir.path(), NOW).unwrap();
        assert_eq!((f.studies_today, f.instances_today), (3, 4));
        assert_eq!((f.blobs, f.blob_bytes), (7, 700));
        assert_eq!(f.day_start_ms, DAY);
        // Tomorrow nothing was received yet.
        let f = store_figures(&c, dir.path(), NOW + DAY_MS).unwrap();
        assert_eq!((f.studies_today, f.instances_today), (0, 0));
        // Every instance is from today when the day started before all of them.
        let f = store_figures(&c, dir.path(), DAY - 1).unwrap();
        assert_eq!((f.studies_today, f.instances_today), (3, 7));
    }

    #[test]
    fn bisection_finds_the_boundary_at_every_position() {
        for n in 1..40i64 {
            for boundary in 0..=n {
                let c = db();
                for i in 0..n {
                    let t = if i < boundary { DAY - 100 + i } else { DAY + i };
                    add_instance(&c, 3 * i + 7, "S", t);
                }
                let want = (boundary < n).then_some(3 * boundary + 7);
                assert_eq!(first_instance_since(&c, DAY).unwrap(), want, "n={n} b={boundary}");
            }
        }
        assert_eq!(first_instance_since(&db(), DAY).unwrap(), None);
    }

    #[test]
    fn fhir_writes_queues_agent_reports_and_conflicts() {
        let c = db();
        let dir = tempfile::tempdir().unwrap();
        let hist = |id: &str, v: i64, t: i64, rtype: &str| {
            c.execute(
                "INSERT INTO fhir_history (rtype, id, version, last_updated, method, json)
                 VALUES (?1, ?2, ?3, ?4, 'PUT', '{}')",
                params![rtype, id, v, t],
            )
            .unwrap();
        };
        hist("p1", 1, DAY - 10, "Patient");
        hist("p1", 2, DAY + 10, "Patient");
        hist("p2", 1, DAY + 20, "Patient");
        hist("o1", 1, DAY + 30, "Observation");
        for (kind, state) in [("fhir", "pending"), ("fhir", "parked"), ("dicom", "pending")] {
            c.execute(
                "INSERT INTO outbox (created_at, kind, entity, op, state) VALUES (?1, ?2, 'x', 'put', ?3)",
                params![NOW - 60_000, kind, state],
            )
            .unwrap();
        }
        c.execute(
            "INSERT INTO sync_conflicts (at, entity, policy, state) VALUES (?1, 'Patient/p1', 'manual', 'open')",
            [NOW],
        )
        .unwrap();
        let report = serde_json::json!({"link": "up", "last_success_ms": NOW - 5000,
            "last_error": "Patient/p1: name 'Doe' refused", "sent": 12, "bytes_sent": 4096});
        c.execute(
            "INSERT INTO kv (ns, key, value) VALUES (?1, 'status.fhir', ?2)",
            params![crate::sync::internal::STATE_NS, report.to_string().into_bytes()],
        )
        .unwrap();
        let f = store_figures(&c, dir.path(), NOW).unwrap();
        assert_eq!(f.fhir_today, vec![("Patient".into(), 2), ("Observation".into(), 1)]);
        assert_eq!(f.open_conflicts, 1);
        let fhir = f.channels.iter().find(|c| c.queue.kind == "fhir").unwrap();
        assert_eq!((fhir.queue.pending, fhir.queue.parked), (1, 1));
        assert_eq!(
            fhir.agent,
            Some(AgentReport {
                link_up: true,
                last_success_ms: Some(NOW - 5000),
                has_error: true,
                sent: 12,
                bytes_sent: 4096
            })
        );
        let dicom = f.channels.iter().find(|c| c.queue.kind == "dicom").unwrap();
        assert_eq!((dicom.queue.pending, dicom.agent.as_ref()), (1, None));

        // The agent's error text never reaches the page.
        let html = render(&sample(Ok(f)));
        assert!(!html.contains("Doe"), "{html}");
        assert!(html.contains("1 open conflict<"), "{html}");
        assert!(html.contains("1 parked change<"), "{html}");
        assert!(html.contains("last round failed"), "{html}");
        assert!(html.contains(">link up<"), "{html}");
    }

    fn sample(store: Result<StoreFigures, String>) -> SiteStatus {
        SiteStatus {
            version: "0.1.0".into(),
            tenant_id: "t-1".into(),
            site_id: "site <b>&\"'".into(),
            generated_at_ms: NOW,
            uptime_secs: 93_784,
            shutting_down: false,
            disk: Some(Disk {
                total_bytes: 100 << 30,
                free_bytes: 40 << 30,
                used_bytes: 60 << 30,
                min_free_bytes: 1 << 30,
                high_watermark_bytes: 85 << 30,
                low_watermark_bytes: 75 << 30,
                pressure: "normal",
            }),
            store,
        }
    }

    #[test]
    fn render_escapes_and_shows_the_figures() {
        let f = StoreFigures {
            day_start_ms: DAY,
            studies_today: 2,
            instances_today: 3,
            fhir_today: vec![("Patient".into(), 1), ("<script>".into(), 1)],
            blobs: 3,
            blob_bytes: 1536,
            ..Default::default()
        };
        let html = render(&sample(Ok(f)));
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("site &lt;b&gt;&amp;&quot;&#39;"), "{html}");
        assert!(!html.contains("<b>&"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains(">2 studies<"));
        assert!(html.contains(">3 instances received over DICOM<"));
        assert!(html.contains(">2 FHIR resource versions written<"));
        assert!(html.contains("3 files, 1.5 KiB"));
        assert!(html.contains("1d 2h 3m"));
        assert!(html.contains("40.0 GiB (40%)"), "{html}");
        assert!(html.contains("width:60%"), "{html}");
        assert!(html.contains("2026-09-21 14:13:20 UTC"), "{html}");
        // No external asset of any kind, no script.
        for needle in ["<script", "src=", "href=", "url(", "@import"] {
            assert!(!html.contains(needle), "{needle} in {html}");
        }
    }

    #[test]
    fn render_reports_a_store_that_does_not_answer() {
        let html = render(&sample(Err("store closed".into())));
        assert!(html.contains("not answering: store closed"));
        assert!(!html.contains("id=\"today\""));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(61), "1m 1s");
        assert_eq!(human_duration(3700), "1h 1m");
    }
}
