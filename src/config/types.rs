//! Value types of the configuration that humans write: durations (`30s`, `24h`), sizes
//! (`2GiB`), rates (`50MiB/s`) and the free-space rule (`2x` or a size). Each parses while the
//! TOML is deserialized, so a bad value is reported with its file and key.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A duration written as `30s`, `15m`, `24h`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"30s\", \"15m\", \"24h\""))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A size in bytes, written as `2GiB`, `500MB`, `4096`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("empty size; write e.g. \"2GiB\" or \"500MB\"".into());
        }
        t.parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|_| format!("invalid size {s:?}; write e.g. \"2GiB\" or \"500MB\""))
    }
}

impl Size {
    /// The size written so that it parses back to the same bytes (`1500MB`, `2GiB`,
    /// `1234567`), for configuration that is printed to be read again; [`fmt::Display`]
    /// rounds for humans (`1.4 GiB`).
    pub fn exact(&self) -> String {
        const UNITS: [(u64, &str); 8] = [
            (1 << 40, "TiB"),
            (1_000_000_000_000, "TB"),
            (1 << 30, "GiB"),
            (1_000_000_000, "GB"),
            (1 << 20, "MiB"),
            (1_000_000, "MB"),
            (1 << 10, "KiB"),
            (1_000, "KB"),
        ];
        match UNITS.iter().find(|(u, _)| self.0 != 0 && self.0.is_multiple_of(*u)) {
            Some((u, name)) => format!("{}{name}", self.0 / u),
            None => self.0.to_string(),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize::b(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(s) => Size::parse(&s).map_err(de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.exact())
    }
}

/// A bandwidth cap such as `50MiB/s`; the empty string means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rate(pub Option<u64>);

impl Rate {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Ok(Rate(None));
        }
        let Some(size) = t.strip_suffix("/s") else {
            return Err(format!(
                "invalid rate {s:?}; write e.g. \"50MiB/s\", or \"\" for unlimited"
            ));
        };
        match Size::parse(size) {
            Ok(Size(0)) => Err(format!("invalid rate {s:?}: must be above zero (\"\" means unlimited)")),
            Ok(Size(n)) => Ok(Rate(Some(n))),
            Err(_) => Err(format!(
                "invalid rate {s:?}; write e.g. \"50MiB/s\", or \"\" for unlimited"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_str(""),
            Some(n) => s.collect_str(&format_args!("{}/s", Size(n).exact())),
        }
    }
}

/// `priority.etcd_latency_budget`: how much slower etcd may answer while the snapshot is
/// pulled, as a multiple of its latency just before (`1.5`), or `"off"`: full speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatencyBudget {
    Off,
    Multiple(f64),
}

impl Default for LatencyBudget {
    fn default() -> Self {
        LatencyBudget::Multiple(DEFAULT_LATENCY_BUDGET)
    }
}

/// The default budget: etcd's requests at most a quarter slower than before the pull.
const DEFAULT_LATENCY_BUDGET: f64 = 1.25;

impl LatencyBudget {
    pub fn multiple(self) -> Option<f64> {
        match self {
            LatencyBudget::Off => None,
            LatencyBudget::Multiple(m) => Some(m),
        }
    }
}

impl<'de> Deserialize<'de> for LatencyBudget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
            Other(de::IgnoredAny),
        }
        let bad = |what: &str| {
            de::Error::custom(format!(
                "invalid latency budget {what}; write a multiple of etcd's latency before the pull from 1.1 to 1000, such as 1.25, or \"off\""
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Text(t) if t.trim().eq_ignore_ascii_case("off") => Ok(LatencyBudget::Off),
            Raw::Number(m) if m.is_finite() && (1.1..=1000.0).contains(&m) => Ok(LatencyBudget::Multiple(m)),
            Raw::Number(m) => Err(bad(&m.to_string())),
            Raw::Text(t) => Err(bad(&format!("{t:?}"))),
            Raw::Other(_) => Err(bad("(neither a number nor a string)")),
        }
    }
}

impl Serialize for LatencyBudget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LatencyBudget::Off => s.serialize_str("off"),
            LatencyBudget::Multiple(m) => s.serialize_f64(*m),
        }
    }
}

/// How much free space staging needs before a backup: a multiple of the current DB size
/// (`2x`, what the platform's own backup CronJob checks) or an absolute size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FreeSpace {
    TimesDbSize(f64),
    Absolute(Size),
}

