//! Reading an import spreadsheet: the header row, then one validated [`SheetRow`] or [`RowError`] per row.
//!
//! Columns are found by name in the first non-empty row, in any order and any case (`Rotate URL`, `rotate_url` and
//! `rotate-url` are the same column). Required: `host, port, area, rotate_url, provider, package_code`; optional:
//! `expired_at, username, password, rotate_time`. Unknown columns are ignored. Naive dates are read as UTC.
//!
//! An upload is hostile until read: `.xlsx` and `.xlsb` are streamed cell by cell, keeping only the known columns
//! and at most `max_rows` rows, because a whole-sheet read allocates the sheet's full extent (two cells at `A1` and
//! `XFD1048576` in a 10 kB file would ask for 17 billion cells). `.xls` is bounded by its format (65,536 x 256);
//! `.ods`, which calamine expands whole when it opens it and whose repeated-row markup has no such bound, is
//! refused before it is opened. A zip-based workbook whose directory says it unpacks to more than
//! [`Limits::max_unpacked_bytes`] is refused unopened (a zip bomb).

use std::io::Cursor;

use calamine::{Data, DataType, Reader, Xls, Xlsb, Xlsx};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use proxypool_contracts::import::RowError;
use proxypool_contracts::Area;

/// Most bytes a zip-based workbook (`.xlsx`, `.xlsb`) may unpack to, by its own directory, by default. A
/// 200,000-row import unpacks to about 60 MB.
pub const MAX_UNPACKED_BYTES: u64 = 512 * 1024 * 1024;

/// How much of an upload is read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most data rows (`IMPORT_MAX_ROWS`).
    pub max_rows: usize,
    /// Most bytes a zip-based workbook may unpack to.
    pub max_unpacked_bytes: u64,
}

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
    /// More data rows than `IMPORT_MAX_ROWS`.
    #[error("has more than {0} rows (IMPORT_MAX_ROWS); split it into several files")]
    TooManyRows(usize),
    /// A format that cannot be read within bounds.
    #[error("is an OpenDocument sheet (.ods), which is not accepted; save it as .xlsx")]
    Ods,
    /// A zip bomb, or a workbook far larger than any import.
    #[error("unpacks to {0} bytes, more than the limit of {1}")]
    Unpacked(u64, u64),
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

/// Streams the first sheet of an `.xlsx` or `.xlsb` book (their cell readers share no trait) into a [`RowStream`].
macro_rules! stream_first_sheet {
    ($book:expr, $max_rows:expr, $not_a_sheet:expr) => {{
        let name = $book.sheet_names().first().cloned().ok_or(SheetError::Empty)?;
        let mut cells = $book.worksheet_cells_reader(&name).map_err(|e| $not_a_sheet(&e))?;
        let mut rows = RowStream::new($max_rows);
        while let Some(cell) = cells.next_cell().map_err(|e| $not_a_sheet(&e))? {
            let (r, c) = cell.get_position();
            rows.push(r, c, cell.get_value())?;
        }
        rows.finish()
    }};
}

/// The rows of the first sheet, each valid or with the reason it is not, within `limits`.
pub fn read(bytes: Vec<u8>, limits: Limits) -> Result<Vec<Result<SheetRow, RowError>>, SheetError> {
    let not_a_sheet = |e: &dyn std::fmt::Display| SheetError::NotASpreadsheet(e.to_string());
    let max_rows = limits.max_rows;
    inspect_zip(&bytes, limits.max_unpacked_bytes)?;
    match open(bytes).map_err(|e| not_a_sheet(&e))? {
        Book::Xlsx(mut book) => stream_first_sheet!(book, max_rows, not_a_sheet),
        Book::Xlsb(mut book) => stream_first_sheet!(book, max_rows, not_a_sheet),
        Book::Xls(mut book) => {
            let range = match book.worksheet_range_at(0) {
                Some(Ok(r)) => r,
                Some(Err(e)) => return Err(not_a_sheet(&e)),
                None => return Err(SheetError::Empty),
            };
            let first_row = range.start().map(|(r, _)| r).unwrap_or(0);
            let mut rows = RowStream::new(max_rows);
            for (i, cells) in range.rows().enumerate() {
                let r = first_row.saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
                for (c, cell) in cells.iter().enumerate() {
                    rows.push(r, u32::try_from(c).unwrap_or(u32::MAX), cell)?;
                }
            }
            rows.finish()
        }
    }
}

