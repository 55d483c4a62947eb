//! Global transaction ids: the id of one transaction and the set of transactions
//! already delivered, in the two servers' formats.
//!
//! - **MariaDB**: a GTID is `domain-server-sequence` (`0-1-42`). A position is one
//!   GTID per replication domain, the last one applied (`gtid_binlog_pos`, e.g.
//!   `0-1-42,1-7-3`); a replica resumes with `SET @slave_connect_state = '…'`.
//! - **MySQL 8**: a GTID is `source_uuid:transaction_id`
//!   (`3e11fa47-71ca-11e1-9e33-c80aa9429562:23`; MySQL 8.4 may add a tag,
//!   `uuid:tag:23`). A position is the executed set, intervals per uuid
//!   (`uuid:1-42:50-51,uuid2:1-7`); a replica resumes with `COM_BINLOG_DUMP_GTID`,
//!   which sends every transaction not in the set.
//!
//! The MySQL format is written from the reference manual ("GTID Format and
//! Storage", "GTID Sets") and the `COM_BINLOG_DUMP_GTID` protocol page; only the
//! MariaDB format is exercised against a server here.

use std::collections::BTreeMap;
use std::fmt;

use mysql_async::Sid;

/// The id of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Gtid {
    Mariadb {
        domain: u32,
        server: u32,
        seq: u64,
    },
    /// `sid` is the source uuid, with `:tag` for a tagged GTID.
    Mysql {
        sid: String,
        gno: u64,
    },
}

impl Gtid {
    /// The GTID of a MySQL `GTID_LOG_EVENT` / `GTID_TAGGED_LOG_EVENT`.
    pub fn mysql(uuid: [u8; 16], tag: Option<&str>, gno: u64) -> Self {
        let mut sid = format_uuid(uuid);
        if let Some(tag) = tag.filter(|t| !t.is_empty()) {
            sid.push(':');
            sid.push_str(tag);
        }
        Gtid::Mysql { sid, gno }
    }

    /// The GTID of a MariaDB `GTID_EVENT` from its body (sequence: 8 bytes, domain:
    /// 4 bytes, little endian) and its header's server id.
    pub fn mariadb(body: &[u8], server: u32) -> Option<Self> {
        let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
        let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
        Some(Gtid::Mariadb { domain, server, seq })
    }
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gtid::Mariadb { domain, server, seq } => write!(f, "{domain}-{server}-{seq}"),
            Gtid::Mysql { sid, gno } => write!(f, "{sid}:{gno}"),
        }
    }
}

