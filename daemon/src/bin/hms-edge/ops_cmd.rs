//! `hms-edge backup`, `restore` and `rotate-key`: operations on the store with the daemon
//! stopped or running, under the state folder's lock, with a progress bar on a terminal.

use std::path::Path;
use std::process::ExitCode;

use hms_edge::config;

use crate::cli::KeyArgs;

/// The packaged encrypted credential and fallback key file (see packaging/package-setup).
const PACKAGED_CREDENTIAL: &str = "/etc/hms-edge/credstore.encrypted/master-key";
const PACKAGED_KEY_FILE: &str = "/etc/hms-edge/master-key";

/// `hms-edge backup DEST`.
pub fn backup(dest: &Path, key: &KeyArgs) -> ExitCode {
    ops(key, |state_dir, loc| {
        let master = loc.read_at(loc.path()).map_err(|e| e.to_string())?;
        let mut bar = ProgressBar::new("backup");
        let r =
            hms_edge::ops::backup::backup(state_dir, &master, dest, &mut |d, t| bar.update(d, t))
                .map_err(|e| e.to_string())?;
        bar.finish();
        let m = &r.manifest;
        // After the snapshot: the event says where the copy went (the copy itself holds
        // every earlier event).
        hms_edge::ops::audit_admin(
            state_dir,
            &master,
            "backup",
            "store",
            "success",
            Some(format!("to {}", r.dest.display())),
        )
        .map_err(|e| format!("backup written, but its audit event failed: {e}"))?;
        Ok(format!(
            "backup written to {}: {} DICOM instances, {} FHIR resources, {} blobs, \
             {} files, {:.1} MB in {:.2} s ({:.1} MB/s); key fingerprint {}",
            r.dest.display(),
            m.counts.dicom_instances,
            m.counts.fhir_resources,
            m.counts.blobs,
            m.files.len(),
            m.total_bytes as f64 / 1e6,
            r.elapsed.as_secs_f64(),
            r.mb_per_s(),
            m.key_fingerprint
        ))
    })
}

/// `hms-edge restore SRC`.
pub fn restore(src: &Path, key: &KeyArgs) -> ExitCode {
    ops(key, |state_dir, loc| {
        let master = loc.read_at(loc.path()).map_err(|e| e.to_string())?;
        let mut bar = ProgressBar::new("restore");
        let r =
            hms_edge::ops::restore::restore(state_dir, &master, src, &mut |d, t| bar.update(d, t))
                .map_err(|e| e.to_string())?;
        bar.finish();
        let m = &r.manifest;
        hms_edge::ops::audit_admin(
            state_dir,
            &master,
            "restore",
            "store",
            "success",
            Some(format!("from {} (backup of {})", src.display(), m.created_at)),
        )
        .map_err(|e| format!("restored, but the audit event failed: {e}"))?;
        Ok(format!(
            "restored the backup of {} into {}: {} DICOM instances, {} FHIR resources, \
             {} blobs, {:.1} MB in {:.2} s ({:.1} MB/s)",
            m.created_at,
            state_dir.display(),
            m.counts.dicom_instances,
            m.counts.fhir_resources,
            m.counts.blobs,
            m.total_bytes as f64 / 1e6,
            r.elapsed.as_secs_f64(),
            r.mb_per_s()
        ))
    })
}

/// `hms-edge rotate-key`.
pub fn rotate_key(key: &KeyArgs) -> ExitCode {
    ops(key, |state_dir, loc| {
        let r = hms_edge::ops::rotate::rotate(state_dir, loc, None).map_err(|e| e.to_string())?;
        let mut out = String::new();
        if let Some(rec) = &r.recovered {
            out.push_str(&format!("{rec}\n"));
        }
        if r.rotated {
            let master = loc.read_at(loc.path()).map_err(|e| e.to_string())?;
            hms_edge::ops::audit_admin(
                state_dir,
                &master,
                "rotate-key",
                "master-key",
                "success",
                Some(format!("{} -> {}", r.old_fingerprint, r.new_fingerprint)),
            )
            .map_err(|e| format!("key rotated, but the audit event failed: {e}"))?;
            out.push_str(&format!(
                "master key rotated in {} ({} -> {}): database re-keyed, blob and audit keys \
                 re-wrapped, {} blobs verified under the new key, old key destroyed ({:.2} s)",
                loc.path().display(),
                r.old_fingerprint,
                r.new_fingerprint,
                r.blobs_verified,
                r.elapsed.as_secs_f64()
            ));
        }
        Ok(out)
    })
}

/// Loads the config, resolves the state folder and the master key's location, and runs `f`.
fn ops<F>(args: &KeyArgs, f: F) -> ExitCode
where
    F: FnOnce(&std::path::Path, &hms_edge::ops::rotate::KeyLocation) -> Result<String, String>,
{
    use hms_edge::keys::KeySource;
    use hms_edge::ops::rotate::KeyLocation;
    // Files we create (backup, staging, keys) are private, and no core dump holds the key.
    hms_edge::keys::harden_process();
    let run = || -> Result<String, String> {
        let path = config::resolve_path(args.config.clone());
        let c = config::load(path.as_deref()).map_err(|e| e.to_string())?;
        let state_dir = c.state_dir();
        let loc = if let Some(p) = &args.key_file {
            KeyLocation::File(p.clone())
        } else if let Some(p) = &args.credential {
            KeyLocation::Credential(p.clone())
        } else {
            match KeySource::resolve(&c.keys.master_key_file, &state_dir) {
                KeySource::Credential(p) => KeyLocation::File(p),
                KeySource::File(p) if !c.keys.master_key_file.as_os_str().is_empty() => {
                    KeyLocation::File(p)
                }
                KeySource::File(p) if p.exists() => KeyLocation::File(p),
                KeySource::File(p) => {
                    if std::path::Path::new(PACKAGED_CREDENTIAL).exists() {
                        KeyLocation::Credential(PACKAGED_CREDENTIAL.into())
                    } else if std::path::Path::new(PACKAGED_KEY_FILE).exists() {
                        KeyLocation::File(PACKAGED_KEY_FILE.into())
                    } else {
                        KeyLocation::File(p)
                    }
                }
            }
        };
        f(&state_dir, &loc)
    };
    match run() {
        Ok(msg) => {
            if !msg.is_empty() {
                println!("{msg}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hms-edge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A progress line on stderr, drawn only when stderr is a terminal.
struct ProgressBar {
    label: &'static str,
    tty: bool,
    started: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl ProgressBar {
    fn new(label: &'static str) -> Self {
        use std::io::IsTerminal;
        ProgressBar {
            label,
            tty: std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.tty {
            return;
        }
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now - t < std::time::Duration::from_millis(100))
            && done < total
        {
            return;
        }
        self.last = Some(now);
        let frac = if total == 0 { 1.0 } else { done as f64 / total as f64 };
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{} [{}{}] {:>5.1}%  {:.1}/{:.1} MB  {:.1} MB/s ",
            self.label,
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0,
            done as f64 / 1e6,
            total as f64 / 1e6,
            done as f64 / 1e6 / secs
        );
    }

    fn finish(&mut self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}