/// The formats read; `.ods` is not among them (see the module documentation).
enum Book {
    Xls(Xls<Cursor<Vec<u8>>>),
    Xlsx(Xlsx<Cursor<Vec<u8>>>),
    Xlsb(Xlsb<Cursor<Vec<u8>>>),
}

/// Opens the workbook as the first format that accepts it (`calamine::open_workbook_auto_from_rs` without ODS).
fn open(bytes: Vec<u8>) -> Result<Book, &'static str> {
    if bytes.starts_with(b"PK") {
        if let Ok(b) = Xlsx::new(Cursor::new(bytes.clone())) {
            return Ok(Book::Xlsx(b));
        }
        Xlsb::new(Cursor::new(bytes)).map(Book::Xlsb).map_err(|_| "cannot detect the file format")
    } else {
        Xls::new(Cursor::new(bytes)).map(Book::Xls).map_err(|_| "cannot detect the file format")
    }
}

/// Refuses, unopened, an OpenDocument sheet and a zip whose directory adds up past `max_unpacked`. Anything that
/// is not a readable zip is left to the workbook readers to judge.
fn inspect_zip(bytes: &[u8], max_unpacked: u64) -> Result<(), SheetError> {
    if !bytes.starts_with(b"PK") {
        return Ok(());
    }
    let Ok(mut zip) = zip::ZipArchive::new(Cursor::new(bytes)) else { return Ok(()) };
    let mut total = 0u64;
    for i in 0..zip.len() {
        if let Ok(f) = zip.by_index_raw(i) {
            total = total.saturating_add(f.size());
        }
    }
    if total > max_unpacked {
        return Err(SheetError::Unpacked(total, max_unpacked));
    }
    if let Ok(f) = zip.by_name("mimetype") {
        use std::io::Read;
        let mut mime = String::new();
        let _ = f.take(100).read_to_string(&mut mime);
        if mime.starts_with("application/vnd.oasis.opendocument") {
            return Err(SheetError::Ods);
        }
    }
    Ok(())
}

/// Turns cells, in sheet order, into validated rows: the first non-empty row is the header; afterwards only the
/// known columns are kept.
struct RowStream {
    max_rows: usize,
    columns: Option<Columns>,
    /// Header cells, by column, until the header row ends.
    header: Vec<Data>,
    /// The row being read (0-based) and its kept cells.
    current: Option<(u32, Vec<Data>)>,
    rows: Vec<Result<SheetRow, RowError>>,
}

impl RowStream {
    fn new(max_rows: usize) -> Self {
        Self { max_rows, columns: None, header: Vec::new(), current: None, rows: Vec::new() }
    }

    fn push<T>(&mut self, row: u32, col: u32, value: &T) -> Result<(), SheetError>
    where
        T: DataType + Clone + Into<Data>,
    {
        if value.is_empty() {
            return Ok(());
        }
        if self.current.as_ref().is_some_and(|(r, _)| *r != row) {
            self.end_row()?;
        }
        let col = usize::try_from(col).unwrap_or(usize::MAX);
        let (_, cells) = self.current.get_or_insert_with(|| (row, Vec::new()));
        let keep = match &self.columns {
            // Header: every column, as the sheet format bounds its width (16,384).
            None => col < 16_384,
            Some(columns) => columns.at.iter().any(|(_, i)| *i == col),
        };
        if keep {
            if cells.len() <= col {
                cells.resize(col + 1, Data::Empty);
            }
            cells[col] = value.clone().into();
        }
        Ok(())
    }