fn format_uuid(b: [u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The transactions delivered so far: a position to resume from by GTID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GtidSet {
    /// Per domain: (server id, sequence) of the last transaction.
    Mariadb(BTreeMap<u32, (u32, u64)>),
    /// Per sid (uuid or uuid:tag): sorted, disjoint, inclusive intervals.
    Mysql(BTreeMap<String, Vec<(u64, u64)>>),
}

impl GtidSet {
    /// Parses a position in the server's format (`gtid_binlog_pos` for MariaDB,
    /// `gtid_executed` for MySQL; whitespace and newlines are ignored).
    ///
    /// # Errors
    /// The part that is not a GTID.
    pub fn parse(text: &str, mariadb: bool) -> Result<Self, String> {
        let parts = text.split(',').map(str::trim).filter(|p| !p.is_empty());
        if mariadb {
            let mut domains = BTreeMap::new();
            for part in parts {
                let mut it = part.split('-').map(str::parse::<u64>);
                let (Some(Ok(d)), Some(Ok(s)), Some(Ok(n)), None) =
                    (it.next(), it.next(), it.next(), it.next())
                else {
                    return Err(format!("`{part}` is not a MariaDB GTID (domain-server-sequence)"));
                };
                let (Ok(d), Ok(s)) = (u32::try_from(d), u32::try_from(s)) else {
                    return Err(format!("`{part}`: domain or server id out of range"));
                };
                domains.insert(d, (s, n));
            }
            return Ok(GtidSet::Mariadb(domains));
        }
        let mut sids: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for part in parts {
            let mut fields = part.split(':').map(str::trim);
            let uuid = fields.next().unwrap_or_default().to_ascii_lowercase();
            if uuid.len() != 36 || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                return Err(format!("`{part}` does not start with a server uuid"));
            }
            let mut sid = uuid.clone();
            for field in fields {
                if field.starts_with(|c: char| c.is_ascii_digit()) {
                    let (a, b) = field.split_once('-').unwrap_or((field, field));
                    let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
                        return Err(format!("`{field}` in `{part}` is not an interval"));
                    };
                    if a == 0 || a > b {
                        return Err(format!("`{field}` in `{part}` is not an interval"));
                    }
                    add_interval(sids.entry(sid.clone()).or_default(), a, b);
                } else {
                    // A tag (MySQL 8.4) applies to the intervals after it.
                    sid = format!("{uuid}:{}", field.to_ascii_lowercase());
                }
            }
        }
        Ok(GtidSet::Mysql(sids))
    }

    pub fn is_empty(&self) -> bool {
        match self {
            GtidSet::Mariadb(d) => d.is_empty(),
            GtidSet::Mysql(s) => s.is_empty(),
        }
    }

    /// Records a finished transaction. A GTID of the other flavour is ignored (a
    /// set is of one server kind).
    pub fn add(&mut self, gtid: &Gtid) {
        match (self, gtid) {
            (GtidSet::Mariadb(d), Gtid::Mariadb { domain, server, seq }) => {
                d.insert(*domain, (*server, *seq));
            }
            (GtidSet::Mysql(s), Gtid::Mysql { sid, gno }) => {
                insert(s.entry(sid.clone()).or_default(), *gno);
            }
            _ => {}
        }
    }

    /// Whether every transaction of `other` is in this set: the stream holding
    /// this set has passed the point `other` names. MariaDB positions compare per
    /// domain by sequence number (a domain's transactions are ordered); MySQL sets
    /// by interval containment. Sets of the two flavours never include each other.
    pub fn includes(&self, other: &GtidSet) -> bool {
        match (self, other) {
            (GtidSet::Mariadb(mine), GtidSet::Mariadb(theirs)) => theirs
                .iter()
                .all(|(domain, (_, seq))| mine.get(domain).is_some_and(|(_, s)| s >= seq)),
            (GtidSet::Mysql(mine), GtidSet::Mysql(theirs)) => theirs.iter().all(|(sid, list)| {
                let have = mine.get(sid).map_or(&[][..], Vec::as_slice);
                list.iter().all(|&(a, b)| have.iter().any(|&(x, y)| x <= a && b <= y))
            }),
            _ => false,
        }
    }

    /// The set as `COM_BINLOG_DUMP_GTID` blocks (MySQL).
    ///
    /// # Errors
    /// A sid the driver does not accept.
    pub fn sids(&self) -> Result<Vec<Sid<'static>>, String> {
        let GtidSet::Mysql(sids) = self else {
            return Ok(Vec::new());
        };
        sids.iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(sid, list)| {
                let text = format!("{sid}:{}", intervals(list));
                text.parse::<Sid<'static>>().map_err(|e| format!("`{text}`: {e}"))
            })
            .collect()
    }
}

impl fmt::Display for GtidSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GtidSet::Mariadb(d) => {
                let parts: Vec<String> =
                    d.iter().map(|(dom, (s, n))| format!("{dom}-{s}-{n}")).collect();
                f.write_str(&parts.join(","))
            }
            GtidSet::Mysql(s) => {
                let parts: Vec<String> = s
                    .iter()
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(sid, l)| format!("{sid}:{}", intervals(l)))
                    .collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

fn intervals(list: &[(u64, u64)]) -> String {
    let parts: Vec<String> = list
        .iter()
        .map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
        .collect();
    parts.join(":")
}

/// Adds one transaction number to sorted, disjoint, inclusive intervals.
fn insert(list: &mut Vec<(u64, u64)>, gno: u64) {
    add_interval(list, gno, gno);
}

