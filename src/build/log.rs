//! The build log: one JSON line per build in `v1/log.jsonl`, with increasing IDs.

use std::io::Write;
use std::path::PathBuf;

use crate::build::{NodeReport, Status};
use crate::error::{Error, Result};
use crate::store::Cache;

/// One build.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// 1 for the first build recorded in this cache, then increasing.
    pub id: u64,
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// The recipe built.
    pub recipe: PathBuf,
    /// Nodes built (not cached): name and key.
    pub built: Vec<(String, String)>,
    /// Nodes that were cache hits.
    pub cached: usize,
}

impl Cache {
    /// Every logged build, oldest first.
    pub fn log(&self) -> Vec<Entry> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Appends a build to the log; returns its ID.
    pub fn append_log(&self, recipe: &std::path::Path, reports: &[NodeReport]) -> Result<u64> {
        let path = self.log_path();
        let dir = self.root();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let id = self.log().last().map(|e| e.id + 1).unwrap_or(1);
        let entry = Entry {
            id,
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            recipe: std::fs::canonicalize(recipe).unwrap_or_else(|_| recipe.to_path_buf()),
            built: reports
                .iter()
                .filter(|r| matches!(r.plan.status, Status::Miss(_)))
                .map(|r| (r.plan.name.clone(), r.plan.key.clone()))
                .collect(),
            cached: reports
                .iter()
                .filter(|r| r.plan.status == Status::Hit)
                .count(),
        };
        let mut line = serde_json::to_string(&entry).map_err(|e| Error::Invalid(e.to_string()))?;
        line.push('\n');
        // One write with O_APPEND: concurrent builds do not interleave lines.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        f.write_all(line.as_bytes())
            .map_err(|e| Error::io(&path, e))?;
        Ok(id)
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for seconds since the epoch.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_795_532_645), "2026-11-24 15:04:05");
    }
}
