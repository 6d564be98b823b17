//! Units a price is quoted per; decimal and binary units are distinct names.

#[allow(unused_imports)]
use super::*;

/// The unit a price is quoted per. Decimal and binary units have distinct names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unit {
    /// 1 byte.
    #[serde(rename = "B")]
    Byte,
    /// 10³ bytes.
    #[serde(rename = "KB")]
    Kb,
    /// 10⁶ bytes.
    #[serde(rename = "MB")]
    Mb,
    /// 10⁹ bytes.
    #[serde(rename = "GB")]
    Gb,
    /// 2¹⁰ bytes.
    #[serde(rename = "KiB")]
    Kib,
    /// 2²⁰ bytes.
    #[serde(rename = "MiB")]
    Mib,
    /// 2³⁰ bytes.
    #[serde(rename = "GiB")]
    Gib,
}

impl Unit {
    /// Bytes in one unit.
    pub fn bytes(self) -> u64 {
        match self {
            Unit::Byte => 1,
            Unit::Kb => 1_000,
            Unit::Mb => 1_000_000,
            Unit::Gb => 1_000_000_000,
            Unit::Kib => 1 << 10,
            Unit::Mib => 1 << 20,
            Unit::Gib => 1 << 30,
        }
    }

    /// The unit's name as configured ("GB", "GiB", …).
    pub fn name(self) -> &'static str {
        match self {
            Unit::Byte => "B",
            Unit::Kb => "KB",
            Unit::Mb => "MB",
            Unit::Gb => "GB",
            Unit::Kib => "KiB",
            Unit::Mib => "MiB",
            Unit::Gib => "GiB",
        }
    }
}