fn add_interval(list: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    // Transactions mostly arrive in order: the common case extends the last interval.
    if let Some(last) = list.last_mut() {
        if last.0 <= a && a <= last.1.saturating_add(1) {
            last.1 = last.1.max(b);
            return;
        }
    }
    list.push((a, b));
    list.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(list.len());
    for &(s, e) in list.iter() {
        match merged.last_mut() {
            Some(m) if s <= m.1.saturating_add(1) => m.1 = m.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    *list = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
    const U2: &str = "2174b383-5441-11e8-b90a-c80aa9429562";

    #[test]
    fn mariadb_positions_keep_the_last_gtid_per_domain() {
        let mut set = GtidSet::parse("0-1-42, 1-7-3", true).unwrap();
        set.add(&Gtid::Mariadb { domain: 0, server: 2, seq: 43 });
        set.add(&Gtid::Mariadb { domain: 5, server: 1, seq: 1 });
        assert_eq!(set.to_string(), "0-2-43,1-7-3,5-1-1");
        assert!(GtidSet::parse("", true).unwrap().is_empty());
        assert!(GtidSet::parse("0-1", true).is_err());
        assert!(GtidSet::parse("0-1-x", true).is_err());
        let mut body = 42u64.to_le_bytes().to_vec();
        body.extend_from_slice(&3u32.to_le_bytes());
        body.push(0);
        assert_eq!(Gtid::mariadb(&body, 1).map(|g| g.to_string()).as_deref(), Some("3-1-42"));
        assert_eq!(Gtid::mariadb(&[1, 2], 1), None);
    }

    #[test]
    fn mysql_sets_merge_intervals_and_keep_tags_apart() {
        let text = format!("{}:1-5:7,\n{U2}:1-3:tx:9", U1.to_uppercase());
        let mut set = GtidSet::parse(&text, false).unwrap();
        assert_eq!(set.to_string(), format!("{U2}:1-3,{U2}:tx:9,{U1}:1-5:7"));
        let uuid: [u8; 16] = [
            0x3e, 0x11, 0xfa, 0x47, 0x71, 0xca, 0x11, 0xe1, 0x9e, 0x33, 0xc8, 0x0a, 0xa9, 0x42,
            0x95, 0x62,
        ];
        let g = Gtid::mysql(uuid, None, 6);
        assert_eq!(g.to_string(), format!("{U1}:6"));
        set.add(&g);
        set.add(&Gtid::mysql(uuid, None, 8));
        set.add(&Gtid::mysql(uuid, None, 12));
        assert_eq!(set.to_string(), format!("{U2}:1-3,{U2}:tx:9,{U1}:1-8:12"));
        assert_eq!(Gtid::mysql(uuid, Some("tx"), 1).to_string(), format!("{U1}:tx:1"));
        let sids = set.sids().unwrap();
        let shown: Vec<String> = sids.iter().map(ToString::to_string).collect();
        assert_eq!(shown, [format!("{U2}:1-3"), format!("{U2}:tx:9"), format!("{U1}:1-8:12")]);
        assert!(GtidSet::parse("not-a-uuid:1-2", false).is_err());
        assert!(GtidSet::parse(&format!("{U1}:5-2"), false).is_err());
    }

    #[test]
    fn a_set_includes_the_points_it_has_passed() {
        let set = GtidSet::parse(&format!("{U1}:1-5:7-9,{U2}:1-3"), false).unwrap();
        let sub = GtidSet::parse(&format!("{U1}:2-4:8"), false).unwrap();
        assert!(set.includes(&sub) && !sub.includes(&set));
        assert!(!set.includes(&GtidSet::parse(&format!("{U1}:6"), false).unwrap()));
        assert!(set.includes(&GtidSet::parse("", false).unwrap()));
        let maria = GtidSet::parse("0-1-42,1-7-3", true).unwrap();
        assert!(maria.includes(&GtidSet::parse("0-2-40", true).unwrap()));
        assert!(!maria.includes(&GtidSet::parse("0-1-43", true).unwrap()));
        assert!(!maria.includes(&GtidSet::parse("2-1-1", true).unwrap()));
        assert!(!maria.includes(&sub), "flavours do not mix");
    }

    #[test]
    fn out_of_order_transactions_merge() {
        let mut l = Vec::new();
        for g in [5, 1, 3, 2, 4, 9] {
            insert(&mut l, g);
        }
        assert_eq!(l, [(1, 5), (9, 9)]);
    }
}