    fn end_row(&mut self) -> Result<(), SheetError> {
        let Some((row, cells)) = self.current.take() else { return Ok(()) };
        match &self.columns {
            None => {
                self.header = cells;
                self.columns = Some(Columns::find(&self.header)?);
            }
            Some(columns) => {
                if self.rows.len() >= self.max_rows {
                    return Err(SheetError::TooManyRows(self.max_rows));
                }
                // Row numbers as the spreadsheet shows them (1-based).
                self.rows.push(columns.row(row.saturating_add(1), &cells));
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<Result<SheetRow, RowError>>, SheetError> {
        self.end_row()?;
        if self.columns.is_none() {
            return Err(SheetError::Empty);
        }
        Ok(self.rows)
    }
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

    fn rows(max_rows: usize) -> Limits {
        Limits { max_rows, max_unpacked_bytes: MAX_UNPACKED_BYTES }
    }

    const HEADER: [&str; 6] = ["host", "port", "area", "rotate_url", "provider", "package_code"];

    /// A sheet with the header in `first_row`, then `n` good rows.
    fn sheet(first_row: u32, n: u32) -> rust_xlsxwriter::Worksheet {
        let mut ws = rust_xlsxwriter::Worksheet::new();
        for (c, h) in (0u16..).zip(HEADER) {
            ws.write_string(first_row, c, h).unwrap();
        }
        for i in 1..=n {
            let r = first_row + i;
            let cells = [format!("10.0.0.{i}"), "8080".into(), "vn".into(), format!("http://r.test/{i}"), "P".into()];
            for (c, v) in (0u16..).zip(cells) {
                ws.write_string(r, c, v).unwrap();
            }
            ws.write_string(r, 5, "C1").unwrap();
        }
        ws
    }

    fn xlsx(ws: rust_xlsxwriter::Worksheet) -> Vec<u8> {
        let mut book = rust_xlsxwriter::Workbook::new();
        book.push_worksheet(ws);
        book.save_to_buffer().unwrap()
    }

    #[test]
    fn rows_are_numbered_as_shown_and_capped() {
        let got = read(xlsx(sheet(2, 3)), rows(3)).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap().row, 4, "header on row 3, first data row on row 4");
        assert_eq!(got[2].as_ref().unwrap().host, "10.0.0.3");
        assert_eq!(read(xlsx(sheet(0, 4)), rows(3)), Err(SheetError::TooManyRows(3)));
    }

    #[test]
    fn a_tiny_file_spanning_the_whole_grid_is_read_in_bounded_memory() {
        // Two cells far apart: a whole-range read would allocate 16,384 x 1,048,576 cells and abort.
        let mut ws = sheet(0, 1);
        ws.write_string(1_048_575, 16_383, "far away").unwrap();
        let bytes = xlsx(ws);
        assert!(bytes.len() < 20_000);
        let got = read(bytes, rows(10)).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        let far = got[1].as_ref().unwrap_err();
        assert_eq!((far.row, far.field.as_deref()), (1_048_576, Some("host")));
    }

    #[test]
    fn opendocument_is_refused() {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("mimetype", stored).unwrap();
        zip.write_all(b"application/vnd.oasis.opendocument.spreadsheet").unwrap();
        zip.start_file("content.xml", stored).unwrap();
        zip.write_all(br#"<?xml version="1.0"?><office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"><office:body><office:spreadsheet/></office:body></office:document-content>"#).unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        assert_eq!(read(bytes, rows(10)), Err(SheetError::Ods));
    }

    #[test]
    fn a_zip_bomb_is_refused_unopened() {
        use std::io::Write;
        // 6 MiB of zeros deflate to a few kB; the limit is 1 MiB here.
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        zip.start_file("xl/sharedStrings.xml", deflated).unwrap();
        let zeros = vec![b'0'; 1024 * 1024];
        for _ in 0..6 {
            zip.write_all(&zeros).unwrap();
        }
        let bytes = zip.finish().unwrap().into_inner();
        assert!(bytes.len() < 64 * 1024, "{}", bytes.len());
        let limits = Limits { max_rows: 10, max_unpacked_bytes: 1024 * 1024 };
        assert_eq!(read(bytes, limits), Err(SheetError::Unpacked(6 * 1024 * 1024, 1024 * 1024)));
    }

    #[test]
    fn not_a_spreadsheet() {
        assert!(matches!(read(b"host,port\n1.2.3.4,80\n".to_vec(), rows(10)), Err(SheetError::NotASpreadsheet(_))));
    }
}