impl FreeSpace {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(factor) = t.strip_suffix('x') {
            return match factor.trim().parse::<f64>() {
                Ok(f) if f.is_finite() && f >= 0.0 => Ok(FreeSpace::TimesDbSize(f)),
                _ => Err(format!(
                    "invalid free space {s:?}; write a multiple of the DB size (\"2x\") or a size (\"10GiB\")"
                )),
            };
        }
        Size::parse(t).map(FreeSpace::Absolute).map_err(|_| {
            format!("invalid free space {s:?}; write a multiple of the DB size (\"2x\") or a size (\"10GiB\")")
        })
    }

    /// Bytes needed for a database of `db_size` bytes.
    pub fn required(&self, db_size: u64) -> u64 {
        match *self {
            FreeSpace::TimesDbSize(f) => (db_size as f64 * f).ceil() as u64,
            FreeSpace::Absolute(Size(n)) => n,
        }
    }
}

impl fmt::Display for FreeSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FreeSpace::TimesDbSize(x) => write!(f, "{x}x"),
            FreeSpace::Absolute(size) => write!(f, "{size}"),
        }
    }
}

impl<'de> Deserialize<'de> for FreeSpace {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        FreeSpace::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for FreeSpace {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            FreeSpace::Absolute(size) => s.serialize_str(&size.exact()),
            FreeSpace::TimesDbSize(_) => s.collect_str(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(HumanDuration::parse("30s").unwrap().0, Duration::from_secs(30));
        assert_eq!(HumanDuration::parse("24h").unwrap().0, Duration::from_secs(86400));
        assert_eq!(HumanDuration::parse("1h 30m").unwrap().0, Duration::from_secs(5400));
        assert!(HumanDuration::parse("10 parsecs").is_err());
        assert!(HumanDuration::parse("").is_err());
        assert_eq!(HumanDuration(Duration::from_secs(900)).to_string(), "15m");
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("2GiB").unwrap().0, 2 << 30);
        assert_eq!(Size::parse("500MB").unwrap().0, 500_000_000);
        assert_eq!(Size::parse("4096").unwrap().0, 4096);
        assert!(Size::parse("lots").is_err());
        assert!(Size::parse("").is_err());
    }

    #[test]
    fn sizes_print_back_exactly() {
        for (text, shown) in [
            ("1500MB", "1500MB"),
            ("2GiB", "2GiB"),
            ("1536MiB", "1536MiB"),
            ("4096", "4KiB"),
            ("1234567", "1234567"),
            ("0", "0"),
        ] {
            let size = Size::parse(text).unwrap();
            assert_eq!(size.exact(), shown);
            assert_eq!(Size::parse(&size.exact()).unwrap(), size, "{text}");
        }
        // Display is for humans and rounds.
        assert_eq!(Size(1_500_000_000).to_string(), "1.4 GiB");
        let rate = Rate::parse("1500KB/s").unwrap();
        let v = serde_json::to_value(rate).unwrap();
        assert_eq!(v, "1500KB/s");
        assert_eq!(Rate::parse(v.as_str().unwrap()).unwrap(), rate);
        let free = FreeSpace::parse("1500MB").unwrap();
        assert_eq!(serde_json::to_value(free).unwrap(), "1500MB");
        assert_eq!(serde_json::to_value(FreeSpace::parse("1.5x").unwrap()).unwrap(), "1.5x");
    }

    #[test]
    fn rates() {
        assert_eq!(Rate::parse("").unwrap().0, None);
        assert_eq!(Rate::parse("50MiB/s").unwrap().0, Some(50 << 20));
        assert!(Rate::parse("50MiB").is_err());
        assert!(Rate::parse("0/s").is_err());
    }

    #[test]
    fn free_space() {
        assert_eq!(FreeSpace::parse("2x").unwrap().required(1000), 2000);
        assert_eq!(FreeSpace::parse("1.5x").unwrap().required(1000), 1500);
        assert_eq!(FreeSpace::parse("1KiB").unwrap().required(1 << 40), 1024);
        assert!(FreeSpace::parse("-1x").is_err());
        assert!(FreeSpace::parse("twice").is_err());
    }
}

/// The `[retention]` policy, as retention applies it (see `crate::delivery::retention`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub max_age: Option<std::time::Duration>,
    pub min_keep: u32,
}
