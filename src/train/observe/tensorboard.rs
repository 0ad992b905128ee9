//! TensorBoard event files, written by hand: a few scalars per step need no
//! protobuf or TensorFlow crate. A file is a sequence of TFRecords (length,
//! masked CRC32C of the length, an `Event` protobuf, masked CRC32C of it); the
//! first event names the file version, every later one carries a `Summary` of
//! `simple_value` scalars at a step. TensorBoard reads every
//! `events.out.tfevents.*` file of the folder, so each run (and each resume)
//! adds its own file beside the earlier ones.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Appends scalar events to one new event file in a folder.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` and a new event file in it, named as TensorFlow names them
    /// (`events.out.tfevents.<seconds>.<host>.<pid>`). Neither may be a
    /// symbolic link (refused, naming it).
    /// A failure leaves nothing behind: no file, and no folder it made.
    pub fn create(dir: &Path) -> Result<Self> {
        crate::durable::refuse_link(dir)?;
        let made = std::fs::symlink_metadata(dir).is_err();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the TensorBoard folder {}", dir.display()))?;
        let secs = now().floor() as u64;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{}.mlm", std::process::id()));
        let written = crate::durable::create_run_file(&path).and_then(|file| {
            let mut w = Self { file: BufWriter::new(file), path: path.clone() };
            let mut event = Vec::new();
            put_f64(&mut event, 1, now());
            put_bytes(&mut event, 3, b"brain.Event:2");
            w.record(&event)?;
            Ok(w)
        });
        if written.is_err() {
            let _ = std::fs::remove_file(&path);
            if made {
                let _ = std::fs::remove_dir(dir);
            }
        }
        written
    }

    /// Deletes this writer's event file (a start that failed after making it).
    pub fn remove(self) {
        let Self { file, path } = self;
        drop(file.into_parts());
        let _ = std::fs::remove_file(&path);
    }

    /// One event at `step` holding `values` as scalars (tag, value), flushed so
    /// that TensorBoard shows it while the job runs.
    pub fn scalars(&mut self, step: i64, values: &[(String, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_key(&mut value, 2, 5);
            value.extend_from_slice(&v.to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        let mut event = Vec::new();
        put_f64(&mut event, 1, now());
        put_key(&mut event, 2, 0);
        put_varint(&mut event, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The scalars of one metrics record: every number, tagged `<kind>/<key>`
/// (nested objects as `<kind>/<key>/<inner>`), except the step itself.
pub fn scalars_of(record: &serde_json::Value) -> Vec<(String, f32)> {
    let kind = record["kind"].as_str().unwrap_or("metrics");
    let mut out = Vec::new();
    if let Some(obj) = record.as_object() {
        for (k, v) in obj {
            if k != "kind" && k != "step" {
                flatten(&format!("{kind}/{k}"), v, &mut out);
            }
        }
    }
    out
}

fn flatten(tag: &str, v: &serde_json::Value, out: &mut Vec<(String, f32)>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((tag.to_string(), x as f32));
            }
        }
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                flatten(&format!("{tag}/{k}"), v, out);
            }
        }
        _ => {}
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(buf, (field << 3) | wire);
}

fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn put_f64(buf: &mut Vec<u8>, field: u64, v: f64) {
    put_key(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// CRC-32C (Castagnoli), as TFRecord frames use it.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_frame_their_events_with_masked_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(7, &[("train/loss".into(), 2.5)]).unwrap();
        let path = w.path.clone();
        drop(w);
        let bytes = std::fs::read(&path).unwrap();
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()),
                masked_crc32c(&bytes[at..at + 8])
            );
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            events.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert!(events[0].windows(13).any(|w| w == b"brain.Event:2"));
        assert!(events[1].windows(10).any(|w| w == b"train/loss"));
        assert!(events[1].windows(4).any(|w| w == 2.5f32.to_le_bytes()));
    }

    #[test]
    fn every_number_of_a_record_is_a_scalar_but_the_step() {
        let r = serde_json::json!({"kind": "train", "step": 3, "loss": 1.5, "mfu": null, "phase": {"data_s": 0.25}});
        let mut s = scalars_of(&r);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(s, vec![("train/loss".to_string(), 1.5), ("train/phase/data_s".to_string(), 0.25)]);
    }
}
