//! Percentiles of latency samples, and what `/proc` says about a process (natterd's RSS and CPU time).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};

/// Linux's `USER_HZ`: the unit of `utime`/`stime` in `/proc/PID/stat` (100 on every Linux ABI).
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// The value at quantile `q` (0..=1) of sorted samples (nearest rank); 0 when empty.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A process to observe through `/proc`.
#[derive(Debug, Clone)]
pub struct Proc {
    dir: PathBuf,
}

impl Proc {
    /// Process `pid`; fails if it does not exist.
    pub fn new(pid: u32) -> Result<Proc> {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        if !dir.join("status").exists() {
            return Err(anyhow!("no process {pid} (no {})", dir.display()));
        }
        Ok(Proc { dir })
    }

    /// This process.
    pub fn this() -> Proc {
        Proc {
            dir: PathBuf::from("/proc/self"),
        }
    }

    /// Resident set size in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(self.dir.join("status"))
            .with_context(|| format!("reading {}/status", self.dir.display()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| anyhow!("no VmRSS in {}/status", self.dir.display()))
    }

    /// User plus system CPU time in seconds (`utime + stime` of `/proc/PID/stat`).
    pub fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(self.dir.join("stat"))
            .with_context(|| format!("reading {}/stat", self.dir.display()))?;
        // Fields after the command name, which is in parentheses and may hold spaces: field 3 (state)
        // is index 0 here, so utime (14) is 11 and stime (15) is 12.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("malformed stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| -> Result<f64> {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|v| v as f64 / CLOCK_TICKS_PER_S)
                .ok_or_else(|| anyhow!("malformed stat field {i}"))
        };
        Ok(tick(11)? + tick(12)?)
    }

    /// Open file descriptors.
    pub fn open_fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(self.dir.join("fd"))?.count())
    }
}

/// The machine's 1-minute load average (other work competing for the CPUs), if readable.
pub fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Least-squares slope of `y` over `x`; `None` with fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 0.999), 100);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        let s = slope(&pts).unwrap_or_default();
        assert!((s - 3.0).abs() < 1e-9);
        assert!(slope(&[(1.0, 1.0)]).is_none());
    }

    #[test]
    fn reads_own_process() {
        let me = Proc::this();
        assert!(me.rss_bytes().unwrap_or_default() > 0);
        assert!(me.cpu_seconds().is_ok());
        assert!(me.open_fds().unwrap_or_default() > 0);
    }
}
