//! Reading an import spreadsheet: the header row, then one validated [`SheetRow`] or [`RowError`] per row.
//!
//! Columns are found by name in the first non-empty row, in any order and any case (`Rotate URL`, `rotate_url` and
//! `rotate-url` are the same column). Required: `host, port, area, rotate_url, provider, package_code`; optional:
//! `expired_at, username, password, rotate_time`. Unknown columns are ignored. Naive dates are read as UTC.

use std::io::Cursor;

use calamine::{Data, DataType, Reader};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use proxypool_contracts::import::RowError;
use proxypool_contracts::Area;

/// Columns every sheet must have.
pub const REQUIRED: [&str; 6] = ["host", "port", "area", "rotate_url", "provider", "package_code"];
/// Columns read when present.
pub const OPTIONAL: [&str; 4] = ["expired_at", "username", "password", "rotate_time"];

/// Why a file cannot be imported at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SheetError {
    /// Not a workbook calamine can open.
    #[error("is not a spreadsheet (.xlsx, .xls, .xlsb or .ods): {0}")]
    NotASpreadsheet(String),
    /// The workbook has no sheet or the first sheet is empty.
    #[error("has no rows")]
    Empty,
    /// The header lacks required columns.
    #[error("lacks the column(s) {0} in its header row (found: {1})")]
    MissingColumns(String, String),
}

/// One valid row.
#[derive(Debug, Clone, PartialEq)]
pub struct SheetRow {
    /// Row number as the spreadsheet shows it.
    pub row: u32,
    /// Host or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Area.
    pub area: Area,
    /// Rotate URL.
    pub rotate_url: String,
    /// Provider name.
    pub provider: String,
    /// Package code.
    pub package_code: String,
    /// Subscription expiry.
    pub expired_at: Option<DateTime<Utc>>,
    /// Username, when given.
    pub username: Option<String>,
    /// Password, when given.
    pub password: Option<String>,
    /// Seconds between rotations, when given.
    pub rotate_time: Option<i64>,
}

/// The rows of the first sheet, each valid or with the reason it is not.
pub fn read(bytes: Vec<u8>) -> Result<Vec<Result<SheetRow, RowError>>, SheetError> {
    let mut book = calamine::open_workbook_auto_from_rs(Cursor::new(bytes))
        .map_err(|e| SheetError::NotASpreadsheet(e.to_string()))?;
    let range = match book.worksheet_range_at(0) {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(SheetError::NotASpreadsheet(e.to_string())),
        None => return Err(SheetError::Empty),
    };
    let first_row = range.start().map(|(r, _)| r).unwrap_or(0);
    let mut rows = range.rows().enumerate().filter(|(_, cells)| cells.iter().any(|c| !c.is_empty()));
    let Some((_, header)) = rows.next() else { return Err(SheetError::Empty) };
    let columns = Columns::find(header)?;
    let number = |i: usize| first_row.saturating_add(u32::try_from(i).unwrap_or(u32::MAX)).saturating_add(1);
    Ok(rows.map(|(i, cells)| columns.row(number(i), cells)).collect())
}

fn normalise(name: &str) -> String {
    name.trim().to_lowercase().replace([' ', '-'], "_")
}

/// Positions of the known columns.
struct Columns {
    at: Vec<(&'static str, usize)>,
}

impl Columns {
    fn find(header: &[Data]) -> Result<Self, SheetError> {
        let names: Vec<String> = header.iter().map(|c| normalise(&c.to_string())).collect();
        let mut at = Vec::new();
        let mut missing = Vec::new();
        for name in REQUIRED.iter().chain(OPTIONAL.iter()) {
            match names.iter().position(|n| n == name) {
                Some(i) => at.push((*name, i)),
                None if REQUIRED.contains(name) => missing.push(*name),
                None => {}
            }
        }
        if missing.is_empty() {
            Ok(Self { at })
        } else {
            let found: Vec<&str> = names.iter().map(String::as_str).filter(|n| !n.is_empty()).collect();
            Err(SheetError::MissingColumns(missing.join(", "), found.join(", ")))
        }
    }

    fn cell<'a>(&self, cells: &'a [Data], name: &str) -> Option<&'a Data> {
        let i = self.at.iter().find(|(n, _)| *n == name)?.1;
        cells.get(i).filter(|c| !c.is_empty() && !matches!(c, Data::String(s) if s.trim().is_empty()))
    }

    fn row(&self, row: u32, cells: &[Data]) -> Result<SheetRow, RowError> {
        let err = |field: &str, reason: String| RowError { row, field: Some(field.to_owned()), reason };
        let text = |name: &str| -> Result<String, RowError> {
            match self.cell(cells, name) {
                Some(c) => Ok(cell_text(c)),
                None => Err(err(name, format!("{name} is missing"))),
            }
        };
        let optional_text = |name: &str| self.cell(cells, name).map(cell_text);

        let host = text("host")?;
        if !valid_host(&host) {
            return Err(err("host", format!("{host:?} is not an IP address or host name")));
        }
        let port = match self.cell(cells, "port") {
            None => return Err(err("port", "port is missing".into())),
            Some(c) => port_of(c).ok_or_else(|| err("port", format!("{:?} is not a port (1-65535)", cell_text(c))))?,
        };
        let area_text = text("area")?;
        let area: Area =
            area_text.to_lowercase().parse().map_err(|()| err("area", format!("{area_text:?} is not vn or global")))?;
        let rotate_url = text("rotate_url")?;
        match url::Url::parse(&rotate_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => return Err(err("rotate_url", format!("{rotate_url:?} is not an absolute http(s) URL"))),
        }
        let provider = text("provider")?;
        let package_code = text("package_code")?;
        let expired_at = match self.cell(cells, "expired_at") {
            None => None,
            Some(c) => Some(date_of(c).ok_or_else(|| err("expired_at", format!("{:?} is not a date", cell_text(c))))?),
        };
        let rotate_time = match self.cell(cells, "rotate_time") {
            None => None,
            Some(c) => Some(
                c.as_f64()
                    .or_else(|| cell_text(c).parse::<f64>().ok())
                    .filter(|s| s.fract() == 0.0 && (1.0..=86_400.0 * 365.0).contains(s))
                    .map(|s| s as i64)
                    .ok_or_else(|| err("rotate_time", format!("{:?} is not a number of seconds", cell_text(c))))?,
            ),
        };
        Ok(SheetRow {
            row,
            host,
            port,
            area,
            rotate_url,
            provider,
            package_code,
            expired_at,
            username: optional_text("username"),
            password: optional_text("password"),
            rotate_time,
        })
    }
}

/// A cell as trimmed text; whole floats lose their `.0` (Excel stores numbers as floats).
fn cell_text(c: &Data) -> String {
    match c {
        Data::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", *f as i64),
        other => other.to_string().trim().to_owned(),
    }
}

fn port_of(c: &Data) -> Option<u16> {
    let n = match c {
        Data::Int(i) => *i as f64,
        Data::Float(f) => *f,
        Data::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (n.fract() == 0.0 && (1.0..=65_535.0).contains(&n)).then_some(n as u16)
}

/// An IP address, or a host name of letters, digits, dots and dashes.
fn valid_host(h: &str) -> bool {
    h.parse::<std::net::IpAddr>().is_ok()
        || (!h.is_empty()
            && h.len() <= 253
            && h.split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')))
}

/// Dates: Excel date cells and serial numbers, ISO 8601 / RFC 3339, `YYYY-MM-DD[ HH:MM[:SS]]`, `DD/MM/YYYY[ HH:MM]`.
fn date_of(c: &Data) -> Option<DateTime<Utc>> {
    match c {
        Data::DateTime(_) | Data::DateTimeIso(_) | Data::Int(_) | Data::Float(_) => {
            // Serial numbers outside 1950..2150 are not dates someone meant.
            if let Some(f) = c.as_f64().filter(|_| !matches!(c, Data::DateTime(_))) {
                if !(18_264.0..=91_311.0).contains(&f) {
                    return None;
                }
            }
            c.as_datetime().map(|n| Utc.from_utc_datetime(&n))
        }
        Data::String(s) => parse_date_text(s.trim()),
        _ => None,
    }
}

fn parse_date_text(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M"] {
        if let Ok(n) = NaiveDateTime::parse_from_str(s, f) {
            return Some(Utc.from_utc_datetime(&n));
        }
    }
    for f in ["%Y-%m-%d", "%d/%m/%Y"] {
        if let Ok(d) = NaiveDate::parse_from_str(s, f) {
            return d.and_hms_opt(0, 0, 0).map(|n| Utc.from_utc_datetime(&n));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_dates() {
        assert!(parse_date_text("2026-01-31").is_some());
        assert!(parse_date_text("31/01/2026 10:00").is_some());
        assert!(parse_date_text("2026-01-31T00:00:00Z").is_some());
        assert!(parse_date_text("next tuesday").is_none());
        assert!(parse_date_text("2026-13-01").is_none());
    }

    #[test]
    fn ports_and_hosts() {
        assert_eq!(port_of(&Data::Float(8080.0)), Some(8080));
        assert_eq!(port_of(&Data::String(" 3128 ".into())), Some(3128));
        assert_eq!(port_of(&Data::Int(70_000)), None);
        assert_eq!(port_of(&Data::Float(80.5)), None);
        assert!(valid_host("1.2.3.4") && valid_host("proxy-1.example.vn") && valid_host("::1"));
        assert!(!valid_host("bad host") && !valid_host("a..b"));
    }

    #[test]
    fn not_a_spreadsheet() {
        assert!(matches!(read(b"host,port\n1.2.3.4,80\n".to_vec()), Err(SheetError::NotASpreadsheet(_))));
    }
}
